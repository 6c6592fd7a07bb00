"""The words of the language: `gen`, `select`, roles, `image`, and the backend helpers."""

from __future__ import annotations

from typing import Any

import loom.lang.choices as _choices
import loom.lang.ir as ir
from loom.lang.program import get_default_backend


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
        frequency_penalty: float | None = None, presence_penalty: float | None = None, ignore_eos: bool | None = None,
        return_logprob: bool | None = None, logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype: Any = None, choices: list[str] | None = None,
        choices_method: Any = None, regex: str | None = None, json_schema: str | dict | None = None) -> ir.Expr:  # fmt: skip
    """Generate text into the variable `name`. Unset knobs take the run's defaults.

    choices=[...] makes it a `select`; dtype (int, float, bool, str) and regex / json_schema
    constrain what can be generated."""
    if choices is not None:
        return select(name, choices, temperature=temperature or 0.0,
                      choices_method=choices_method or _choices.token_length_normalized)  # fmt: skip
    if regex is not None and dtype is not None:
        raise ValueError("gen(): give dtype or regex, not both")
    params = ir.SamplingParams(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, stop=stop, stop_token_ids=stop_token_ids,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, dtype=dtype, regex=regex, json_schema=json_schema,
    )  # fmt: skip
    return ir.Gen(name, params)


def gen_int(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    """An integer (as text): `gen(dtype=int)`."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: str | None = None, max_tokens: int | None = None, **kwargs: Any) -> ir.Expr:
    """A double-quoted string of words: `gen(dtype=str)`."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: Any = _choices.token_length_normalized) -> ir.Expr:  # fmt: skip
    """Append the most likely of `choices` (by `choices_method`, see loom.lang.choices) into `name`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"select(): choices must be a non-empty list of non-empty strings, got {choices!r}")
    return ir.Select(name, tuple(choices), temperature, _choices.resolve(choices_method))


def image(path_or_url: str) -> ir.Expr:
    """An image for a vision-language model (a clear error on a text-only model)."""
    return ir.Image(str(path_or_url))


def _role(role: str, expr: ir.ExprLike | None) -> ir.Expr:
    if expr is None:
        return ir.RoleBegin(role) + ir.RoleEnd(role)
    return ir.RoleBegin(role) + expr + ir.RoleEnd(role)


def system(expr: ir.ExprLike | None = None) -> ir.Expr:
    return _role("system", expr)


def user(expr: ir.ExprLike | None = None) -> ir.Expr:
    return _role("user", expr)


def assistant(expr: ir.ExprLike | None = None) -> ir.Expr:
    return _role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")


def flush_cache(backend: Any = None) -> None:
    """Empty the server's prefix cache (the default backend's unless one is given)."""
    backend = backend or get_default_backend()
    if backend is None:
        raise ValueError("flush_cache(): no backend given and no default backend set")
    backend.flush_cache()


def get_server_info(backend: Any = None) -> dict[str, Any]:
    backend = backend or get_default_backend()
    return dict(getattr(backend, "model_info", {}))
