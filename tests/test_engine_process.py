"""The engine in its own process (`lmforge serve --engine process`, the default) against the engine on the
server's thread (`--engine thread`): the same streamed text for every request, a hang-up frees its blocks at once,
and a killed engine makes the server answer 503 and exit rather than hang.

Real servers (subprocesses on loopback) driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

CORPUS = ["the cat sat on the mat and the dog sat on the log.\n", "hello world, how are you today?\n"] * 60


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine_process") / "tiny"
    tok = train_tokenizer("bpe", CORPUS, 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=32)
    save_model(path, Transformer(cfg), tok)
    return path


def start(folder, engine: str, *flags: str):
    return start_server(str(folder), "--engine", engine, "--log-level", "warning", "--max-batch", "8", *flags)


REQUESTS = [  # (kind, arguments): greedy and seeded sampling, stop strings, n > 1, chat and completions
    ("completion", dict(prompt="the cat", max_tokens=40, temperature=0)),
    ("completion", dict(prompt="hello", max_tokens=60, temperature=0.9, seed=1)),
    ("completion", dict(prompt="the dog sat", max_tokens=50, temperature=1.0, seed=2, n=2)),
    ("completion", dict(prompt="how are", max_tokens=80, temperature=0.7, top_p=0.9, seed=3, stop=["o"])),
    ("completion", dict(prompt="mat", max_tokens=30, temperature=0, stop=["the", "\n"])),
    ("chat", dict(messages=[{"role": "user", "content": "hello world"}], max_tokens=40, temperature=0)),
    ("chat", dict(messages=[{"role": "user", "content": "the log"}], max_tokens=70, temperature=0.8, seed=5)),
    ("chat", dict(messages=[{"role": "user", "content": "cat"}], max_tokens=50, temperature=1.0, seed=6, n=3)),
] * 2


async def streamed_texts(url: str) -> list[dict[int, str]]:
    """Every request of REQUESTS at once, streamed: each one's text per choice index, as the client assembles it."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    async def one(kind: str, args: dict) -> dict[int, str]:
        texts: dict[int, str] = {}
        if kind == "completion":
            stream = await client.completions.create(model="tiny", stream=True, **args)
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + c.text
        else:
            stream = await client.chat.completions.create(model="tiny", stream=True, **args)
            async for chunk in stream:
                for c in chunk.choices:
                    texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        return texts

    try:
        return await asyncio.gather(*(one(kind, args) for kind, args in REQUESTS))
    finally:
        await client.close()


def test_every_request_streams_the_same_text_with_the_engine_in_its_own_process_or_on_a_thread(folder):
    results = {}
    for engine in ("thread", "process"):
        proc, url = start(folder, engine)
        try:
            health = httpx.get(url + "/health").json()
            assert (health["engine_pid"] is None) == (engine == "thread")
            if engine == "process":
                assert health["engine_pid"] != proc.pid and health["engine"]["kv_blocks_total"] > 0
            results[engine] = asyncio.run(streamed_texts(url))
        finally:
            assert stop_server(proc) in (0, -15)
    assert results["process"] == results["thread"]
    texts = [t for r in results["process"] for t in r.values()]
    assert len(texts) == sum(args.get("n", 1) for _, args in REQUESTS)
    assert sum(1 for t in texts if len(t) > 20) > len(texts) // 2  # real answers, not empty ones compared


def blocks_used(url: str) -> int:
    return httpx.get(url + "/health").json()["engine"]["kv_blocks_used"]


def test_a_client_that_hangs_up_frees_its_blocks_at_once_in_the_engine_process(folder):
    proc, url = start(folder, "process")
    try:
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                busy = blocks_used(url)
            # the response is closed here: the client went away mid-answer
        freed_after = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            if blocks_used(url) == 0:
                freed_after = time.monotonic() - t0
                break
            time.sleep(0.02)
        assert busy > 0 and freed_after is not None and freed_after < 2.0, (busy, freed_after)
        # and the server goes on serving
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        assert stop_server(proc) in (0, -15)


def test_a_killed_engine_process_ends_open_streams_gets_503_and_the_server_exits(folder):
    proc, url = start(folder, "process")
    try:
        pid = httpx.get(url + "/health").json()["engine_pid"]
        got: dict = {}

        def stream() -> None:  # a long answer in flight when the engine dies
            body = {"model": "tiny", "prompt": "the", "max_tokens": 450, "temperature": 0, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    got["lines"] = [line for line in r.iter_lines() if line]
            except httpx.HTTPError as e:  # the connection closed under it: also an end, not a hang
                got["error"] = e

        reader = threading.Thread(target=stream)
        reader.start()
        while blocks_used(url) == 0:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive(), "the stream hung after the engine died"
        assert (
            got.get("error") is not None
            or got["lines"][-1] != "data: [DONE]"
            or any("error" in line for line in got["lines"])
        )
        statuses = []
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 30:
            try:
                r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, timeout=5)
                statuses.append(r.status_code)
            except httpx.HTTPError:
                pass  # shutting down: the socket is closed
            time.sleep(0.05)
        assert proc.wait(timeout=5) == 1  # it exited by itself, non-zero: a supervisor restarts it
        assert set(statuses) <= {503}, statuses
    finally:
        if proc.poll() is None:
            stop_server(proc)


def test_a_killed_server_leaves_no_engine_process_behind(folder):
    proc, url = start(folder, "process")
    pid = httpx.get(url + "/health").json()["engine_pid"]
    proc.kill()  # SIGKILL: no shutdown runs; the engine sees its pipe close
    proc.wait()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15:
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is gone as far as work goes
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the engine process outlived its server")
