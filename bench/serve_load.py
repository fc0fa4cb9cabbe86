"""Load test of `lmforge serve` over loopback: many concurrent clients, mixed streaming, some hanging up.

Claim: with 64 concurrent clients sending 1,000 mixed requests (half streamed chat completions, half plain
completions, 10% of all requests streamed and dropped by the client mid-answer), the server answers no 5xx,
leaks no KV-cache blocks (lmforge_kv_blocks_used on /metrics returns to 0), and its aggregate generated tokens/s
is >= 5x sending the same kind of requests one at a time.

The sequential baseline sends a subset (--sequential-requests, default 32) of the same requests, minus the
dropped ones, one after another; tokens/s is a rate, so the subset needs no scaling. Time to first token is
measured on streamed requests from sending to the first content chunk.

It starts its own server subprocess on --model, by default a random-weight `gpt-14m` model folder saved to a
temporary directory with a byte-level BPE tokenizer trained on a slice of the Python standard library's source.

    python bench/serve_load.py                      # the full claim (minutes on a laptop CPU)
    python bench/serve_load.py --requests 200       # a quick check

The engine's own rate on the same requests (`engine_tok_s`) is measured after the server has stopped, in this
process, with no HTTP: the same model folder and settings, the same prompts (chat ones through the chat template,
with its turn stops), the same max_tokens (a dropped request's as many tokens as the client read before hanging
up), temperature 0.8, at most --concurrency in flight, each finished request replaced by the next. The summary's
`http_efficiency` is tok_s / engine_tok_s: what the HTTP layer keeps of the engine's rate. The load generator
runs in this process and the server in its own (its engine in a third, with --engine process, the default);
`loadgen_cpu_share`, `server_cpu_share` and `engine_process_cpu_share` are each process's CPU seconds over the load
phase's wall time x the machine's CPUs, so a load generator that competes with the server for the cores shows.

Prints one JSON line per phase and ends with the summary line: requests, errors_5xx, leaked_blocks, tok_s,
sequential_tok_s, speedup, engine_tok_s, http_efficiency, ttft_p50_ms, ttft_p99_ms (and more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lmforge.serve.process import start_server, stop_server


def stdlib_text(max_chars: int = 400_000) -> str:
    """Source of the Python standard library, the corpus for the default tokenizer and the prompts."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def default_model(folder: Path, corpus: str) -> str:
    """A random-weight gpt-14m with a BPE tokenizer trained on `corpus`, saved as a model folder."""
    import torch

    from lmforge.checkpoint import save_model
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer("bpe", [corpus[i : i + 10_000] for i in range(0, len(corpus), 10_000)], vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("gpt-14m", vocab_size=tok.vocab_size))
    save_model(folder, model, tok)
    return str(folder)


# ---------------------------------------------------------------------------------- requests


@dataclass
class Job:
    kind: str  # "chat-stream" | "completion" | "drop" (a streamed chat the client abandons after a few chunks)
    prompt: str
    max_tokens: int
    drop_after: int = 0


@dataclass
class Result:
    status: int  # HTTP status; 0 when the connection failed
    tokens: int = 0  # generated tokens the client received
    ttft_s: float | None = None
    job: Job | None = None


def make_jobs(n: int, corpus: str, drop_fraction: float, max_tokens: int, rng: random.Random) -> list[Job]:
    jobs = []
    for i in range(n):
        start = rng.randrange(0, len(corpus) - 400)
        prompt = corpus[start : start + rng.randint(40, 300)]
        tokens = rng.randint(max_tokens // 2, max_tokens)
        if rng.random() < drop_fraction:
            jobs.append(Job("drop", prompt, tokens, drop_after=rng.randint(1, 5)))
        else:
            jobs.append(Job("chat-stream" if i % 2 == 0 else "completion", prompt, tokens))
    return jobs


async def run_job(client: httpx.AsyncClient, model: str, job: Job) -> Result:
    if job.kind == "completion":
        body = {"model": model, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0.8}
        r = await client.post("/v1/completions", json=body)
        tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return Result(r.status_code, tokens)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": job.prompt}],
        "max_tokens": job.max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    result = Result(0)
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        result.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return result
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                chunks += 1
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - t0
                if job.kind == "drop" and chunks >= job.drop_after:
                    result.tokens = chunks
                    return result  # leaving the `async with` closes the connection mid-stream
    return result


async def run_all(
    url: str, model: str, jobs: list[Job], concurrency: int, timeout: float
) -> tuple[list[Result], float]:
    """Send `jobs` with at most `concurrency` in flight; returns the results and the wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[Result] = []
    queue = list(reversed(jobs))

    async def client_loop(client):
        while queue:
            job = queue.pop()
            try:
                result = await run_job(client, model, job)
            except httpx.HTTPError:
                result = Result(0)
            result.job = job
            results.append(result)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return results, time.perf_counter() - t0


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def settled_blocks_used(url: str, wait_s: float = 10.0) -> float | None:
    """KV blocks in use once the engine has nothing running or waiting (aborts free blocks at the next step)."""
    deadline = time.monotonic() + wait_s
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        used = metric(text, "lmforge_kv_blocks_used")
        busy = (metric(text, "lmforge_running_batch_size") or 0) + (metric(text, "lmforge_queue_length") or 0)
        if (used == 0 and busy == 0) or time.monotonic() > deadline:
            return used
        time.sleep(0.25)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_tok_s(model_path: str, jobs: list[Job], results: list[Result], args) -> tuple[float, int]:
    """(generated tokens/s, tokens) of the serving engine alone on the load phase's requests: the server's model
    and engine settings, no HTTP (see the module docstring)."""
    import torch

    from lmforge.infer.generate import prompt_tokens
    from lmforge.infer.sampling import SamplingParams
    from lmforge.serve.app import load_model
    from lmforge.serve.server import Server
    from lmforge.serve.settings import ServeSettings

    settings = ServeSettings(
        model=model_path, max_batch=args.max_batch, max_model_len=args.max_model_len, dtype=args.dtype
    )
    loaded = load_model(model_path, settings)
    server = Server(loaded.model, loaded.tokenizer, settings, loaded.template_folder or Path(model_path).parent)
    engine, tok = server.engine, loaded.tokenizer
    requests = []
    for job, result in zip(jobs, results):
        chat = job.kind != "completion"
        text = server.template.render([{"role": "user", "content": job.prompt}]) if chat else job.prompt
        prompt = prompt_tokens(tok, text)
        max_tokens = max(1, result.tokens) if job.kind == "drop" else job.max_tokens
        max_tokens = min(max_tokens, server.max_model_len - len(prompt))
        stop = list(server.template.turn_stops) if chat else []
        requests.append((prompt, dict(max_tokens=max_tokens, temperature=0.8, stop=stop)))

    pending, tokens = list(reversed(requests)), 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        while pending or engine.has_unfinished():
            while pending and len(engine.requests) < args.concurrency:
                prompt, params = pending.pop()
                engine.add_request(prompt, SamplingParams(**params))
            tokens += sum(len(out.new_token_ids) for out in engine.step())
        return tokens / (time.perf_counter() - t0), tokens


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder to serve (default: a random gpt-14m with a stdlib BPE tokenizer)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--drop-fraction", type=float, default=0.1, help="requests the client abandons mid-stream")
    ap.add_argument("--max-tokens", type=int, default=64, help="each request asks for max_tokens/2..max_tokens")
    ap.add_argument("--sequential-requests", type=int, default=32, help="subset sent one at a time for the baseline")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the served weights' dtype (`lmforge serve --dtype`), the engine-alone run's too",
    )
    ap.add_argument(
        "--engine",
        default="process",
        choices=["process", "thread"],
        help="where the server runs its engine (`lmforge serve --engine`): its own process or a thread",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    corpus = stdlib_text()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(Path(tmp) / "gpt-14m-stdlib", corpus)
        proc, url = start_server(
            model,
            "--max-batch",
            str(args.max_batch),
            "--max-queue",
            str(max(256, args.concurrency * 2)),
            "--max-model-len",
            str(args.max_model_len),
            "--dtype",
            args.dtype,
            "--engine",
            args.engine,
            "--log-level",
            "warning",
            timeout=120.0,
        )
        try:
            model_id = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
            jobs = make_jobs(args.requests, corpus, args.drop_fraction, args.max_tokens, rng)
            asyncio.run(run_all(url, model_id, jobs[:4], 4, args.timeout))  # warm-up: first-call costs

            baseline = [j for j in jobs if j.kind != "drop"][: args.sequential_requests]
            seq_results, seq_wall = asyncio.run(run_all(url, model_id, baseline, 1, args.timeout))
            seq_tok_s = sum(r.tokens for r in seq_results) / seq_wall
            print(
                json.dumps(
                    {
                        "phase": "sequential",
                        "requests": len(baseline),
                        "wall_s": round(seq_wall, 2),
                        "tok_s": round(seq_tok_s, 1),
                    }
                ),
                flush=True,
            )

            engine_pid = httpx.get(url + "/health", timeout=10).json()["engine_pid"]  # None: on a thread
            pids = [proc.pid] + ([engine_pid] if engine_pid else [])
            cpu0, server_cpu0 = time.process_time(), [process_cpu_seconds(p) for p in pids]
            results, wall = asyncio.run(run_all(url, model_id, jobs, args.concurrency, args.timeout))
            cpus = wall * (os.cpu_count() or 1)
            loadgen_cpu = (time.process_time() - cpu0) / cpus
            shares = [(process_cpu_seconds(p) - c0) / cpus for p, c0 in zip(pids, server_cpu0)]
            server_cpu, engine_cpu = shares[0], sum(shares[1:])
            leaked = settled_blocks_used(url)
        finally:
            stop_server(proc)
        engine_rate, engine_tokens = engine_tok_s(model, [r.job for r in results], results, args)
        print(
            json.dumps({"phase": "engine_alone", "tokens": engine_tokens, "tok_s": round(engine_rate, 1)}), flush=True
        )

    ttfts = [r.ttft_s * 1000 for r in results if r.ttft_s is not None]
    tok_s = sum(r.tokens for r in results) / wall
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    print(
        json.dumps(
            {
                "bench": "serve_load",
                "requests": len(results),
                "concurrency": args.concurrency,
                "dtype": args.dtype,
                "engine": args.engine,
                "dropped_mid_stream": sum(j.kind == "drop" for j in jobs),
                "statuses": statuses,
                "errors_5xx": sum(r.status >= 500 for r in results),
                "connection_errors": statuses.get("0", 0),
                "leaked_blocks": leaked,
                "generated_tokens": sum(r.tokens for r in results),
                "wall_s": round(wall, 2),
                "tok_s": round(tok_s, 1),
                "sequential_tok_s": round(seq_tok_s, 1),
                "sequential_requests": len(baseline),
                "speedup": round(tok_s / seq_tok_s, 2),
                "engine_tok_s": round(engine_rate, 1),
                "http_efficiency": round(tok_s / engine_rate, 3),
                "loadgen_cpu_share": round(loadgen_cpu, 3),
                "server_cpu_share": round(server_cpu, 3),
                "engine_process_cpu_share": round(engine_cpu, 3),
                "cpus": os.cpu_count(),
                "ttft_p50_ms": round(statistics.median(ttfts), 1) if ttfts else None,
                "ttft_p99_ms": round(percentile(ttfts, 0.99), 1) if ttfts else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
