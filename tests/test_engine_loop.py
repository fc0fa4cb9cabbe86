"""The engine loop as the server uses it: text made off the engine's thread, one hand-off per step, clients that
go away, and an engine thread that dies.

The engine runs in-process (a thread of the server's process), so these are the guarantees of that design: the
streamed text equals the engine's own detokenization, a disconnected client's blocks are freed at once, and a
dead engine thread makes the server answer 503 instead of leaving requests waiting.
"""

import asyncio
import dataclasses
import threading
import time

import httpx
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.engine.loop import EngineLoop, EngineStopped
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import CharTokenizer

TEXT = "the cat sat on the mat and the dog ate the hat. "


def char_model(block_size: int = 128):
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=32))
    return model.eval(), tok


def test_streams_make_the_engines_text_and_stop_where_it_stops():
    """Each stream's text (decoded by its reader, stop strings found there) is the text the engine's own
    detokenization gives, sample by sample, with the same finish reasons, for greedy, seeded n=2 sampling and
    stop strings that fire mid-output; the sequences a stop string ended free their blocks."""
    model, tok = char_model()
    prompts = [tok.encode(p) for p in ("the cat", "a dog ate", "on the")]
    free = [
        SamplingParams(max_tokens=30, temperature=0),
        SamplingParams(max_tokens=30, seed=3, n=2),
        SamplingParams(max_tokens=30, seed=4, temperature=0.7),
    ]
    outputs = Engine(model, tok, block_size=4).generate(prompts, free)
    # a stop cut from the middle of each prompt's first free output, so it is sure to fire there
    firsts = [next(c for c in outputs if c.prompt_index == i) for i in range(len(prompts))]
    params = [dataclasses.replace(p, stop=[c.text[8:10]]) for p, c in zip(free, firsts)]
    expected = Engine(model, tok, block_size=4).generate(prompts, params)
    assert any(c.finish_reason == "stop" for c in expected)
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    with EngineLoop(engine) as loop:
        streams = [loop.submit(p, sp) for p, sp in zip(prompts, params)]
        got = {}
        for i, stream in enumerate(streams):
            for out in stream:
                text, reason = got.get((i, out.index), ("", None))
                got[i, out.index] = (text + out.text, out.finish_reason or reason)

        async def read_async():  # the same through an event loop
            streams = [loop.submit(p, sp) for p, sp in zip(prompts, params)]
            texts = {}
            for i, stream in enumerate(streams):
                async for out in stream:
                    texts[i, out.index] = texts.get((i, out.index), "") + out.text
            return texts

        texts = asyncio.run(read_async())
        time.sleep(0.2)  # the last stop command is applied between steps
        stats = loop.last_stats
    want = {(c.prompt_index, c.sample_index): (c.text, c.finish_reason) for c in expected}
    assert got == want
    assert texts == {k: t for k, (t, _) in want.items()}
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and engine.requests == {}


def test_a_step_wakes_an_event_loop_once_for_all_its_streams():
    """Eight streams of 12 tokens each: the engine hands their outputs to the event loop in one
    call_soon_threadsafe per step (about 13 steps), not one per token per stream (96 and more)."""
    model, tok = char_model()
    engine = Engine(model, tok, block_size=4, num_blocks=64)
    calls = []

    async def run():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kw):
            if threading.current_thread().name == "lmforge-engine":
                calls.append(callback)
            return original(callback, *args, **kw)

        loop.call_soon_threadsafe = counting  # the event loop's own method, counted: nothing of lmforge replaced
        with EngineLoop(engine) as engine_loop:
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            streams = [engine_loop.submit(tok.encode("the " * (i + 1)), params) for i in range(8)]
            tokens = []
            for stream in streams:
                tokens.append(sum([len(out.new_token_ids) async for out in stream]))
        return tokens

    assert asyncio.run(run()) == [12] * 8
    assert engine.counters["steps"] <= 14
    assert 0 < len(calls) <= engine.counters["steps"] + 1, (len(calls), engine.counters["steps"])


class Fatal(BaseException):
    """What kills a thread outright (as SystemExit or a KeyboardInterrupt would): no `except Exception` stops it."""


class KillsTheEngine:
    """A sampling guard (lmforge.infer.sampling.TokenGuard) that raises Fatal on the engine's thread."""

    end_token = None

    def observe(self, logits):
        raise Fatal("the engine thread is going down")

    def rejects(self, context, prompt_len, token):
        return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_thread_that_dies_ends_every_stream_and_refuses_new_requests():
    model, tok = char_model()
    with EngineLoop(Engine(model, tok, block_size=4, num_blocks=64)) as loop:
        waiting = loop.submit(tok.encode("the"), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        loop.submit(tok.encode("the cat"), SamplingParams(max_tokens=5, guard=KillsTheEngine()))
        with pytest.raises(EngineStopped, match="Fatal"):
            list(waiting)  # ends with the error instead of waiting forever
        assert not loop.alive and isinstance(loop.error, Fatal)
        with pytest.raises(EngineStopped):
            loop.submit(tok.encode("the"), SamplingParams(max_tokens=2))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_server_answers_503_when_its_engine_thread_dies():
    """A request streaming when the engine thread dies ends with an error event (it does not hang), and every
    later request, and /health, answer 503."""
    from fastapi.testclient import TestClient

    from lmforge.serve.app import ServeSettings, create_app

    model, tok = char_model(block_size=1024)
    with TestClient(create_app(model, tok, ServeSettings(model="tiny")), base_url="http://localhost") as c:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 1000, "stream": True}  # (no end token)
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            c.app.state.server.loop.submit(tok.encode("the"), SamplingParams(max_tokens=5, guard=KillsTheEngine()))
            rest = [line for line in lines if line.startswith("data: ")]
        assert "engine_unavailable" in rest[-1] and len(rest) < 1000  # the error event ends it early
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "the", "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert c.get("/health").status_code == 503


def test_a_client_that_disconnects_frees_its_blocks_at_once(tmp_path):
    """A real server (its own process, real HTTP): a long streamed answer whose client hangs up after one chunk
    gives its KV blocks back at once (within 3 s on a loaded machine), with no other request to push the engine
    along."""
    from lmforge.checkpoint import save_model
    from lmforge.serve.process import start_server, stop_server

    model, tok = char_model(block_size=1024)
    save_model(tmp_path / "tiny", model, tok)
    proc, base = start_server(str(tmp_path / "tiny"), "--log-level", "warning")
    try:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 1000, "stream": True}  # (no end token)
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", base + "/v1/completions", json=body) as r:
                lines = r.iter_lines()  # (kept: an iterator dropped would close the response at once)
                assert next(lines).startswith("data: ")
                assert httpx.get(base + "/health").json()["engine"]["kv_blocks_used"] > 0
        t0, stats = time.monotonic(), None
        while time.monotonic() - t0 < 3.0:
            stats = httpx.get(base + "/health").json()["engine"]
            if stats["kv_blocks_used"] == 0:
                break
            time.sleep(0.02)
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0, stats
        assert stats["generated_tokens"] < 1000, stats  # it stopped early
    finally:
        stop_server(proc)
