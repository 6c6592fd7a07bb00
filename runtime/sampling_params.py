"""Per-request sampling parameters: what a client may ask for, checked at the door.

`SamplingParams.from_dict` is the one way in from the wire (SGLang's `/generate` dict, the
offline `Engine.generate(sampling_params=...)`): it maps SGLang's aliases, turns `None` into
the default (SGLang clients send explicit nulls), normalises the friendly forms (`stop` as one
string, `json_schema` as a dict) and validates. `to_dict` is its inverse, and is what travels
to the scheduler (msgpack-able, no torch: the front-end language imports this module too).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from loom.runtime.protocol import RequestError

# Temperatures below this count as 0 (greedy), as in SGLang: dividing logits by a smaller
# number overflows fp32 and gains nothing over argmax.
GREEDY_TEMPERATURE_EPS = 1e-6
# `max_new_tokens: null` means "until the context is full" (SGLang); the front clamps this to
# the room left after the prompt.
MAX_NEW_TOKENS_UNLIMITED = 2**31 - 1

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_GRAMMAR_KEYS = ("regex", "json_schema", "ebnf", "lark")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")

# Keys SGLang's clients send that Loom maps onto its own fields.
_ALIASES = {"sampling_seed": "seed"}
# Keys SGLang's clients send that Loom understands but does not implement: accepted while they
# ask for nothing (None or empty), refused with the reason otherwise.
_UNSUPPORTED = {
    "stop_regex": "stop_regex is not supported; use `stop` with plain strings",
    "structural_tag": "structural_tag is not supported; use `json_schema`, `regex`, `ebnf` or `lark`",
    "logit_bias": "logit_bias is not supported",
    "custom_params": "custom_params needs a custom logit processor, which Loom does not support",
}
# Keys accepted and deliberately ignored because they cannot change what is generated.
_IGNORED = {"stream_interval"}
# Names from other APIs, pointed at Loom's.
_HINTS = {"max_tokens": "max_new_tokens", "stop_sequences": "stop", "random_seed": "seed"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fail(name: str, expected: str, got: Any) -> RequestError:
    return RequestError(f"sampling_params.{name} must be {expected}, got {got!r}", f"sampling_params.{name}")


@dataclass(slots=True)
class SamplingParams:
    """What one request asks of the sampler and of the stop checks.

    Constructing one directly does not validate (call `validate`); `from_dict` does both.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # a single str is accepted -> [str]
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None  # same seed + same prompt + same params => same output
    n: int = 1
    regex: str | None = None
    json_schema: str | None = None  # a JSON string; a dict is accepted -> json.dumps
    ebnf: str | None = None  # GBNF, start rule `root`
    lark: str | None = None  # Lark grammar syntax, start rule `start`

    def __post_init__(self) -> None:
        # Friendly forms -> canonical ones. Wrong types are left for `validate` to name.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        elif isinstance(self.stop_token_ids, (set, frozenset)):
            self.stop_token_ids = sorted(self.stop_token_ids)
        if isinstance(self.json_schema, dict):
            self.json_schema = json.dumps(self.json_schema)

    # ------------------------------------------------------------------ wire
    @classmethod
    def from_dict(cls, d: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        """Build from a client's dict and validate it (without a vocabulary size; the front calls
        `validate(vocab_size)` again once it knows it).

        Raises RequestError (a ValueError) naming the offending key (its `param`) for an unknown
        key, a wrong type or a value out of range.
        """
        if d is None:
            d = {}
        elif isinstance(d, SamplingParams):
            d = d.to_dict()
        elif not isinstance(d, dict):
            raise RequestError(f"sampling_params must be a dict, got {type(d).__name__}", "sampling_params")
        known = _field_names()
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise RequestError(f"sampling_params keys must be strings, got {key!r}", "sampling_params")
            if key in _ALIASES:
                target = _ALIASES[key]
                if value is not None and d.get(target) is not None and d[target] != value:
                    raise RequestError(f"sampling_params.{key} and sampling_params.{target} disagree ({value!r} vs {d[target]!r})",
                                       f"sampling_params.{key}")  # fmt: skip
                if value is not None:
                    kwargs[target] = value
                continue
            if key in _UNSUPPORTED:
                if value not in (None, "", [], {}):
                    raise RequestError(f"sampling_params.{_UNSUPPORTED[key]}, got {value!r}", f"sampling_params.{key}")
                continue
            if key in _IGNORED:
                if value is not None and not (_is_int(value) and value >= 1):
                    raise _fail(key, "an int >= 1 or null", value)
                continue
            if key not in known:
                raise RequestError(_unknown_key_message(key, known), f"sampling_params.{key}")
            if value is None:
                if key == "max_new_tokens":
                    kwargs[key] = MAX_NEW_TOKENS_UNLIMITED
                continue  # null means "the default", as SGLang's clients send it
            kwargs[key] = value
        params = cls(**kwargs)
        params.validate()
        for name in _FLOAT_FIELDS:  # 0 and 1 arrive as ints from JSON
            setattr(params, name, float(getattr(params, name)))
        return params

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain msgpack-able values; `from_dict(p.to_dict()) == p`."""
        return asdict(self)

    # ------------------------------------------------------------------ checks
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise RequestError (naming the parameter and what was expected) unless every field has
        the right type and range; token ids are checked against `vocab_size` when given."""
        self._check_int("max_new_tokens", lo=0)
        self._check_int("min_new_tokens", lo=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise _fail("min_new_tokens", f"<= max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)
        self._check_number("temperature", "a number >= 0", lambda v: v >= 0)
        self._check_number("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _fail("top_k", "an int: -1 or 0 (disabled) or >= 1", self.top_k)
        self._check_number("min_p", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self._check_number("frequency_penalty", "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        self._check_number("presence_penalty", "a number in [-2, 2]", lambda v: -2 <= v <= 2)
        self._check_number("repetition_penalty", "a number in (0, 2] (1 = no penalty)", lambda v: 0 < v <= 2)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise _fail("stop", "a non-empty string or a list of non-empty strings", self.stop)
        self._check_token_ids(vocab_size)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool", getattr(self, name))
        if self.seed is not None and not (_is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]):
            raise _fail("seed", "an int in [-2**63, 2**64) or null", self.seed)
        self._check_int("n", lo=1)
        self._check_grammar()

    def _check_int(self, name: str, lo: int) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < lo:
            raise _fail(name, f"an int >= {lo}", value)

    def _check_number(self, name: str, expected: str, in_range: Any) -> None:
        value = getattr(self, name)
        try:
            ok = _is_number(value) and math.isfinite(value) and in_range(value)
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise _fail(name, expected, value)

    def _check_token_ids(self, vocab_size: int | None) -> None:
        ids = self.stop_token_ids
        upper = f" and < {vocab_size} (the vocabulary size)" if vocab_size is not None else ""
        if not isinstance(ids, list):
            raise _fail("stop_token_ids", f"a list of ints >= 0{upper}", ids)
        for t in ids:
            if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise RequestError(f"sampling_params.stop_token_ids must hold ints >= 0{upper}, got {t!r} in {ids!r}",
                                   "sampling_params.stop_token_ids")  # fmt: skip

    def _check_grammar(self) -> None:
        given = [k for k in _GRAMMAR_KEYS if getattr(self, k) is not None]
        for key in given:
            if not isinstance(getattr(self, key), str):
                raise _fail(key, "a string or null", getattr(self, key))
        if len(given) > 1:
            raise RequestError(f"sampling_params: at most one of {', '.join(_GRAMMAR_KEYS)} may be set, got {', '.join(given)}",
                               f"sampling_params.{given[1]}")  # fmt: skip
        for key in ("ebnf", "lark"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise _fail(key, "a non-empty grammar", getattr(self, key))
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise RequestError(f"sampling_params.json_schema must be valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                                   "sampling_params.json_schema") from None  # fmt: skip
            if not isinstance(schema, (dict, bool)):
                raise _fail("json_schema", "a JSON object (or true/false)", self.json_schema)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SamplingParams))


def _unknown_key_message(key: str, known: tuple[str, ...]) -> str:
    guess = _HINTS.get(key) or next(iter(difflib.get_close_matches(key, known, n=1)), None)
    hint = f"; did you mean '{guess}'?" if guess else ""
    return f"unknown sampling parameter '{key}'{hint} (expected one of: {', '.join(known)})"
