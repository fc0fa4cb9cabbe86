"""Hostile requests against a running server: every sampling and structured-output field, hypothesis-generated.

The model name is always the served one, so each request gets past the 404 and reaches validation, the
structured-output compiler and the engine. Values lean on the edges (NaN, infinities, subnormals, 2**63, huge
and negative counts, lone surrogates, empty and odd strings, schemas with any keyword). Whatever comes in, the
server answers with a 2xx or a 4xx -- never a 5xx, never a server_error event inside a stream -- and after each
request /health is 200 and a plain completion succeeds. An answer whose format ended with finish_reason "stop"
validates against its schema.
"""

import json
import math

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_api import _model_folder

from lmforge.serve.process import start_server, stop_server

pytestmark = pytest.mark.slow

EXAMPLES = 150

EDGE_FLOATS = [
    0.0,
    -0.0,
    1e-40,
    5e-324,
    1e-5,
    1e-6,
    0.01,
    0.5,
    1.0,
    2.0,
    2.0000001,
    100.0,
    100.5,
    1e38,
    1e308,
    -1e308,
    -1.0,
    -2.0,
    -2.5,
    math.nan,
    math.inf,
    -math.inf,
]
EDGE_INTS = [0, 1, -1, 2, 16, 17, 20, 21, 255, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30]
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "a\ud800b", "\udfff", "\u0000", "}", '"', "\\", "the", "<|im_end|>", "x" * 300]),
)
NUMBER = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(), st.integers(-10, 10))
INTEGER = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 40), st.integers())

SCHEMA_KEYWORDS = {
    "type": st.one_of(
        st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "nope"]),
        st.lists(st.sampled_from(["integer", "string", "null"]), max_size=3),
    ),
    "minimum": NUMBER,
    "maximum": NUMBER,
    "exclusiveMinimum": st.one_of(NUMBER, st.booleans()),
    "exclusiveMaximum": NUMBER,
    "multipleOf": st.one_of(NUMBER, st.sampled_from([0.01, 3, 5, 7, 1000])),
    "minLength": INTEGER,
    "maxLength": INTEGER,
    "pattern": st.one_of(
        TEXT, st.sampled_from(["^[a-z]+$", "\\d{2,3}", "(a|b)*c", "[^x]", ".", "\\b", "(?i)a", "a{2000}", "(?<=a)b"])
    ),
    "format": st.sampled_from(["date-time", "date", "time", "email", "uuid", "ipv4", "nope"]),
    "minItems": INTEGER,
    "maxItems": INTEGER,
    "uniqueItems": st.booleans(),
    "enum": st.lists(st.one_of(TEXT, NUMBER, st.booleans(), st.none()), max_size=4),
    "const": st.one_of(TEXT, NUMBER, st.booleans(), st.none()),
    "required": st.lists(TEXT, max_size=3),
    "minProperties": INTEGER,
    "maxProperties": INTEGER,
    "additionalProperties": st.booleans(),
    "not": st.just({}),
    "contains": st.just({"type": "integer"}),
    "$ref": st.sampled_from(["#", "#/$defs/x", "#/nowhere", "http://example.com/s.json"]),
}
LEAF = st.fixed_dictionaries({}, optional=SCHEMA_KEYWORDS)
SCHEMA = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(TEXT, inner, max_size=3)},
            optional={"required": st.lists(TEXT, max_size=2), "maxProperties": INTEGER},
        ),
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner},
            optional={"maxItems": INTEGER, "uniqueItems": st.booleans(), "minItems": INTEGER},
        ),
        st.fixed_dictionaries({"prefixItems": st.lists(inner, max_size=3)}),
        *[st.fixed_dictionaries({key: st.lists(inner, min_size=1, max_size=3)}) for key in ("anyOf", "oneOf", "allOf")],
    ),
    max_leaves=6,
)

SAMPLING = {  # every sampling field of both endpoints (OpenAI's and lmforge's extras)
    "temperature": NUMBER,
    "top_p": NUMBER,
    "top_k": INTEGER,
    "min_p": NUMBER,
    "repetition_penalty": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "seed": INTEGER,
    "n": INTEGER,
    "max_tokens": INTEGER,
    "logit_bias": st.dictionaries(
        st.one_of(st.sampled_from(["0", "1", "-1", "299", "300", "1e3", "x", "9" * 30]), TEXT), NUMBER, max_size=3
    ),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=20)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "banned_phrases": st.lists(TEXT, max_size=4),
    "user": TEXT,
}
FORMAT = {  # every structured-output field
    "regex": st.one_of(TEXT, st.sampled_from(["[0-9]{3}", "(a|b)+", "a{0,5}b", "\\", "(", ".*"])),
    "choice": st.lists(TEXT, max_size=4),
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "nope"])}),
        st.fixed_dictionaries(
            {
                "type": st.just("json_schema"),
                "json_schema": st.fixed_dictionaries({"name": st.just("x"), "schema": SCHEMA}),
            }
        ),
    ),
}
COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=3), st.lists(INTEGER, min_size=1, max_size=3))},
    optional=SAMPLING | FORMAT | {"echo": st.booleans(), "logprobs": INTEGER, "best_of": INTEGER, "suffix": TEXT},
)
CHAT = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
            min_size=1,
            max_size=3,
        )
    },
    optional=SAMPLING | FORMAT | {"logprobs": st.booleans(), "top_logprobs": INTEGER, "max_completion_tokens": INTEGER},
)
REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), COMPLETIONS), st.tuples(st.just("/v1/chat/completions"), CHAT)
)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "tiny"
    _model_folder(folder, 64)
    proc, url = start_server(
        str(folder), "--log-level", "warning", "--max-model-len", "40", "--max-batch", "8", "--max-queue", "56"
    )
    yield url
    stop_server(proc)


def test_hostile_values_in_every_field_never_break_the_server(server_url):
    statuses: dict[int, int] = {}
    client = httpx.Client(base_url=server_url, timeout=120)

    @given(request=REQUESTS)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    def check(request):
        path, body = request
        body = {"model": "tiny"} | body
        data = json.dumps(body)  # NaN and Infinity as Python writes them; a lone surrogate as its \u escape
        with client.stream("POST", path, content=data, headers={"content-type": "application/json"}) as r:
            text = r.read().decode()
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{r.status_code} for {data[:500]}: {text[:500]}"
        if r.status_code == 200 and body.get("stream") is True:
            assert '"server_error"' not in text, f"an error event for {data[:500]}: {text[:500]}"
        elif r.status_code == 200:
            check_format(body, r.json())
        assert client.get("/health").status_code == 200
        plain = client.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": 3})
        assert plain.status_code == 200 and plain.json()["choices"][0]["finish_reason"] in ("stop", "length")

    check()
    assert statuses.get(200, 0) >= EXAMPLES // 10, statuses  # many requests reached the engine


def check_format(body: dict, answer: dict) -> None:
    """A json_schema answer that finished with "stop" validates against its schema."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return
    schema = fmt["json_schema"]["schema"]
    for choice in answer["choices"]:
        if choice["finish_reason"] == "stop":
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            jsonschema.validate(json.loads(text), schema)
