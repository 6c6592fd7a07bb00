"""OpenAI request bodies -> Loom's sampling params and prompts, checked field by field.

Every mistake raises `RequestError` naming the field as the client spelled it (`temperature`,
`messages[2].role`, `response_format.json_schema`), also for what Loom's own layers find later:
`openai_error` renames their `sampling_params.*` fields. Fields that would change the result but
are not implemented (`best_of` > 1, `suffix`, `echo`, `tools`) are refused, never ignored.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from loom.runtime.protocol import MAX_N, RequestError

_COMMON = {
    "model", "stream", "stream_options", "n", "stop", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "seed", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "user",
    # SGLang's extras (extra_body)
    "top_k", "min_p", "ignore_eos", "repetition_penalty", "min_tokens", "stop_token_ids", "skip_special_tokens",
    "no_stop_trim", "regex", "ebnf", "lark", "json_schema", "rid",
}  # fmt: skip
COMPLETION_KEYS = frozenset(_COMMON | {"prompt", "echo", "suffix", "best_of"})
CHAT_KEYS = frozenset(_COMMON | {"messages", "response_format", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"})
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "name"})
MAX_LOGPROBS = 20

# OpenAI's name -> Loom's sampling parameter; the rest keep their names.
_RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
_SAMPLING_KEYS = (
    "temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty", "top_k", "min_p", "ignore_eos",
    "repetition_penalty", "min_tokens", "stop_token_ids", "skip_special_tokens", "no_stop_trim", "regex", "ebnf", "lark",
    "json_schema",
)  # fmt: skip
# Template variables the server sets itself, or that would hand the client the template.
_RESERVED_TEMPLATE_VARS = frozenset({
    "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template", "tokenize",
    "return_dict", "return_assistant_tokens_mask", "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception",
    "strftime_now",
})  # fmt: skip


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expect(body: dict, key: str, ok: bool, expected: str) -> None:
    if not ok:
        raise RequestError(f"{key} must be {expected}, got {body[key]!r}", key)


def _check_types(body: dict) -> None:
    """The type of every field the OpenAI routes read themselves (Loom's sampling params check
    the rest, and `openai_error` names them as the client did)."""
    checks = {
        "model": (lambda v: isinstance(v, str), "a string"),
        "stream": (lambda v: isinstance(v, bool), "a bool"),
        "stream_options": (lambda v: isinstance(v, dict), "an object"),
        "n": (lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an int in [1, {MAX_N}]"),
        "max_tokens": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        "max_completion_tokens": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        "user": (lambda v: isinstance(v, str), "a string"),
        "rid": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        "best_of": (lambda v: _is_int(v), "an int"),
        "echo": (lambda v: isinstance(v, bool), "a bool"),
        "suffix": (lambda v: isinstance(v, str), "a string"),
        "tools": (lambda v: isinstance(v, list), "a list"),
        "parallel_tool_calls": (lambda v: isinstance(v, bool), "a bool"),
        "response_format": (lambda v: isinstance(v, dict), "an object"),
        "chat_template_kwargs": (lambda v: isinstance(v, dict), "an object"),
        "messages": (lambda v: isinstance(v, list) and bool(v), "a non-empty list of {role, content} objects"),
    }
    for key, (ok, expected) in checks.items():
        if body.get(key) is not None:
            _expect(body, key, ok(body[key]), expected)


def sampling_from_openai(body: dict, allowed: frozenset[str]) -> dict[str, Any]:
    """OpenAI request fields -> Loom sampling params (without n). RequestError names a bad,
    unknown or unsupported field."""
    unknown = set(body) - allowed
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
    _check_types(body)
    options = body.get("stream_options")
    if options is not None:
        if not body.get("stream"):
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        extra = set(options) - {"include_usage"}
        if extra:
            raise RequestError(f"stream_options has unknown field(s) {sorted(extra)}", f"stream_options.{sorted(extra)[0]}")
        if not isinstance(options.get("include_usage", False), bool):
            raise RequestError(f"stream_options.include_usage must be a bool, got {options['include_usage']!r}",
                               "stream_options.include_usage")  # fmt: skip
    if body.get("best_of") not in (None, 1):
        raise RequestError(f"best_of must be 1 (Loom does not rank several samples), got {body['best_of']!r}", "best_of")
    if body.get("suffix"):
        raise RequestError("suffix is not supported (no fill-in-the-middle)", "suffix")
    if body.get("echo"):
        raise RequestError("echo is not supported", "echo")
    if body.get("tools"):
        raise RequestError("tools are not supported", "tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise RequestError(f"tool_choice must be 'none' or 'auto' (tools are not supported), got {body['tool_choice']!r}",
                           "tool_choice")  # fmt: skip
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params: dict[str, Any] = {"max_new_tokens": max_tokens}
    for key in _SAMPLING_KEYS:
        if body.get(key) is not None:
            params[_RENAMED.get(key, key)] = body[key]
    return params


def n_of(body: dict) -> int:
    return 1 if body.get("n") is None else body["n"]


def completion_logprobs(body: dict) -> int | None:
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError(f"logprobs must be an int in [0, {MAX_LOGPROBS}], got {logprobs!r}", "logprobs")
    if body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs belongs to chat completions; here `logprobs` is the number of top tokens", "top_logprobs")
    return logprobs


def chat_logprobs(body: dict) -> int | None:
    """How many top tokens to return per position (0: only the chosen one), or None: no logprobs."""
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(f"logprobs must be a bool, got {logprobs!r}", "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise RequestError(f"top_logprobs must be an int in [0, {MAX_LOGPROBS}], got {top!r}", "top_logprobs")
        if not logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if logprobs else None


def completion_prompts(body: dict) -> list[Any]:
    """`prompt` -> a list of prompts: strings, or token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if all(_is_int(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return prompt
    raise RequestError("prompt must be a string, a non-empty list of strings, or token ids (a list of ints, or of lists "
                       f"of ints), got {_short(prompt)}", "prompt")  # fmt: skip


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """`messages`, checked, with text parts joined into one string per message."""
    out = []
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with `role` and `content`, got {_short(m)}", f"messages[{i}]")
        extra = sorted(set(m) - MESSAGE_KEYS)
        if extra:
            raise RequestError(f"messages[{i}] has unknown field(s) {extra}; expected some of {sorted(MESSAGE_KEYS)}",
                               f"messages[{i}].{extra[0]}")  # fmt: skip
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {_short(role)}", f"messages[{i}].role")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise RequestError(f"messages[{i}].name must be a string, got {_short(m['name'])}", f"messages[{i}].name")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"{where} must be a text part {{type: 'text', text: string}} (only text is supported), "
                                       f"got {_short(part)}", where)  # fmt: skip
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        elif content is None:  # an assistant's turn without text (or a message without content): empty
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts, got {_short(content)}",
                               f"messages[{i}].content")  # fmt: skip
        out.append(m)
    return out


def response_format_schema(body: dict) -> dict | None:
    """The JSON Schema `response_format` asks for, or None (text)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise RequestError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {_short(kind)}",
                           "response_format.type")  # fmt: skip
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError(f"response_format.json_schema must be an object {{name, schema}}, got {_short(spec)}",
                           "response_format.json_schema")  # fmt: skip
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise RequestError(f"response_format.json_schema.schema must be an object, got {_short(schema)}",
                           "response_format.json_schema.schema")  # fmt: skip
    if body.get("json_schema") is not None:
        raise RequestError("give the schema once: response_format or json_schema, not both", "json_schema")
    return schema


def template_kwargs(body: dict, chat_template: Any) -> dict[str, Any]:
    """`chat_template_kwargs`, restricted to the variables the model's own chat template reads
    (as vLLM does; e.g. Qwen3's `enable_thinking`), with plain JSON values. A template sent by
    the client, or a key the template does not know, is refused: the client never supplies code."""
    kwargs = body.get("chat_template_kwargs") or {}
    known = template_variables(chat_template if isinstance(chat_template, str) else "") - _RESERVED_TEMPLATE_VARS
    for key, value in kwargs.items():
        where = f"chat_template_kwargs.{key}"
        if key == "chat_template":
            raise RequestError("the server renders the model's own chat template; it does not take one from a request", where)
        if key not in known:
            accepted = f"it accepts {sorted(known)}" if known else "it accepts none"
            raise RequestError(f"{where} is not a variable of this model's chat template; {accepted}", where)
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise RequestError(f"{where} must be a string, a number, a bool or null, got {type(value).__name__}", where)
    return kwargs


@functools.lru_cache(maxsize=8)
def template_variables(template: str) -> frozenset[str]:
    """The undeclared variables of a Jinja chat template (what a caller may pass it)."""
    if not template:
        return frozenset()
    import jinja2
    import jinja2.ext
    import jinja2.meta
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols, jinja2.ext.do])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:
        return frozenset()


def openai_error(exc: RequestError, prompt_name: str, used: dict[str, Any]) -> RequestError:
    """A RequestError from Loom's own layers, renamed into the OpenAI body's fields:
    `sampling_params.temperature` -> `temperature`, `text` / `input_ids` -> `prompt` or `messages`."""
    param = exc.param
    if param is None:
        return exc
    loom_name = param.removeprefix("sampling_params.")
    if loom_name in ("max_new_tokens", "min_new_tokens"):
        name = {"max_new_tokens": "max_completion_tokens" if "max_completion_tokens" in used else "max_tokens",
                "min_new_tokens": "min_tokens"}[loom_name]  # fmt: skip
    elif loom_name == "json_schema" and used.get("response_format") is not None:
        name = "response_format"
    elif param.partition("[")[0] in ("text", "input_ids"):
        name = prompt_name
    else:
        name = loom_name
    if name == param:
        return exc
    renamed = RequestError(re.sub(rf"(?<![\w.]){re.escape(param)}(?!\w)", name, str(exc)), name, exc.status)
    for attr, value in vars(exc).items():  # keeps the metrics' mark of a counted call
        if attr not in ("param", "status"):
            setattr(renamed, attr, value)
    return renamed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
