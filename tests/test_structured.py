"""Constrained decoding: whatever token the mask lets through, the output parses and validates."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.serve.structured import (ConstraintCompiler, StructuredOutputError, regex_for_choice,
                                      regex_for_json_schema, token_bytes)
from lmforge.tokenizer import train_tokenizer

TEXT = ["hello world, {\"a\": 1, \"b\": [true, false, null]} the cat sat 0123456789\n"] * 30


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
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "ok": {"type": "boolean"}, "pet": {"enum": ["cat", "dog"]}},
              "required": ["name", "ok", "pet"]}
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
