"""`tpserve chat [turbomind] MODEL`: a terminal chat over one session.

The session's KV cache stays between turns, so each turn encodes only the new
message. `end` starts a new session, `exit` (or end of input) quits, Ctrl-C
stops the reply being written and keeps the session.
"""
from __future__ import annotations

import argparse
import sys

from .cli import add_engine_flags, engine_options


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply at most")
    g.add_argument("--seed", type=int, default=None)


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Chat in the terminal. MODEL is a workspace, a Hugging Face "
                                   "folder or hub id; omitted = the bundled demo model. Type "
                                   "`end` for a new session, `exit` to quit.")
    p.add_argument("target", nargs="*", metavar="[turbomind] MODEL",
                   help="optional backend word `turbomind` (accepted, same engine), then the model")
    p.add_argument("--model-name", default=None, help="chat template (see `tpserve list`)")
    add_engine_flags(p)
    add_sampling_flags(p)
    p.set_defaults(run=run)


def model_from_target(target: list[str]) -> str | None:
    from ..engine.errors import ConfigError

    words = [w for w in target if w not in ("turbomind", "pytorch", "tpserve")]
    if len(words) > 1:
        raise ConfigError(f"chat takes one model, got {' '.join(words)}")
    return words[0] if words else None


class ChatSession:
    """One terminal conversation: turns in, streamed replies out."""

    def __init__(self, llm, params, out=sys.stdout) -> None:
        self.llm = llm
        self.params = params
        self.out = out
        self.session_id = 0
        self.turns = 0
        self.last_token: int | None = None
        self._request = 0

    def reset(self) -> None:
        self.llm.engine.end_session(self.session_id)
        self.session_id += 1
        self.turns = 0
        self.last_token = None

    def prompt_ids(self, text: str) -> list[int]:
        template, tok = self.llm.chat_template, self.llm.tokenizer
        if self.turns == 0:
            rendered = template.render([{"role": "user", "content": text}])
        else:
            ended = tok.decode([self.last_token]) if self.last_token is not None else ""
            rendered = template.next_turn(text, ended)
        return self.llm.encode(rendered, add_special_tokens=False)

    def reply(self, text: str) -> str:
        """Streams the reply to `text`; returns why it finished."""
        from ..engine.errors import RequestError

        engine = self.llm.engine
        ids = self.prompt_ids(text)
        self._request += 1
        request_id = f"chat-{self.session_id}-{self._request}"
        try:
            engine.add_request(request_id, ids, self.params, session_id=self.session_id,
                               keep_session=True)
        except RequestError as exc:
            self.out.write(f"[{exc}]\n[the session is full: type `end` to start a new one]\n")
            return "length"
        finish = None
        try:
            while finish is None:
                for out in engine.step():
                    if out.request_id != request_id:
                        continue
                    self.out.write(out.delta_text)
                    self.out.flush()
                    if out.token_ids:
                        self.last_token = out.token_ids[-1]
                    finish = out.finish_reason
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            finish = "abort"
        self.turns += 1
        self.out.write("\n")
        if finish == "length" and self._session_full():
            self.out.write("[the session length is exhausted: type `end` to start a new one]\n")
        return finish

    def _session_full(self) -> bool:
        used = len(self.llm.engine.scheduler.session_context(self.session_id))
        return used + 8 >= self.llm.session_len


def run(args: argparse.Namespace) -> int:
    from ..engine.llm import LLM
    from ..engine.sampling_params import SamplingParams

    llm = LLM(model_from_target(args.target), tp=args.tp, dtype=args.dtype,
              model_name=args.model_name, **engine_options(args))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            repetition_penalty=args.repetition_penalty)
    chat = ChatSession(llm, params)
    interactive = sys.stdin.isatty()
    print(f"tpserve chat: {llm.workspace.name} ({llm.model_name} template). "
          "Type `end` for a new session, `exit` to quit.")
    while True:
        try:
            text = input("\ndouble enter to end input >>> " if interactive else "\n>>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if interactive:
            text = _read_more(text)
        command = text.strip()
        if command == "exit":
            break
        if command == "end":
            chat.reset()
            print("[new session]")
            continue
        if command:
            chat.reply(text)
    llm.shutdown()
    return 0


def _read_more(first: str) -> str:
    """Multi-line input as in LMDeploy: an empty line ends it."""
    lines = [first]
    while lines[-1] != "" and first.strip() not in ("end", "exit"):
        try:
            lines.append(input())
        except EOFError:
            break
    return "\n".join(lines).strip()
