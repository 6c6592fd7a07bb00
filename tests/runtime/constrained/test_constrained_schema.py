"""schema.py's normaliser where outlines-core alone goes wrong: `allOf` under a closed parent,
required names that `properties` does not declare, any-value properties, and string `pattern`s
holding characters JSON must escape. Checked on the regex (Python's `re`) and by random walks on a
one-byte-per-token vocabulary, whose outputs must parse and validate."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom.runtime.constrained import GrammarBackend, GrammarError, schema_to_regex

from byte_vocab import BYTES, EOS, V, walk


@pytest.fixture(scope="module")
def backend() -> GrammarBackend:
    return GrammarBackend(BYTES, V, frozenset({EOS}))


def assert_walks_validate(backend: GrammarBackend, schema: dict, n: int = 12) -> list:
    values = []
    for seed in range(n):
        text = walk(backend, schema, seed)
        if text is None:
            continue
        value = json.loads(text.decode("utf-8"))  # valid JSON, whatever the walk picked
        jsonschema.Draft202012Validator(schema).validate(value)
        values.append(value)
    assert values, "no walk finished"
    return values


# ----------------------------------------------------------------------------- allOf


def test_allof_under_a_closed_parent_drops_what_the_parent_excludes(backend):
    schema = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "additionalProperties": False,
        "allOf": [{"properties": {"id": {"maxLength": 3}, "extra": {"type": "boolean"}}, "required": ["id"]}],
    }
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"id": "abc", "n": 4}')
    assert not regex.fullmatch('{"id": "abc", "extra": true}')  # the parent is closed: extra is not allowed
    assert not regex.fullmatch('{"id": "abcd"}')  # the part's maxLength applies to the parent's id
    assert not regex.fullmatch('{"n": 4}')  # the part's required applies
    assert_walks_validate(backend, schema)


def test_allof_requiring_what_a_closed_parent_excludes_is_refused():
    schema = {"type": "object", "additionalProperties": False,
              "allOf": [{"properties": {"id": {"type": "string"}}, "required": ["id"]}]}  # fmt: skip
    with pytest.raises(GrammarError, match="admits no object: 'id' is required.*'additionalProperties': false"):
        schema_to_regex(json.dumps(schema))


def test_allof_with_a_closed_part_and_an_open_parent():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "allOf": [{"properties": {"a": {}}, "additionalProperties": False}]}  # fmt: skip
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"a": 1}')
    assert not regex.fullmatch('{"a": 1, "b": 2}')  # the closed part does not declare b
    assert not regex.fullmatch('{"a": "x"}')  # the parent's type for a still applies


# ----------------------------------------------------------------------------- required, any value


def test_required_names_missing_from_properties_are_emitted(backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"a": 1, "b": "x"}')
    assert not regex.fullmatch('{"a": 1}')
    assert_walks_validate(backend, schema)


def test_empty_properties_leave_the_object_open():
    regex = re.compile(schema_to_regex(json.dumps({"type": "object", "properties": {}})))
    assert regex.fullmatch('{"a": 1}') and regex.fullmatch("{}")
    closed = re.compile(schema_to_regex(json.dumps({"type": "object", "properties": {}, "additionalProperties": False})))
    assert closed.fullmatch("{}") and not closed.fullmatch('{"a": 1}')


def test_any_value_properties_stay_inside_their_object():
    schema = {"type": "object", "properties": {"x": {}, "y": True}, "required": ["x", "y"]}
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"x": null, "y": [1, "a"]}')
    assert not regex.fullmatch("null")  # outlines-core alone: its `|` split the object's regex
    assert not regex.fullmatch('{"x": true')


# ----------------------------------------------------------------------------- patterns


PATTERNS = [
    "^a\nb$",  # a raw newline in the pattern
    "^a\\nb$",  # the regex escape for it
    "^x\tz\u0001$",  # a raw tab and U+0001
    "^[\\x00-\\x1f]{1,3}$",  # control characters only
    '^"[a-z]{1,3}\\\\$',  # a quote and a backslash
    "^a[^x]b$",  # a negated class admits '"', '\\' and control characters
    "^.{1,4}$",
    "^(\\s|-){2}[0-9]+$",
    "[a-z]",  # unanchored: anything around
    "^ab",  # anchored at the start only
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_yield_valid_json_that_matches(backend, pattern):
    schema = {"type": "string", "pattern": pattern}
    for value in assert_walks_validate(backend, schema):
        assert re.search(pattern, value)


def test_pattern_escapes_are_the_ones_json_writes():
    regex = re.compile(schema_to_regex(json.dumps({"type": "string", "pattern": "^a\nb\u0001\"\\\\$"})))
    assert regex.fullmatch(json.dumps('a\nb\u0001"\\'))  # "a\nb\u0001\"\\"
    assert regex.fullmatch('"a\\u000Ab\\u0001\\u0022\\u005c"')  # the \u forms, either case
    assert not regex.fullmatch('"a\nb\\u0001\\"\\\\"')  # a raw newline is not JSON
    obj = re.compile(schema_to_regex(json.dumps({"type": "object", "properties": {"s": {"type": "string", "pattern": "^[^x]$"}}})))
    assert obj.fullmatch('{"s": "\\""}') and obj.fullmatch('{"s": "\\t"}')
    assert not obj.fullmatch('{"s": """}') and not obj.fullmatch('{"s": "\t"}')


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "string", "pattern": "a(?!b)"}, "'pattern' at # uses a look-around"),
        ({"type": "string", "pattern": "(a)\\1"}, "'pattern' at # uses a back-reference"),
        ({"type": "string", "pattern": "a^b"}, "'pattern' at # uses an anchor"),
        ({"type": "string", "pattern": "a(b"}, "'pattern' at # is not a valid regex"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength' together with 'pattern'"),
    ],
)
def test_unenforceable_patterns_are_refused_by_keyword(schema, needle):
    with pytest.raises(GrammarError) as err:
        schema_to_regex(json.dumps(schema))
    assert needle in str(err.value)


# ----------------------------------------------------------------------------- numbers, formats, not

NUMBERS = ["0", "-0", "0.5", "1", "1.0", "1.5", "2", "-1", "-1.5", "-2", "9.99", "10", "10.01", "-10", "-10.5", "3.000"]


@pytest.mark.parametrize("lo", [None, -10, 0, 1])
@pytest.mark.parametrize("hi", [None, -1, 0, 2, 10])
@pytest.mark.parametrize("exclusive", [False, True])
def test_whole_number_bounds_on_numbers_are_exact(lo, hi, exclusive):
    schema: dict = {"type": "number"}
    if lo is not None:
        schema["exclusiveMinimum" if exclusive else "minimum"] = lo
    if hi is not None:
        schema["exclusiveMaximum" if exclusive else "maximum"] = hi
    validator = jsonschema.Draft202012Validator(schema)
    try:
        regex = re.compile(schema_to_regex(json.dumps(schema)))
    except GrammarError as e:
        assert "admit no value" in str(e) and not any(validator.is_valid(json.loads(x)) for x in NUMBERS)
        return
    for text in NUMBERS:
        want = validator.is_valid(json.loads(text))
        # sound always; complete but for "-0" (its value is 0, spelled without the sign here)
        assert bool(regex.fullmatch(text)) == want or (want and text.startswith("-0")), (schema, text)


def test_fractional_number_bounds_are_refused_by_name():
    with pytest.raises(GrammarError, match="'minimum' at # is 0.5: only whole-number bounds"):
        schema_to_regex(json.dumps({"type": "number", "minimum": 0.5}))


@pytest.mark.parametrize("fmt,good", [("email", "a.b@example.com"), ("uri", "https://x.org/a?b=1"), ("date-time", "2020-01-02T03:04:05Z")])
def test_formats_are_spelled_as_json(backend, fmt, good):
    schema = {"type": "string", "format": fmt}
    assert re.fullmatch(schema_to_regex(json.dumps(schema)), json.dumps(good))
    assert_walks_validate(backend, schema, n=4)  # outlines-core's email / uri regexes admit raw '"' and '\\'


@pytest.mark.parametrize("fmt,good,bad", [
    ("date", ["2024-02-29", "2023-12-31"], ["2022-02-30", "2023-02-29", "2023-04-31", "2023-13-01"]),
    ("date-time", ["2020-01-02T03:04:05.5+01:00"], ["2020-01-02T03:04:05", "2021-02-29T00:00:00Z"]),
    ("time", ["23:59:59Z"], ["24:00:00Z", "12:00:00"]),
])  # fmt: skip
def test_dates_and_times_are_the_ones_that_exist(fmt, good, bad):
    """Dates as jsonschema's format checker reads them (outlines-core's regex admitted Feb 30 and
    date-times without an offset), on the regex path as on the grammar path."""
    regex = schema_to_regex(json.dumps({"type": "string", "format": fmt}))
    assert all(re.fullmatch(regex, json.dumps(v)) for v in good)
    assert not any(re.fullmatch(regex, json.dumps(v)) for v in bad)


def test_keywords_of_other_types_do_not_apply():
    regex = re.compile(schema_to_regex(json.dumps({"type": "integer", "pattern": "^1$", "properties": {"a": {}}})))
    assert regex.fullmatch("5")  # JSON Schema applies 'pattern' to strings only


def test_common_nots_are_rewritten():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"not": {}}}, "required": ["a"]}
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"a": 1}') and not regex.fullmatch('{"a": 1, "b": 2}')
    regex = re.compile(schema_to_regex(json.dumps({"not": {"type": "null"}})))
    assert regex.fullmatch("1") and not regex.fullmatch("null")
    with pytest.raises(GrammarError, match="required 'b' admits no value"):
        schema_to_regex(json.dumps({**schema, "required": ["b"]}))


# ----------------------------------------------------------------------------- undeclared properties


def test_explicit_additional_properties_are_admitted_after_the_declared_ones(backend):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": "string"}},
              "required": ["ab"], "additionalProperties": {"type": "boolean"}}  # fmt: skip
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"ab": "x", "abc": true, "b": false}')
    assert regex.fullmatch('{"a": 1, "ab": "x"}')
    assert not regex.fullmatch('{"ab": "x", "a": true}')  # a declared key is never taken as an extra one
    assert not regex.fullmatch('{"ab": "x", "c": 1}')  # extras follow additionalProperties
    assert not regex.fullmatch('{"abc": true}')  # ab is required
    assert_walks_validate(backend, schema)


def test_absent_additional_properties_is_closed_unless_open_objects():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert not re.fullmatch(schema_to_regex(json.dumps(schema)), '{"a": 1, "b": [null]}')
    opened = re.compile(schema_to_regex(json.dumps(schema), open_objects=True))
    assert opened.fullmatch('{"a": 1, "b": [null]}') and opened.fullmatch('{"b": 2}') and opened.fullmatch("{}")
    assert not opened.fullmatch('{"a": "x"}') and not opened.fullmatch('{, "b": 2}')


def test_keywords_beside_anyof_apply_to_every_branch():
    schema = {"type": "object", "properties": {"r": {"type": "number"}, "w": {"type": "integer"}},
              "anyOf": [{"required": ["r"]}, {"required": ["w"]}, {"type": "string"}]}  # fmt: skip
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    assert regex.fullmatch('{"r": 1.5}') and regex.fullmatch('{"w": 2}') and regex.fullmatch('{"r": 1, "w": 2}')
    assert not regex.fullmatch('{"w": 2.5}') and not regex.fullmatch("{}")
    assert not regex.fullmatch('"x"')  # the string branch conflicts with type object: dropped


# ----------------------------------------------------------------------------- oneOf

AREA = {  # Glaive's calculate_area: exactly one way to give the dimensions
    "type": "object",
    "properties": {
        "shape": {"type": "string"},
        "dimensions": {
            "type": "object",
            "properties": {k: {"type": "number"} for k in ("base", "height", "length", "radius", "width")},
            "oneOf": [{"required": ["radius"]}, {"required": ["length", "width"]}, {"required": ["base", "height"]}],
        },
    },
    "required": ["dimensions", "shape"],
}


@pytest.mark.parametrize("open_objects", [False, True])
def test_oneof_branches_differing_in_required_hold_exactly_one(backend, open_objects):
    regex = re.compile(schema_to_regex(json.dumps(AREA), open_objects=open_objects))
    # members in declared order (generation's order where objects are closed)
    for dims, ok in [('{"radius": 5}', True), ('{"length": 1, "width": 2}', True), ('{"base": 1, "height": 2}', True),
                     ('{"length": 1, "radius": 5}', True), ('{"length": 10, "radius": 5, "width": 5}', False),
                     ('{"length": 1}', False), ("{}", False), ('{"base": 1, "height": 2, "radius": 1}', False)]:  # fmt: skip
        text = f'{{"shape": "c", "dimensions": {dims}}}'
        assert bool(regex.fullmatch(text)) == ok, text
        assert jsonschema.Draft202012Validator(AREA).is_valid(json.loads(text)) == ok, text
    assert_walks_validate(backend, AREA)


def test_oneof_branches_apart_by_type_or_const_stay_as_written():
    tagged = {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "x": {"type": "integer"}}, "required": ["kind"],
              "oneOf": [{"properties": {"kind": {"const": "a"}}, "required": ["x"]}, {"properties": {"kind": {"const": "b"}}}]}  # fmt: skip
    regex = re.compile(schema_to_regex(json.dumps(tagged)))
    assert regex.fullmatch('{"kind": "a", "x": 1}') and regex.fullmatch('{"kind": "b", "x": 1}') and regex.fullmatch('{"kind": "b"}')
    assert not regex.fullmatch('{"kind": "a"}')
    regex = re.compile(schema_to_regex(json.dumps({"oneOf": [{"type": "string"}, {"type": "integer"}]})))
    assert regex.fullmatch('"s"') and regex.fullmatch("3")


def test_oneof_that_cannot_be_proven_exclusive_reads_as_anyof():
    # integer is a number: 3 holds both branches (JSON Schema rejects it), read here as anyOf
    regex = re.compile(schema_to_regex(json.dumps({"oneOf": [{"type": "number"}, {"type": "integer"}]})))
    assert regex.fullmatch("3") and regex.fullmatch("3.5")


def test_oneof_whose_branches_always_hold_together_is_refused():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "oneOf": [{"required": ["a"]}, {"required": ["a"]}]}
    with pytest.raises(GrammarError, match="oneOf at # admits no value"):
        schema_to_regex(json.dumps(schema))


# ----------------------------------------------------------------------------- member order


def test_open_objects_take_required_members_in_any_order():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
              "required": ["a", "b"]}  # fmt: skip
    opened = re.compile(schema_to_regex(json.dumps(schema), open_objects=True))
    for text in ('{"a": 1, "b": "x"}', '{"b": "x", "a": 1}', '{"c": true, "b": "x", "z": 0, "a": 1}', '{"b": "x", "c": true, "a": 1, "c": false}'):
        assert opened.fullmatch(text), text
    for text in ('{"b": "x"}', '{"b": "x", "c": true}', '{"b": 1, "a": 1}'):
        assert not opened.fullmatch(text), text
    closed = re.compile(schema_to_regex(json.dumps(schema)))  # declared order: generation's keys stay forced
    assert closed.fullmatch('{"a": 1, "b": "x"}') and not closed.fullmatch('{"b": "x", "a": 1}')


def test_large_open_objects_keep_required_members_in_declared_order():
    schema = {"type": "object", "properties": {k: {"type": "integer"} for k in "abcd"}, "required": list("abcd")}
    opened = re.compile(schema_to_regex(json.dumps(schema), open_objects=True))
    assert opened.fullmatch('{"a": 1, "b": 2, "c": 3, "d": 4}') and not opened.fullmatch('{"b": 2, "a": 1, "c": 3, "d": 4}')



def test_enum_values_are_checked_against_the_keywords_beside_them():
    assert schema_to_regex(json.dumps({"enum": ["abc", "x", 3], "type": "string", "maxLength": 2})) == '("x")'
    with pytest.raises(GrammarError, match="no 'enum' / 'const' value at # satisfies"):
        schema_to_regex(json.dumps({"enum": ["A"], "type": "object"}))
    assert schema_to_regex(json.dumps({"enum": ["v1"], "type": ["string", "null"]})) == '("v1")'
    schema = {"type": "object", "properties": {"b": {"enum": ["A"], "type": "object"}, "c": {"type": "integer"}}}
    regex = re.compile(schema_to_regex(json.dumps(schema)))  # b admits no value: it cannot be present
    assert regex.fullmatch('{"c": 1}') and not regex.fullmatch('{"b": "A", "c": 1}')


def test_a_property_admitting_nothing_is_not_readmitted_as_an_undeclared_one():
    schema = {"type": "object", "properties": {"b": {"enum": ["A"], "type": "object"}, "c": {"type": "integer"}}}
    regex = re.compile(schema_to_regex(json.dumps(schema), open_objects=True))
    assert regex.fullmatch('{"c": 1, "bb": "A"}') and not regex.fullmatch('{"c": 1, "b": "A"}')
