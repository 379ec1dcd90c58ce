"""One rank's model and KV cache: takes a ForwardBatch, returns next-token logits."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from pathlib import Path

import torch

from ..kernels import int4_tinygemm
from ..parallel.comm import LocalGroup, TPGroup
from ..parallel.process_group import min_over_ranks
from .config import EngineConfig, WorkspaceMeta
from .cuda_graph import DecodeGraphs
from .errors import ConfigError
from .forward_batch import SAMPLED_BY_ALL, SAMPLED_BY_RANK0, ForwardBatch
from .kv_cache import KVCache
from .loader import build_model, load_kv_qparams
from .mixed_graphs import MAX_TOKENS as MIXED_GRAPH_TOKENS
from .mixed_graphs import MixedGraphs
from .sampler import SamplerOutput, SamplingBatch, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    return device


def resolve_dtype(name: str, meta: WorkspaceMeta, device: torch.device) -> torch.dtype:
    """'auto': the stored float type on GPUs, float32 on CPUs (bf16 matmuls are slow there).
    4-bit AWQ models run in bf16 on GPUs that have it (compute capability 8.0+):
    PyTorch's int4 matmul, their fast path at small batch, takes only bf16."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if meta.quant.method == "awq" and int4_tinygemm.device_supported(device):
        return torch.bfloat16
    stored = meta.weight_type if meta.weight_type in DTYPES else "float16"
    if stored == "float32":
        return torch.bfloat16
    return DTYPES[stored]


class ModelRunner:
    def __init__(self, workspace: Path, meta: WorkspaceMeta, config: EngineConfig, rank: int = 0,
                 group: TPGroup = LocalGroup()) -> None:
        self.config = config
        self.device = resolve_device(config.device, rank)
        self.dtype = resolve_dtype(config.dtype, meta, self.device)
        cfg = meta.model
        self.group = group
        group.prepare_all_reduce(self.dtype, self.device)
        self.model = build_model(workspace, meta, rank, self.dtype, self.device, group,
                                 max_positions=config.session_len)
        self.vocab_size = cfg.vocab_size
        self.block_size = config.cache_block_seq_len
        kv_heads = self.model.layers[0].self_attn.num_kv_heads
        static = load_kv_qparams(workspace, rank, cfg.num_layers) if config.kv_int8 else None
        per_block = KVCache.bytes_per_block(cfg.num_layers, self.block_size, kv_heads, cfg.head_dim,
                                            self.dtype, config.kv_int8,
                                            per_token_scales=static is None)
        # ranks may see different free memory; all must allocate the same number of blocks
        self.num_blocks = min_over_ranks(group, self._count_blocks(per_block), self.device)
        self.kv_cache = KVCache.allocate(cfg.num_layers, self.num_blocks, self.block_size, kv_heads,
                                         cfg.head_dim, self.dtype, self.device, config.kv_int8,
                                         static)
        # the last step's sampled token ids, on the device: the next step's fed inputs;
        # local: every rank took them alike (no broadcast needed)
        self._last_sampled: torch.Tensor | None = None
        self._last_local = False
        self._fed_buffer = torch.zeros(config.max_batch_size, dtype=torch.int64,
                                       device=self.device) if group.world_size > 1 else None
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        if self.device.type == "cuda":
            self._compile_prompt_attention()
        if self.device.type == "cuda" and not config.eager_mode:
            with torch.inference_mode(), explain_capture_oom(config):
                self.graphs = DecodeGraphs(self._forward, self.device, config.max_batch_size,
                                           math.ceil(config.session_len / self.block_size) + 1,
                                           config.session_len)
                self.mixed_graphs = MixedGraphs(
                    self.model, self.kv_cache, self.device, self.dtype,
                    min(MIXED_GRAPH_TOKENS, config.max_prefill_tokens))

    @torch.inference_mode()
    def _compile_prompt_attention(self) -> None:
        """Runs layer 0's attention over one prompt of each query tile height the prefill
        kernel picks by a step's longest prompt chunk, so that Triton compiles those
        variants now and not when a served request first needs one (a stall of a second
        or more). It reads the cache and writes nothing."""
        i32 = dict(dtype=torch.int32, device=self.device)
        none = torch.zeros(0, dtype=torch.int64, device=self.device)
        attn = self.model.layers[0].self_attn
        for n in (16, 32, 64, 128):  # attention_prefill: 16 rows up to its launch's max
            blocks = -(-n // self.block_size)
            if blocks > self.num_blocks:
                break
            batch = ForwardBatch(
                input_ids=none, positions=none, slot_mapping=none, logits_indices=none,
                block_tables=torch.arange(blocks, **i32)[None], seq_lens=torch.tensor([n], **i32),
                query_start_loc=torch.tensor([0, n], **i32), max_query_len=n, max_seq_len=n)
            q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=self.dtype, device=self.device)
            self.model.attend(0, q, batch, self.kv_cache)

    def _count_blocks(self, per_block: int) -> int:
        c = self.config
        if c.cache_max_entry_count >= 1:
            return int(c.cache_max_entry_count)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            blocks = int(free * c.cache_max_entry_count // per_block)
        else:  # no allocator to ask: enough for every slot's whole session, within free RAM
            wanted = c.max_batch_size * math.ceil(c.session_len / self.block_size)
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            blocks = min(wanted, int(avail * c.cache_max_entry_count // per_block))
        if blocks < 1:
            raise ConfigError(f"no memory left for the KV cache ({per_block} bytes a block); raise "
                              f"--cache-max-entry-count or use more GPUs (--tp)")
        return blocks

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.model(batch, self.kv_cache)
        return self.model.compute_logits(hidden[batch.logits_indices])

    @torch.inference_mode()
    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """[S, vocab_size] float32 next-token logits, one row per batch.logits_indices entry.
        Decode batches replay a CUDA graph when there is one (the rows are then a view
        valid until the next step); other steps of up to MIXED_GRAPH_TOKENS tokens replay
        graphs in pieces, with attention run between them (mixed_graphs.py)."""
        if batch.fed_rows is not None:
            batch = self._feed(batch)
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        batch = batch.to(self.device, non_blocking=True)
        if self.mixed_graphs is not None and self.mixed_graphs.can_run(batch):
            hidden = self.mixed_graphs.run(batch)
            return self.model.compute_logits(hidden[batch.logits_indices])
        return self._forward(batch)

    def _feed(self, batch: ForwardBatch) -> ForwardBatch:
        """The batch with its pending input ids taken from the last step's samples, on
        the device (no host sync). Samples that every rank took alike (`follow`) are on
        every rank; rank 0's alone it broadcasts to the others."""
        last = self._last_sampled
        broadcast = self._fed_buffer is not None and not self._last_local
        if last is None and (self.group.rank == 0 or not broadcast):
            raise RuntimeError("a step feeds on sampled tokens, but this runner has sampled none")
        if broadcast:
            if self.group.rank == 0:
                self._fed_buffer[:last.shape[0]].copy_(last)
            last = self.group.broadcast(self._fed_buffer)
        rows = batch.fed_rows.to(self.device, non_blocking=True)
        known = batch.input_ids.to(self.device, non_blocking=True)
        fed = last.index_select(0, rows.clamp(min=0))
        return dataclasses.replace(batch, input_ids=torch.where(rows >= 0, fed, known),
                                   fed_rows=None)

    @torch.inference_mode()
    def step(self, batch: ForwardBatch, sampling: SamplingBatch | None) -> SamplerOutput | None:
        """Runs the batch and samples its logits rows on this device (None: nothing to sample)."""
        logits = self.execute(batch)
        if sampling is None:
            return None
        sampling = sampling.to(self.device, non_blocking=True).fill_pending(self._last_sampled)
        sampled = sample(logits, sampling)
        self._last_sampled = sampled.token_ids
        self._last_local = batch.sampled_by == SAMPLED_BY_ALL
        return sampled

    @torch.inference_mode()
    def follow(self, batch: ForwardBatch) -> None:
        """Ranks 1..: runs the batch rank 0 sent. Where every rank samples it alike
        (`mark_sampler`), takes the argmax of the logits, which every rank holds whole and
        bit for bit the same, as rank 0's sampler does: the next step's fed tokens are
        then here without a broadcast."""
        logits = self.execute(batch)
        if batch.sampled_by == SAMPLED_BY_ALL:
            self._last_sampled, self._last_local = logits.argmax(dim=-1), True
        elif batch.sampled_by == SAMPLED_BY_RANK0:
            self._last_sampled, self._last_local = None, False

    def submit_step(self, batch: ForwardBatch, sampling: SamplingBatch | None) -> "Launched":
        """`step`, returning once the work is queued on the device; the sampled tokens
        are copied to the host behind it (`Launched.result()` waits for them)."""
        return Launched.of(self.step(batch, sampling))


class Launched:
    """A step whose work is queued on the device (or done, on the CPU); its SamplerOutput
    is being copied to the host."""

    def __init__(self, sampled: SamplerOutput | None,
                 copied: "torch.cuda.Event | None" = None) -> None:
        self._sampled = sampled
        self._copied = copied

    @classmethod
    def of(cls, sampled: SamplerOutput | None) -> "Launched":
        """Starts copying a device SamplerOutput to (pinned) host memory."""
        if sampled is None or sampled.token_ids.device.type != "cuda":
            return cls(sampled)
        host = dataclasses.replace(sampled, **{
            f.name: _pinned_copy(getattr(sampled, f.name)) for f in dataclasses.fields(sampled)
            if isinstance(getattr(sampled, f.name), torch.Tensor)})
        copied = torch.cuda.Event()
        copied.record()
        return cls(host, copied)

    def done(self) -> bool:
        return self._copied is None or self._copied.query()

    def result(self) -> SamplerOutput | None:
        """The SamplerOutput on the host (None: nothing was sampled)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._sampled


@contextlib.contextmanager
def explain_capture_oom(config: EngineConfig):
    """Turns running out of device memory while capturing CUDA graphs (the KV cache
    took what they needed) into an error that says what to change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        share = config.cache_max_entry_count
        took = f"{share:g} of the free memory" if share < 1 else f"{int(share)} blocks"
        raise ConfigError(
            f"out of device memory while capturing CUDA graphs after the KV cache took {took}; "
            "lower --cache-max-entry-count, --max-batch-size or --max-prefill-tokens, or pass "
            "--eager-mode") from exc


def _pinned_copy(x: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued on the current stream (read it after the
    stream reaches an event recorded behind it)."""
    return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
