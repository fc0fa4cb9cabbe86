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


def _char_model(folder, block_size=128):
    tok = train_tokenizer("char", ["abab ba\n" * 10])
    assert set(tok.vocab) == set(CHARS) and tok.eos_id is None
    torch.manual_seed(0)
    save_model(folder, Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1,
                                               n_head=2, n_embd=32)), tok)
    return str(folder)


@pytest.fixture(scope="module")
def char_server(tmp_path_factory):
    proc, url = start_server(_char_model(tmp_path_factory.mktemp("char") / "tiny"), "--log-level", "warning",
                             "--max-batch", "4", "--max-queue", "4")
    yield url
    stop_server(proc)


def _sse(response) -> list[dict | str]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


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
            results[i] = [json.loads(first[6:])] + [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                                                    for line in lines if line.startswith("data: ")]

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
