"""The server holds against what a client can send: one request's failure is its own, work is admitted by its
size, text fields are checked, and nothing a response carries points into the server's files.

Servers run as `lmforge serve` subprocesses (a real uvicorn) on tiny random models; clients are httpx and the
official `openai` package.
"""

import json
import threading

import httpx
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

CHARS = "ab \n"  # the char model's whole vocabulary: small enough to ban every character


def _char_model(folder, block_size=1024):
    tok = train_tokenizer("char", ["abab ba\n" * 10])
    assert set(tok.vocab) == set(CHARS) and tok.eos_id is None
    torch.manual_seed(0)
    save_model(
        folder,
        Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32)),
        tok,
    )
    return str(folder)


@pytest.fixture(scope="module")
def char_server(tmp_path_factory):
    proc, url = start_server(
        _char_model(tmp_path_factory.mktemp("char") / "tiny"),
        "--log-level",
        "warning",
        "--max-batch",
        "4",
        "--max-queue",
        "4",
    )
    yield url
    stop_server(proc)


def _sse(response) -> list[dict | str]:
    return [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def test_a_request_failing_in_the_engine_fails_alone_beside_healthy_streams(char_server):
    """Banning every character leaves a char model (no end token) nothing to write: the request fails inside an
    engine step. It gets an OpenAI-shaped error naming banned_phrases (400, or an error event once streaming);
    the streams running beside it finish whole, /health stays 200 and its KV blocks are freed."""
    url = char_server
    healthy = {"model": "tiny", "prompt": "ab", "max_tokens": 40, "temperature": 0, "stream": True}
    failing = {"model": "tiny", "prompt": "ab", "max_tokens": 40, "banned_phrases": list(CHARS)}
    results: dict[int, list] = {}
    started = threading.Barrier(4)

    def run(i):
        with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=healthy) as r:
            lines = r.iter_lines()
            first = next(lines)
            started.wait()
            results[i] = [json.loads(first[6:])] + [
                json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                for line in lines
                if line.startswith("data: ")
            ]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait()  # three streams are running
    whole = httpx.post(url + "/v1/completions", json=failing, timeout=60)
    with httpx.stream("POST", url + "/v1/completions", json=failing | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = _sse(r)
    for t in threads:
        t.join()

    assert whole.status_code == 400, whole.text
    err = whole.json()["error"]
    assert err["param"] == "banned_phrases" and "cannot continue" in err["message"]
    assert events[-1]["error"]["param"] == "banned_phrases"
    for i in range(3):
        chunks = results[i]
        assert chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"])
        assert len(text) == 40 and chunks[-2]["choices"][0]["finish_reason"] == "length"
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json()["engine"]["kv_blocks_used"] == 0
    again = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "ba", "max_tokens": 5})
    assert again.status_code == 200 and len(again.json()["choices"][0]["text"]) == 5
    assert "lmforge_request_errors_total 2.0" in httpx.get(url + "/metrics").text


def test_admission_counts_sequences_not_requests(char_server):
    """max_batch 4 + max_queue 4: a request holds len(prompts) x n of the 8 places; one larger than all of them is
    a 400 naming the limit (a long list of prompts is refused before it is tokenized), one larger than what is
    free is a 429 with Retry-After."""
    url = char_server
    base = {"model": "tiny", "max_tokens": 3, "temperature": 0}
    too_many = httpx.post(url + "/v1/completions", json=base | {"prompt": ["ab"] * 9}).json()["error"]
    assert too_many["param"] == "prompt" and "at most 8" in too_many["message"]
    too_wide = httpx.post(url + "/v1/completions", json=base | {"prompt": ["ab"] * 3, "n": 3}).json()["error"]
    assert too_wide["param"] == "n" and "9 sequences" in too_wide["message"]
    flood = httpx.post(url + "/v1/completions", json=base | {"prompt": [[1, 2]] * 4000, "n": 16}, timeout=30)
    assert flood.status_code == 400 and flood.json()["error"]["code"] == "request_too_large"
    chat = httpx.post(
        url + "/v1/chat/completions", json=base | {"messages": [{"role": "user", "content": "a"}], "n": 9}
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "n"
    full = httpx.post(url + "/v1/completions", json=base | {"prompt": ["ab", "ba"], "n": 4}).json()
    assert sorted(c["index"] for c in full["choices"]) == list(range(8))

    hold = base | {"prompt": ["ab"] * 5, "max_tokens": 1000, "stream": True}  # 5 of the 8 places, for a while
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions", json=hold) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the response (and abort the request)
        next(lines)
        assert httpx.get(url + "/health").json()["active_sequences"] == 5
        busy = httpx.post(url + "/v1/completions", json=base | {"prompt": ["ab"] * 2, "n": 2})
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        assert httpx.post(url + "/v1/completions", json=base | {"prompt": ["ab"] * 3}).status_code == 200
    health = httpx.get(url + "/health").json()
    assert health["active_sequences"] == 0 and health["max_sequences"] == 8


# ---------------------------------------------------------------------------------- the small ones (issue 17.5)


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory):
    """A BPE model (Hugging Face tokenizers) served with API keys, a token rate limit, a draft model and an extra
    allowed host."""
    from test_serve_api import _model_folder

    folder = tmp_path_factory.mktemp("bpe") / "tiny"
    tok = _model_folder(folder, 256)
    keys = folder.parent / "keys.txt"
    keys.write_text("k1\nk2\nk3\n")
    proc, url = start_server(
        str(folder),
        "--log-level",
        "warning",
        "--api-key-file",
        str(keys),
        "--rate-limit-tpm",
        "60",
        "--draft",
        str(folder),
        "--allowed-hosts",
        "lmforge.example",
        "--max-batch",
        "16",
        "--max-queue",
        "16",
    )
    yield url, tok, folder
    stop_server(proc)


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_the_rate_limit_reserves_at_admission_and_refunds_what_was_not_used(bpe_server):
    """60 tokens a minute per key: twelve concurrent requests on a fresh key cannot all pass a check made before any
    is charged (they reserve prompt + max_tokens when admitted); an answer that ends early is refunded; a request
    larger than the whole limit is a 400."""
    url, tok, _ = bpe_server
    body = {
        "model": "tiny",
        "prompt": "the cat",
        "max_tokens": 20,
        "temperature": 0,
        "logit_bias": {str(tok.eos_id): -100},
    }  # no early end: each admitted request uses all it reserved
    p = len(tok.encode("the cat"))
    statuses, used = [], []
    barrier = threading.Barrier(12)

    def one():
        barrier.wait()
        r = httpx.post(url + "/v1/completions", json=body, headers=_auth("k1"), timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 200:
            used.append(r.json()["usage"]["total_tokens"])

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) == 60 // (p + 20) and sum(used) <= 60, (statuses, used)
    assert set(statuses) == {200, 429}

    early = body | {"logit_bias": {str(tok.eos_id): 100}, "max_tokens": 40}  # ends at once: 40 tokens refunded
    first = httpx.post(url + "/v1/completions", json=early, headers=_auth("k2")).json()
    assert first["usage"] == {"prompt_tokens": p, "completion_tokens": 0, "total_tokens": p}
    second = httpx.post(url + "/v1/completions", json=early, headers=_auth("k2"))
    assert second.status_code == 200, second.text  # p + (p + 40) fits in 60 only because the first was refunded
    too_big = httpx.post(url + "/v1/completions", json=body | {"max_tokens": 60}, headers=_auth("k3"))
    assert too_big.status_code == 400 and "limit of 60 tokens per minute" in too_big.json()["error"]["message"]


def test_a_huge_prompt_is_tokenized_off_the_event_loop(bpe_server):
    """A 0.9 MB prompt takes this tokenizer most of a second; /health keeps answering meanwhile."""
    url, _, _ = bpe_server
    big = {"model": "tiny", "prompt": "the cat sat on the mat " * 39_000, "max_tokens": 1}
    done = threading.Event()
    answer = {}

    def send():
        answer["r"] = httpx.post(url + "/v1/completions", json=big, headers=_auth("k3"), timeout=120)
        done.set()

    threading.Thread(target=send).start()
    during = 0
    while not done.is_set():
        if httpx.get(url + "/health", timeout=60).status_code == 200 and not done.is_set():
            during += 1
    assert answer["r"].status_code == 400 and answer["r"].json()["error"]["param"] == "prompt"  # over max_model_len
    assert during >= 5, f"/health answered only {during} times while the prompt was tokenized"


SURROGATE = "a\ud800b"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": [SURROGATE, "ok"]}, "prompt"),
        ("/v1/completions", {"prompt": "ok", "stop": [SURROGATE]}, "stop"),
        ("/v1/completions", {"prompt": "ok", "banned_phrases": [SURROGATE]}, "banned_phrases"),
        ("/v1/completions", {"prompt": "ok", "choice": ["x", SURROGATE]}, "choice"),
        ("/v1/completions", {"prompt": "ok", "regex": SURROGATE}, "regex"),
        ("/v1/completions", {"prompt": "ok", "logit_bias": {SURROGATE: 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "ok", "user": SURROGATE}, "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"enum": [SURROGATE]}},
                },
            },
            "response_format.json_schema.schema",
        ),
        ("/tokenize", {"prompt": SURROGATE}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        ("/v1/classify", {"input": [SURROGATE]}, "input"),
    ],
)
def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_it(bpe_server, path, body, param):
    url, _, _ = bpe_server

    def post(path, body):  # json.dumps writes the surrogate as the escape "\ud800", as a client's JSON would
        return httpx.post(
            url + path, content=json.dumps(body), headers=_auth("k3") | {"content-type": "application/json"}
        )

    r = post(path, {"model": "tiny"} | body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]
    r = post("/v1/completions", {"model": SURROGATE, "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_no_response_names_a_file_path(bpe_server):
    """/health reports speculative decoding without the draft's path; errors name fields, not files."""
    url, _, folder = bpe_server
    health = httpx.get(url + "/health").json()
    assert health["speculative"] is True
    responses = [
        httpx.get(url + "/health"),
        httpx.get(url + "/v1/models", headers=_auth("k3")),
        httpx.get(url + "/metrics"),
        httpx.get(url + "/openapi.json"),
        httpx.post(url + "/v1/classify", json={"input": "x"}, headers=_auth("k3")),
        httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=_auth("k3")),
        httpx.post(
            url + "/v1/completions", json={"model": "tiny", "prompt": "x", "regex": "(?<=a)b"}, headers=_auth("k3")
        ),
    ]
    for r in responses:
        assert str(folder.parent) not in r.text and "/tmp" not in r.text, r.text[:300]


def test_the_host_header_must_name_this_server(bpe_server):
    """Bound to loopback, the server answers only for loopback names and --allowed-hosts: a page on another
    origin resolved to 127.0.0.1 (DNS rebinding) names its own host and is refused."""
    url, _, _ = bpe_server
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "lmforge.example", "LOCALHOST"):
        assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        r = httpx.get(url + "/v1/models", headers={"Host": host} | _auth("k3"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host


def test_the_web_page_carries_security_headers(bpe_server):
    url, _, _ = bpe_server
    page = httpx.get(url + "/")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "content-security-policy" in httpx.get(url + "/static/app.js").headers
