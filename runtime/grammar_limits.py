"""How large a grammar a request may send, and how long its compile may take.

The numbers live here, apart from the grammar code (runtime/constrained/limits.py checks a source
against them), so that `ServerArgs` can offer each as an engine argument and `loom serve` flag
(`grammar_max_string_length` / `--grammar-max-string-length`, ...) without importing the grammar
compilers, and torch with them, into the front's process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """Bounds on what one grammar may ask for. The defaults admit every schema of JSONSchemaBench
    (lengths up to 65,535, 1,000 items, patterns with `{255}`, nesting 22 deep) and refuse what
    would take more than seconds to compile. ValueError names a value that is not > 0."""

    max_source_chars: int = 2_000_000  # the grammar's text (MaskBench's largest schema: 167k)
    max_string_length: int = 65_536  # minLength / maxLength
    max_items: int = 1_000  # minItems / maxItems
    max_repeat: int = 10_000  # a {m,n} count in a regex or a `pattern`
    max_regex_size: int = 200_000  # the atoms a regex expands to once its repetitions are unrolled
    max_nesting: int = 128  # nested schemas / groups
    compile_timeout_s: float = 10.0  # a compile past this stops and its requests are answered 400

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{flag_name(f.name)} must be a number > 0, got {value!r}")


def flag_name(limit: str) -> str:
    """The `loom serve` flag that sets GrammarLimits field `limit`."""
    return "--grammar-" + limit.replace("_", "-")


LIMIT_NAMES = tuple(f.name for f in fields(GrammarLimits))
