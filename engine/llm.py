"""The public Python API: `LLM` and `SamplingParams`.

    from tpserve.engine import LLM, SamplingParams
    llm = LLM("./workspace")                  # or a Hugging Face folder / hub id, tp=N
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    print(out[0].text)
"""
from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .chat_template import ChatTemplate, select_template
from .config import EngineConfig, WorkspaceMeta
from .errors import ConfigError
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import load_tokenizer
from .workspace import is_workspace, read_meta, resolve_workspace


def open_workspace(model: str | os.PathLike | None, tp: int | None = None,
                   model_name: str | None = None) -> Path:
    """A workspace path for `model`: a workspace as is, a Hugging Face folder or
    hub id converted once into a cache folder, the bundled demo model when None."""
    if model is None:
        from .demo_model import demo_model_path

        model = demo_model_path()
    path = Path(model).expanduser()
    if path.exists() and (is_workspace(path) or not (path / "config.json").exists()):
        ws = resolve_workspace(path)
        meta = read_meta(ws)
        if tp is not None and meta.tp != tp:
            raise ConfigError(f"{ws} was converted for tp={meta.tp}, not tp={tp}; pass --tp "
                              f"{meta.tp} or convert again with --tp {tp}")
        return ws
    from .convert import cached_workspace

    return cached_workspace(model, tp or 1, model_name)


def eos_token_ids(meta: WorkspaceMeta, tokenizer, workspace: Path) -> list[int]:
    ids = set(meta.model.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    gen = workspace / "tokenizer" / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


class LLM:
    """An engine over one model, for offline batches and for servers.

    model: a workspace, a Hugging Face model folder or hub id (converted on the
    fly into a cache folder), or None for the bundled demo model.
    tp: tensor-parallel ranks; None = the workspace's (1 for a Hugging Face model).
    engine_options: EngineConfig fields (session_len, max_batch_size,
    cache_max_entry_count, cache_block_seq_len, quant_policy, device, ...).
    """

    def __init__(self, model: str | os.PathLike | None = None, tp: int | None = None,
                 dtype: str = "auto",
                 model_name: str | None = None, **engine_options: Any) -> None:
        from .llm_engine import LLMEngine

        self.workspace = open_workspace(model, tp, model_name)
        self.meta = read_meta(self.workspace)
        options = {**self.meta.engine_defaults, "dtype": dtype, **engine_options}
        self.config = EngineConfig.from_options(options)
        self.tokenizer = load_tokenizer(self.workspace / "tokenizer", self.meta.tokenizer_kind)
        self.chat_template: ChatTemplate = select_template(model_name or self.meta.model_name,
                                                           self.tokenizer)
        self.model_name = model_name or self.meta.model_name
        self.session_len = self.config.session_len
        self.executor = _make_executor(self.workspace, self.meta, self.config)
        self.engine = LLMEngine(self.executor, self.tokenizer, self.config,
                                eos_token_ids(self.meta, self.tokenizer, self.workspace))
        self._ids = itertools.count()
        self._async = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError(f"{self.workspace} has no tokenizer; pass prompts as token ids")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """One finished output per prompt (strings or lists of token ids), in order;
        for sampling params with n > 1, that prompt's entry is a list of n outputs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, sp in zip(prompts, params):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"gen-{next(self._ids)}"
            self.engine.add_request(request_id, ids, sp)
            order.append(request_id)
        done: dict[str, list[RequestOutput]] = {}
        for outputs in self.engine.steps():
            for out in outputs:
                if out.finished:
                    done.setdefault(out.request_id.split("[")[0], []).append(out)
        results = []
        for request_id, sp in zip(order, params):
            samples = sorted(done[request_id], key=lambda o: o.index)
            results.append(samples if sp.n > 1 else samples[0])
        return results

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None
             ) -> RequestOutput:
        text = self.chat_template.render(messages, add_generation_prompt=True)
        return self.generate([self.encode(text, add_special_tokens=False)], sampling_params)[0]

    def async_engine(self):
        """The engine driven from a background thread, for asyncio servers."""
        if self._async is None:
            from .async_engine import AsyncLLMEngine

            self._async = AsyncLLMEngine(self.engine)
        return self._async

    def shutdown(self) -> None:
        if self._async is not None:
            self._async.shutdown()
        close = getattr(self.executor, "shutdown", None)
        if close:
            close()


def _make_executor(workspace: Path, meta: WorkspaceMeta, config: EngineConfig):
    from .model_runner import ModelRunner

    if meta.tp == 1:
        return ModelRunner(workspace, meta, config)
    from ..parallel.executor import ExecutorDeadError, PlacementError, RayExecutor

    factory = functools.partial(ModelRunner, workspace, meta, config)  # called as (rank, group)
    try:  # one Ray actor per rank
        return RayExecutor(meta.tp, factory, device=config.device)
    except (PlacementError, ExecutorDeadError) as exc:  # no room, or ranks that cannot start
        raise ConfigError(str(exc)) from None
