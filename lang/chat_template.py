"""Chat roles from the model's own Jinja chat template.

A program writes `s += user("hi")` one role at a time, but a Hugging Face chat template renders a
whole conversation. We split the template into per-role prefixes and suffixes by rendering short
conversations whose contents are unique sentinels and cutting around them: the text after the
sentinel of the last message is its role's suffix, the text a new message adds before its sentinel
is its role's prefix. Whatever the template puts before a conversation that does not open with a
system message (a default system prompt, a BOS token) is the `preamble`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
_SENTINEL = {"system": "\x00LOOM-SYS\x00", "user": "\x00LOOM-USER\x00", "assistant": "\x00LOOM-ASSISTANT\x00"}


class ChatTemplateError(ValueError):
    """The model's chat template cannot be split into per-role prefixes and suffixes."""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    preamble: str = ""  # before the first message when it is not a system message
    source: str = "plain"

    def role_prefix(self, role: str) -> str:
        if role not in self.prefix:
            raise ChatTemplateError(f"the model's chat template ({self.source}) has no {role!r} role; it renders {sorted(self.prefix)}")
        return self.prefix[role]

    def role_suffix(self, role: str) -> str:
        return self.suffix.get(role, "")


# For models without a chat template: plain "ROLE: content" lines, readable by any base model.
PLAIN = ChatTemplate(
    prefix={"system": "SYSTEM: ", "user": "USER: ", "assistant": "ASSISTANT: "},
    suffix={"system": "\n", "user": "\n", "assistant": "\n"},
)
# For backends that take messages, not text (OpenAI): roles add no text of their own.
EMPTY = ChatTemplate(prefix={r: "" for r in ROLES}, suffix={r: "" for r in ROLES}, source="messages")


def from_model_info(info: dict[str, Any]) -> ChatTemplate:
    """The roles of the template `/get_model_info` reports; PLAIN when it reports none."""
    template = info.get("chat_template")
    if not template:
        return PLAIN
    return from_jinja(template, bos_token=info.get("bos_token") or "", eos_token=info.get("eos_token") or "")


def from_jinja(template: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    """Split a Hugging Face chat template into role prefixes and suffixes (see the module doc).

    Raises ChatTemplateError when the template cannot render a user turn, or when rendering
    a longer conversation changes the text of a shorter one (then roles cannot be added one by one)."""
    import jinja2
    import jinja2.sandbox

    # The environment Transformers renders chat templates in, so the text matches apply_chat_template.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    compiled = env.from_string(template)

    def render(roles: list[str]) -> str | None:
        messages = [{"role": r, "content": _SENTINEL[r]} for r in roles]
        try:
            return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                   add_generation_prompt=False, raise_exception=raise_exception)  # fmt: skip
        except Exception:  # the template refuses this conversation (say, a system turn)
            return None

    prefix: dict[str, str] = {}
    suffix: dict[str, str] = {}

    def cut(shorter: str, longer: str, role: str) -> None:
        if not longer.startswith(shorter):
            raise ChatTemplateError(
                f"the chat template re-renders earlier turns when a {role!r} turn is added, so roles cannot be "
                "emitted one at a time; pass a template whose turns are independent"
            )
        added = longer[len(shorter):]
        head, sep, tail = added.partition(_SENTINEL[role])
        if not sep:
            raise ChatTemplateError(f"the chat template drops the content of a {role!r} turn")
        prefix[role], suffix[role] = head, tail

    user_only = render(["user"])
    if user_only is None or _SENTINEL["user"] not in user_only:
        raise ChatTemplateError("the chat template cannot render a conversation of one user message")
    system_only = render(["system"])
    if system_only is not None and _SENTINEL["system"] in system_only:
        cut("", system_only, "system")
        system_user = render(["system", "user"])
        if system_user is None:
            raise ChatTemplateError("the chat template cannot render a system turn followed by a user turn")
        cut(system_only, system_user, "user")
        full = render(["system", "user", "assistant"])
        if full is None:
            raise ChatTemplateError("the chat template cannot render a user turn followed by an assistant turn")
        cut(system_user, full, "assistant")
    else:  # no system role: a user turn after an assistant turn shows the user prefix mid-conversation
        user_assistant = render(["user", "assistant"])
        again = render(["user", "assistant", "user"])
        if user_assistant is None or again is None:
            raise ChatTemplateError("the chat template cannot render user and assistant turns in alternation")
        cut(user_only, user_assistant, "assistant")
        cut(user_assistant, again, "user")
    turn = prefix["user"] + _SENTINEL["user"] + suffix["user"]
    preamble = user_only[: -len(turn)] if user_only.endswith(turn) else ""
    return ChatTemplate(prefix=prefix, suffix=suffix, preamble=preamble, source="chat_template")
