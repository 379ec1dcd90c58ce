"""Chat templates: the tokenizer's own Jinja template, or a built-in one under
LMDeploy's model names. Both are Jinja, rendered the way transformers does,
so one mechanism serves whole conversations and the next turn of a session.
"""
from __future__ import annotations

from dataclasses import dataclass

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError

_CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m.role != 'system' and default_system %}"
    "<|im_start|>system\n{{ default_system }}<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

BUILTIN_TEMPLATES: dict[str, tuple[str, str]] = {
    # name: (jinja source, default system prompt)
    "internlm-chat-7b": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'system' %}<|System|>:{{ m.content }}\n"
        "{% elif m.role == 'user' %}<|User|>:{{ m.content }}\n"
        "{% else %}<|Bot|>:{{ m.content }}<eoa>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|Bot|>:{% endif %}", ""),
    "internlm2-chat-7b": (
        "{{ bos_token }}" + _CHATML,
        "You are an AI assistant whose name is InternLM (书生·浦语)."),
    "qwen-7b": (_CHATML, "You are a helpful assistant."),
    "llama2": (
        "{% set sys = namespace(text=default_system) %}"
        "{% for m in messages %}{% if m.role == 'system' %}{% set sys.text = m.content %}"
        "{% elif m.role == 'user' %}{{ bos_token }}[INST] "
        "{% if sys.text %}<<SYS>>\n{{ sys.text }}\n<</SYS>>\n\n{% set sys.text = '' %}{% endif %}"
        "{{ m.content }} [/INST]"
        "{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}", ""),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", ""),
    "vicuna": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if loop.first and m.role != 'system' %}{{ default_system }} {% endif %}"
        "{% if m.role == 'system' %}{{ m.content }} "
        "{% elif m.role == 'user' %}USER: {{ m.content }} "
        "{% else %}ASSISTANT: {{ m.content }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."),
    "base": (
        "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}"
        "{% endfor %}", ""),
}
AUTO = "auto"  # the tokenizer's own template, else "base"


def template_names() -> list[str]:
    return [AUTO, *BUILTIN_TEMPLATES]


def check_template_name(name: str) -> None:
    if name not in BUILTIN_TEMPLATES and name != AUTO:
        raise ConfigError(f"unknown model name {name!r} (it picks the chat template); choose one "
                          f"of: {', '.join(template_names())} (see `tpserve list`)")


_SENTINEL = "\x00tpserve-reply\x00"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str
    default_system: str = ""
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        env.globals["raise_exception"] = _raise
        try:
            return env.from_string(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
                default_system=self.default_system)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"the chat template {self.name!r} failed on these messages: {exc}")

    def next_turn(self, user: str, previous_reply_ended: str = "") -> str:
        """The text that continues a session after the assistant's last reply:
        whatever the template puts after a reply, then the new user turn and
        the generation prompt. `previous_reply_ended` is the text of the
        token that ended the reply (already in the session), dropped here."""
        history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
                   {"role": "user", "content": user}]
        text = self.render(history, add_generation_prompt=True)
        tail = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else text
        if previous_reply_ended and tail.startswith(previous_reply_ended):
            tail = tail[len(previous_reply_ended):]
        return tail


def _raise(message: str) -> None:
    raise ConfigError(f"chat template error: {message}")


def select_template(name: str, tokenizer) -> ChatTemplate:
    """The template a workspace's model name selects, given its tokenizer."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if name in BUILTIN_TEMPLATES:
        source, system = BUILTIN_TEMPLATES[name]
        return ChatTemplate(name, source, system, bos, eos)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own:
        return ChatTemplate("tokenizer", own, "", bos, eos)
    source, system = BUILTIN_TEMPLATES["base"]
    return ChatTemplate("base", source, system, bos, eos)
