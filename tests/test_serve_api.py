"""The OpenAI-compatible server, driven as a client would: the official `openai` package and raw HTTP.

The server runs as a subprocess (`lmforge serve`) on a free loopback port with a tiny random model and a BPE
tokenizer trained here; the model is random, so tests check shapes, counts, reproducibility and constraints,
never the text's quality.
"""

import json
import time

import httpx
import jsonschema
import openai
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

CORPUS = ['the cat sat on the mat. {"name": "tom", "ok": true}\n'] * 50 + ["hello world, how are you?\n"] * 50


def _model_folder(path, block_size: int):
    tok = train_tokenizer("bpe", CORPUS, 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)
    save_model(path, Transformer(cfg), tok)
    return tok


def _start(folder, *flags):
    return start_server(str(folder), "--log-level", "warning", *flags)


def _stop(proc):
    # SIGTERM: uvicorn shuts down gracefully, the lifespan closes the engine loop, and it re-raises the signal
    assert stop_server(proc) in (0, -15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    tok = _model_folder(folder, 256)
    proc, base = _start(folder, "--max-batch", "4", "--max-queue", "4")
    yield base, tok
    _stop(proc)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server with an API key and room for one request: for 401, 429 and disconnects."""
    folder = tmp_path_factory.mktemp("serve_small") / "tiny"
    tok = _model_folder(folder, 1024)
    proc, base = _start(
        folder, "--max-batch", "1", "--max-queue", "0", "--api-key", "sekret", "--max-body-bytes", "20000"
    )
    yield base, tok
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["engine"]["kv_blocks_total"] > 0


def test_completion_usage_is_exact(server, client):
    base, tok = server
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(tok.encode("the cat"))
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.choices[0].finish_reason in ("stop", "length")
    # greedy is deterministic and the text decodes the counted tokens
    again = client.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0)
    assert again.choices[0].text == r.choices[0].text


def test_chat_completion_counts_template_tokens(server, client):
    base, tok = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    rendered = httpx.post(base + "/tokenize", json={"messages": messages}).json()
    assert r.usage.prompt_tokens == rendered["count"]  # counted after the chat template
    assert tok.decode(rendered["tokens"]) == "be brief\n\nUser: hello\nAssistant:"
    assert r.usage.completion_tokens <= 4


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    stream = list(client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=0, stream=True))
    plain = client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in stream) == plain.choices[0].text


def test_n_seed_and_logprobs(client):
    kwargs = dict(model="tiny", prompt="hello", max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=2)
    a, b = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        temperature=0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # greedy: the chosen token is the most likely alternative
    assert all(c.logprob == pytest.approx(max(t.logprob for t in c.top_logprobs)) for c in content)


def test_response_format_json_schema_always_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "ok": {"type": "boolean"},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["name", "ok", "pet"],
        "additionalProperties": False,
    }
    for seed in range(4):  # a random model, yet every sample parses and validates
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "json please"}],
            max_tokens=120,
            seed=seed,
            temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


NUMERIC_SCHEMAS = [  # enforced, or refused naming the keyword
    (
        {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "score": {"type": "number", "exclusiveMinimum": -1, "maximum": 1},
            },
            "required": ["age", "score"],
        },
        None,
    ),
    (
        {"type": "array", "items": {"type": "integer", "multipleOf": 5, "minimum": -20}, "minItems": 1, "maxItems": 3},
        None,
    ),
    ({"type": "array", "items": {"enum": ["cat", "dog", "owl"]}, "uniqueItems": True, "minItems": 2}, None),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}, "required": ["n"]}, "multipleOf"),
    ({"type": "number", "multipleOf": 0.01}, "multipleOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
]


@pytest.mark.parametrize("schema, refused", NUMERIC_SCHEMAS, ids=lambda x: json.dumps(x)[:50])
def test_numeric_multiple_and_unique_keywords_are_enforced_or_refused_by_name(client, schema, refused):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    kwargs = dict(
        model="tiny",
        messages=[{"role": "user", "content": "json please"}],
        max_tokens=120,
        n=3,
        seed=1,
        temperature=1.0,
        response_format=fmt,
    )
    if refused:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**kwargs)
        assert err.value.body["param"] == "response_format" and repr(refused) in err.value.body["message"]
        return
    r = client.chat.completions.create(**kwargs)
    for choice in r.choices:
        if choice.finish_reason == "stop":  # "length": max_tokens cut it
            jsonschema.validate(json.loads(choice.message.content), schema)
    assert any(c.finish_reason == "stop" for c in r.choices)


def test_a_format_is_not_cut_by_stop_strings_echo_or_banned_phrases(server):
    """Stop strings and echo would break a format's answer, so combining them is a 400; banned phrases that leave
    the format no way on end the answer early with finish_reason content_filter, never a "stop" that fails it."""
    base, _ = server
    body = dict(model="tiny", prompt="pick", max_tokens=20, choice=["red", "green"])
    for extra, param in ((dict(stop=["e"]), "stop"), (dict(echo=True), "echo")):
        r = httpx.post(base + "/v1/completions", json=body | extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(base + "/v1/completions", json=body | dict(banned_phrases=["r", "g"])).json()
    assert r["choices"][0]["finish_reason"] == "content_filter" and r["choices"][0]["text"] not in ("red", "green")
    r = httpx.post(base + "/v1/completions", json=body | dict(banned_phrases=["g"])).json()
    assert r["choices"][0] == {"index": 0, "text": "red", "logprobs": None, "finish_reason": "stop"}


def test_choice_and_regex(server):
    base, _ = server
    body = dict(
        model="tiny", prompt="pick", max_tokens=20, temperature=1.0, n=4, seed=3, choice=["red", "green", "blue"]
    )
    r = httpx.post(base + "/v1/completions", json=body).json()
    assert {c["text"] for c in r["choices"]} <= {"red", "green", "blue"}
    body = dict(model="tiny", prompt="num", max_tokens=20, temperature=1.0, n=3, seed=3, regex=r"[0-9]{3}-[a-c]{2}")
    r = httpx.post(base + "/v1/completions", json=body).json()
    import re

    assert all(re.fullmatch(r"[0-9]{3}-[a-c]{2}", c["text"]) for c in r["choices"])


def test_stop_echo_and_json_object(client):
    plain = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0).choices[0].text
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]  # a string the greedy output is known to contain
    cut = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == plain[: plain.index(stop)] and cut.choices[0].finish_reason == "stop"
    echoed = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == "the" + plain
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=100,
        seed=5,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":  # a random model may use all 100 tokens inside one string
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_streaming_chat_with_n(client):
    """Both samples stream to their finish chunk, even when they finish in the same engine step."""
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, seed=3, stream=True
        )
    )
    texts, finished = {0: "", 1: ""}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, seed=3
    )
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]


def test_errors_use_openai_shape(server):
    base, _ = server
    cases = [
        (dict(model="tiny", prompt="x", temperature=-1), 400, "temperature"),
        (dict(model="tiny", prompt="x", max_tokens=0), 400, "max_tokens"),
        (dict(model="tiny", prompt="x", max_tokens=100000), 400, "max_tokens"),
        (dict(model="tiny", prompt="x", regex="("), 400, "regex"),
        (dict(model="nope", prompt="x"), 404, "model"),
        (dict(prompt="x"), 400, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(base + "/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], top_p=0
        )


def test_tokenize_round_trip_and_metrics(server):
    base, tok = server
    t = httpx.post(base + "/tokenize", json={"prompt": "the cat sat"}).json()
    assert t["tokens"] == tok.encode("the cat sat")
    assert httpx.post(base + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "the cat sat"
    text = httpx.get(base + "/metrics").text
    for name in (
        "lmforge_requests_total",
        "lmforge_prompt_tokens_total",
        "lmforge_generated_tokens_total",
        "lmforge_queue_length",
        "lmforge_running_batch_size",
        "lmforge_kv_blocks_used",
        "lmforge_kv_blocks_free",
        "lmforge_time_to_first_token_seconds_bucket",
        "lmforge_inter_token_latency_seconds_bucket",
    ):
        assert name in text


def test_auth_queue_body_limit_and_disconnect(small_server):
    base, tok = small_server
    good = {"Authorization": "Bearer sekret"}
    assert httpx.get(base + "/v1/models").status_code == 401
    r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(base + "/v1/completions", headers=good, json={"model": "tiny", "prompt": "x" * 30000})
    assert r.status_code == 400 and "max_body_bytes" in r.json()["error"]["message"]

    # one long request fills the server (max_batch 1, max_queue 0); EOS banned so it cannot end early
    long = {"model": "tiny", "prompt": "the", "max_tokens": 1000, "stream": True, "logit_bias": {str(tok.eos_id): -100}}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", base + "/v1/completions", headers=good, json=long) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            busy = httpx.post(base + "/v1/completions", headers=good, json={"model": "tiny", "prompt": "x"})
            assert busy.status_code == 429 and busy.headers["retry-after"]
            assert httpx.get(base + "/health").json()["engine"]["kv_blocks_used"] > 0
        # leaving the block closes the connection mid-stream: the request is aborted and its blocks freed.
    # EngineLoop.last_stats is refreshed after engine steps, so a short request runs before reading them; that
    # it is admitted at all (max_batch 1, max_queue 0) shows the aborted request gave its slot back.
    deadline, ok = time.time() + 5, None
    while time.time() < deadline:
        ok = httpx.post(base + "/v1/completions", headers=good, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        if ok.status_code != 429:
            break
        time.sleep(0.05)
    assert ok.status_code == 200, ok.text
    stats = httpx.get(base + "/health").json()["engine"]
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0, stats
    assert stats["generated_tokens"] < 500, stats  # the 1000-token request stopped early


# ---------------------------------------------------------------------------------- in-process (no subprocess)


@pytest.fixture(scope="module")
def tiny_parts():
    tok = train_tokenizer("bpe", CORPUS, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    return model, tok


def test_rate_limit_chunked_body_and_prompt_length(tiny_parts, tmp_path):
    from fastapi.testclient import TestClient

    from lmforge.serve.app import ServeSettings, create_app

    model, tok = tiny_parts
    (tmp_path / "keys").write_text("k1\nk2\n")
    settings = ServeSettings(model="tiny", api_key_file=str(tmp_path / "keys"), rate_limit_tpm=20, max_body_bytes=5000)
    with TestClient(create_app(model, tok, settings), base_url="http://localhost") as c:
        k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
        body = {"model": "tiny", "prompt": "the cat sat on the mat", "max_tokens": 8}
        assert len(tok.encode(body["prompt"])) + 8 <= 20 < 2 * (len(tok.encode(body["prompt"])) + 1) + 8
        assert c.post("/v1/completions", headers=k1, json=body).status_code == 200
        limited = c.post("/v1/completions", headers=k1, json=body)  # what k1 spent plus this one's 8: over 20
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert c.post("/v1/completions", headers=k2, json=body).status_code == 200  # per key
        chunks = (b'{"model": "tiny", "prompt": "' + b"x" * 1000 for _ in range(8))
        big = c.post("/v1/completions", headers=k2, content=chunks)  # chunked: no content-length
        assert big.status_code == 400 and "max_body_bytes" in big.json()["error"]["message"]
    with TestClient(
        create_app(model, tok, ServeSettings(model="tiny", kv_dtype="float16")), base_url="http://localhost"
    ) as c:
        long = {"model": "tiny", "prompt": "the cat " * 100, "max_tokens": 8}
        err = c.post("/v1/completions", json=long).json()["error"]
        assert err["param"] == "prompt" and "max_model_len is 128" in err["message"]
        room = 128 - len(tok.encode("the cat"))
        for max_tokens, status in ((room, 200), (room + 1, 400)):
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "the cat", "max_tokens": max_tokens})
            assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == "max_tokens"
        cfg = model.config  # --kv-dtype float16: two bytes per key and value element
        assert c.get("/health").json()["engine"]["kv_bytes_per_token_ideal"] == 2 * cfg.n_layer * cfg.kv_dim * 2


def test_chat_template_from_model_folder(tiny_parts, tmp_path):
    from lmforge.templates import PLAIN_TEMPLATE, ChatTemplate, ChatTemplateError

    model, tok = tiny_parts
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    plain = ChatTemplate.for_model(tmp_path, tok)  # no tokenizer_config.json: the plain default
    assert plain.source == PLAIN_TEMPLATE and plain.turn_stops == ["\nUser:"]
    assert plain.render(messages) == "S\n\nUser: U\nAssistant:"
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    own = ChatTemplate.for_model(tmp_path, tok)
    assert own.render(messages) == "[system]S[user]U[assistant]" and own.turn_stops == []
    # templates are untrusted: the sandbox refuses attribute escapes
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(evil, tok).render(messages)


def test_a_draft_model_speculates_without_changing_greedy_output(tmp_path):
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.loader import load

    tok = _model_folder(tmp_path / "target", 256)
    torch.manual_seed(1)
    save_model(
        tmp_path / "draft",
        Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16)),
        tok,
    )
    model = load(tmp_path / "target", dtype="float32").model
    prompts = ["the cat", "hello world, how"]
    want = [
        c.text
        for c in generate(
            model, [tok.encode(p) for p in prompts], SamplingParams(max_tokens=12, temperature=0), tokenizer=tok
        )
    ]
    proc, base = _start(tmp_path / "target", "--draft", str(tmp_path / "draft"), "--num-speculative-tokens", "3")
    try:
        for prompt, text in zip(prompts, want):
            r = httpx.post(
                base + "/v1/completions", json={"model": "target", "prompt": prompt, "max_tokens": 12, "temperature": 0}
            )
            assert r.json()["choices"][0]["text"] == text
        engine = httpx.get(base + "/health").json()["engine"]
        assert engine["draft_proposed"] > 0
    finally:
        _stop(proc)
