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
    chat = httpx.post(url + "/v1/chat/completions", json=base | {"messages": [{"role": "user", "content": "a"}],
                                                                  "n": 9})
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
