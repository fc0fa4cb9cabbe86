"""Constrained decoding: whatever token the mask lets through, the output parses and validates."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.serve.jsonregex import SchemaKeywordError, alternation, integers, multiples
from lmforge.serve.structured import (
    ConstraintCompiler,
    StructuredOutputError,
    regex_for_choice,
    regex_for_json_schema,
    token_bytes,
)
from lmforge.tokenizer import train_tokenizer

TEXT = ['hello world, {"a": 1, "b": [true, false, null]} the cat sat 0123456789\n'] * 30


def _walk(constraint, eos, generator, limit=300):
    """Pick uniformly among the allowed tokens until EOS is picked: the worst case of a random model."""
    out = []
    for _ in range(limit):
        allowed = constraint(out)
        token = allowed[torch.randint(len(allowed), (1,), generator=generator).item()]
        if token == eos:
            return out
        out.append(token)
    raise AssertionError("no end within the limit")


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", TEXT, 300)


def test_bpe_bytes_decode_like_the_tokenizer(bpe):
    table = token_bytes(bpe)
    for i in list(table)[:300]:
        assert table[i].decode("utf-8", "replace") == bpe.decode([i])


def test_json_schema_outputs_always_validate(bpe):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "ok": {"type": "boolean"},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "ok", "pet"],
    }
    constraint = ConstraintCompiler(bpe, bpe.vocab_size).constraint(regex_for_json_schema(schema))
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        jsonschema.validate(json.loads(bpe.decode(_walk(constraint, bpe.eos_id, g))), schema)


def test_choice_and_regex(bpe):
    compiler, g = ConstraintCompiler(bpe, bpe.vocab_size), torch.Generator().manual_seed(1)
    pick = compiler.constraint(regex_for_choice(["red", "green"]))
    assert {bpe.decode(_walk(pick, bpe.eos_id, g)) for _ in range(10)} <= {"red", "green"}
    digits = compiler.constraint(r"[0-9]{2}-[ab]+", "regex")
    for _ in range(5):
        out = bpe.decode(_walk(digits, bpe.eos_id, g, limit=2000))
        assert re.fullmatch(r"[0-9]{2}-[ab]+", out)


def test_unusable_tokenizers_are_refused():
    with pytest.raises(StructuredOutputError, match="end-of-sequence"):
        ConstraintCompiler(train_tokenizer("char", TEXT), 40).constraint("a")
    with pytest.raises(StructuredOutputError, match="word"):
        ConstraintCompiler(train_tokenizer("word", TEXT), 40).constraint("a")
    with pytest.raises(StructuredOutputError):
        regex_for_choice([])


# ------------------------------------------------------------------ every JSON Schema keyword: enforced or refused

ENFORCED = [
    {"type": "integer", "minimum": 0},
    {"type": "integer", "minimum": -5, "maximum": 12},
    {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
    {"type": "integer", "maximum": 5, "exclusiveMaximum": True, "$schema": "http://json-schema.org/draft-04/schema#"},
    {"type": "integer", "maximum": 2**60},  # far bounds are moved inward (a narrower range), never outward
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
    {"type": "number", "minimum": -2.5, "maximum": 3.25},
    {"type": "number", "maximum": -0.5},
    {"type": ["integer", "null"], "minimum": 2, "maximum": 4},
    {"type": "integer", "multipleOf": 5},
    {"type": "number", "multipleOf": 4, "minimum": 10},
    {"type": "integer", "multipleOf": 3, "minimum": -30, "maximum": 300},
    {"type": "number", "multipleOf": 5.0, "exclusiveMaximum": 100},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True},
    {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 1},
    {"type": "array", "items": {"enum": [1, 1.0, True, "1"]}, "uniqueItems": True},  # 1 == 1.0 in JSON Schema
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 1},
    {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "name": {"type": "string", "maxLength": 5},
        },
        "required": ["age", "name"],
    },
    {
        "type": "object",
        "properties": {"a": {"type": "null"}, "b": {"type": "null"}},
        "minProperties": 1,
        "maxProperties": 1,
    },
    {"type": "object", "required": ["a", "b"]},
    {"type": "object", "additionalProperties": {"type": "integer", "minimum": 10, "maximum": 20}},
    {"type": "string", "pattern": "^[a-c]{2}-\\d+$"},
    {"type": "string", "pattern": "a.b[^x]\\W\\D\\S"},  # classes that include '"' or '\' keep only safe characters
    {"type": "string", "pattern": "(a|bc)+d?"},
    {"type": "string", "minLength": 3, "maxLength": 8},
    {"type": "string", "format": "date-time"},
    {"prefixItems": [{"type": "integer", "maximum": -3}, {"enum": ["x", "y"]}], "type": "array"},
    {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    {"oneOf": [{"enum": [1, 2]}, {"enum": [3, "a"]}]},
    {"enum": [1, "a", None, [1, 2], {"x": 1}], "type": ["integer", "array"]},  # enum values the type rules out go
    {"const": {"k": [1, "two", None]}},
    {
        "$defs": {"pos": {"type": "integer", "minimum": 1}},
        "type": "object",
        "properties": {"n": {"$ref": "#/$defs/pos"}},
        "required": ["n"],
    },
    {"type": "object"},
    {},
]
REFUSED = [
    ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
    ({"type": "integer", "multipleOf": 7}, "multipleOf"),
    ({"type": "number", "minimum": 0.1, "maximum": 0.2}, "minimum"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "items": {"enum": list(range(8))}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "string", "minLength": 2, "pattern": "a+"}, "pattern"),
    ({"type": "string", "pattern": 'a"b'}, "pattern"),
    ({"type": "string", "pattern": "(?i)ab"}, "pattern"),
    ({"type": "string", "format": "email"}, "format"),
    ({"type": "string", "maxLength": 100000}, "maxLength"),
    ({"oneOf": [{"type": "boolean"}, {"const": True}]}, "oneOf"),
    ({"allOf": [{"type": "boolean"}, {"const": True}]}, "allOf"),
    ({"anyOf": [{"type": "integer"}, {"type": "string"}], "minimum": 3}, "minimum"),
    ({"not": {"type": "null"}}, "not"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
    ({"type": "object", "patternProperties": {"^a": {"type": "null"}}}, "patternProperties"),
    ({"type": "object", "properties": {'q"uote': {"type": "null"}}}, "properties"),
    (
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "string", "maxLength": 100}, "maxItems": 100},
            "maxItems": 100,
        },
        "maxItems",
    ),
    ({"type": "integer", "minimum": "zero"}, "minimum"),  # not a valid schema at all
]


@pytest.fixture(scope="module")
def compiler(bpe):
    return ConstraintCompiler(bpe, bpe.vocab_size)


@pytest.mark.parametrize("schema", ENFORCED, ids=lambda s: json.dumps(s)[:60])
def test_an_enforced_schema_writes_only_valid_answers(schema, bpe, compiler):
    """Uniform random walks through the automaton (the worst a model can do): every answer parses and validates."""
    constraint = compiler.constraint(regex_for_json_schema(schema), "response_format")
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        jsonschema.validate(json.loads(bpe.decode(_walk(constraint, bpe.eos_id, g, limit=2000))), schema)


@pytest.mark.parametrize("schema, keyword", REFUSED, ids=lambda x: json.dumps(x)[:60] if isinstance(x, dict) else x)
def test_a_keyword_that_cannot_be_enforced_is_refused_by_name(schema, keyword):
    with pytest.raises(SchemaKeywordError) as err:
        regex_for_json_schema(schema)
    assert err.value.keyword == keyword and err.value.param == "response_format"
    assert repr(keyword) in str(err.value) or f"/{keyword}" in str(err.value)


def test_integer_ranges_and_multiples_match_arithmetic():
    """The integer and multiple regexes against Python's arithmetic on every integer in a window."""
    window = range(-2500, 2500)
    for lo, hi in [(None, None), (0, None), (None, -1), (-123, 99), (7, 1234), (100, 100), (-10, -10)]:
        rx = re.compile(alternation(integers(lo, hi)) + r"\Z")
        for n in window:
            assert bool(rx.match(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), (lo, hi, n)
        assert not rx.match("-0") and not rx.match("01")
    for k, lo, hi in [(5, None, None), (4, 10, None), (25, -700, 900), (8, None, 0), (3, -30, 300), (250, 1, 4000)]:
        rx = re.compile(alternation(multiples(k, lo, hi)) + r"\Z")
        for n in window:
            assert bool(rx.match(str(n))) == (n % k == 0 and (lo is None or n >= lo) and (hi is None or n <= hi))


def test_an_automaton_too_slow_to_build_is_refused_and_the_compiler_goes_on(bpe):
    """outlines-core's build is exponential for some patterns; it runs in a child process under a deadline."""
    compiler = ConstraintCompiler(bpe, bpe.vocab_size, timeout=2)
    with pytest.raises(StructuredOutputError, match="did not build within 2 s") as err:
        compiler.constraint("(a|b)*a(a|b){20}", "regex")
    assert err.value.param == "regex"
    assert re.fullmatch(
        "[0-9]{2}", bpe.decode(_walk(compiler.constraint("[0-9]{2}"), bpe.eos_id, torch.Generator().manual_seed(0)))
    )
