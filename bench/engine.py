"""Engine throughput: one request alone vs 32 at once on gpt-14m (random weights), and KV bytes per live token.

Each figure is the median of --repeats runs, measured side by side in one process:
- engine_single / engine_concurrent: tokens/s of the serving engine with 1 and with --concurrency requests
  submitted together (prompts of --prompt-len tokens, --new-tokens each, greedy, ignore_eos);
- plain_single / plain_batched: the same work through lmforge.infer.generate (one left-padded batch, contiguous
  KV cache), the plain way the engine must keep up with.
The engine rows run once per --kv-dtype in every repeat (the KV pool in float16, the first and headline one, and
in the model's float32): float16 keys and values halve what attention reads at 32 rows. Ends with one JSON line
holding concurrency_speedup (engine concurrent / engine single, the median of per-repeat ratios) and
kv_bytes_per_token (measured: bytes of the KV blocks held / live tokens, at the moment of most live tokens;
kv_bytes_per_token_ideal is 2 * n_layer * kv_dim * KV dtype bytes) for the first KV dtype, and by_kv_dtype with
each one's.

Where the concurrent run's time goes, so a shortfall can be placed: decode_step_ms is the median step that decoded
every request and nothing else; gemm_ms is what that step's matrix products alone take (each linear layer and the
head, in order, --concurrency rows, through the decode path's own kernel); concurrency_ceiling is the speedup the
engine would show if each such step cost only gemm_ms (attention, norms, sampling and Python free): a bound no
scheduling or attention work can pass at this precision on this machine.

    python bench/engine.py [--dtype bfloat16] [--kv-dtype auto] [--concurrency 32] [--repeats 3] [--decode packed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.packed import PackedLinear, pack_linears
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_engine(model, prompts, params, block_size: int, budget: int, kv_dtype: str = "auto"
               ) -> tuple[float, dict, dict]:
    """(tokens/s, stats at the step with the most live tokens, timing) for one batch of requests through the engine;
    timing: tokens, seconds, and the seconds of each step that decoded every request and nothing else."""
    engine = Engine(model, block_size=block_size, max_num_seqs=len(prompts), max_num_batched_tokens=budget,
                    kv_dtype=None if kv_dtype == "auto" else DTYPES[kv_dtype])
    for p in prompts:
        engine.add_request(p, params)
    peak, tokens, full_steps, watching = {"live_tokens": 0}, 0, [], 0.0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        s0, computed = time.perf_counter(), engine.counters["computed_tokens"]
        n = sum(len(o.new_token_ids) for o in engine.step())
        s1 = time.perf_counter()
        if n == len(prompts) == engine.counters["computed_tokens"] - computed:
            full_steps.append(s1 - s0)
        tokens += n
        s = engine.stats()  # the bench watching, not engine work: its time is left out
        if s["live_tokens"] > peak["live_tokens"]:
            peak = s
        watching += time.perf_counter() - s1
    seconds = time.perf_counter() - t0 - watching
    return tokens / seconds, peak, {"tokens": tokens, "seconds": seconds, "full_steps": full_steps}


def gemm_seconds(model, rows: int, repeats: int = 15) -> float:
    """Median seconds of one decode step's matrix products alone for `rows` rows: every linear layer and the head,
    in model order, through the kernel the decode path uses (the fused one, else the layers themselves)."""
    fused = getattr(model, "fused_decoder", None)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    none = torch.Tensor()
    xs = [torch.randn(rows, m.in_features) for m in layers]

    def one_pass():
        for m, x in zip(layers, xs):
            fused.extension.linear_act(x, m.weight, none, none, 0) if fused is not None else m(x)

    one_pass()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_plain(model, prompts, params) -> float:
    t0 = time.perf_counter()
    outs = generate(model, prompts, params)
    return sum(len(c.tokens) for c in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt-14m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--kv-dtype", nargs="+", default=["float16", "auto"], choices=["auto", "float16"],
                    help="the engine's KV pool dtype(s), each measured in every repeat (auto: the model's); the "
                         "first gives the headline")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--decode", default="fused", choices=["fused", "packed"],
                    help="fused: the model as `lmforge serve` prepares it; packed: oneDNN-packed linear layers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(args.preset)).eval().to(DTYPES[args.dtype])
    # fused: as `lmforge serve` runs it (decoding rows through lmforge.infer.fused); packed: oneDNN linear layers
    model = prepare_for_decoding(model) if args.decode == "fused" else pack_linears(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.concurrency)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    with torch.inference_mode():
        run_engine(model, prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), 16, 512)  # warm up
        runs = {"plain_single": [], "plain_batched": []}
        kvs = {kv: {"single": [], "concurrent": [], "step_ms": [], "ceiling": []} for kv in args.kv_dtype}
        peaks, gemm_ms = {}, []
        for _ in range(args.repeats):
            gemm = gemm_seconds(model, args.concurrency)
            gemm_ms.append(1e3 * gemm)
            for kv, m in kvs.items():
                single = run_engine(model, prompts[:1], params, args.block_size, args.budget, kv)[0]
                tps, peaks[kv], timing = run_engine(model, prompts, params, args.block_size, args.budget, kv)
                full = timing["full_steps"]
                m["single"].append(single)
                m["concurrent"].append(tps)
                m["step_ms"].append(1e3 * statistics.median(full))
                # the same run with every full decode step cut to its matrix products
                m["ceiling"].append(timing["tokens"] / (timing["seconds"] - sum(full) + len(full) * gemm) / single)
            runs["plain_single"].append(run_plain(model, prompts[:1], params))
            runs["plain_batched"].append(run_plain(model, prompts, params))
            print(json.dumps({**{k: round(v[-1], 1) for k, v in runs.items()},
                              **{f"engine_{n}_kv_{kv}": round(m[n][-1], 1) for kv, m in kvs.items()
                                 for n in ("single", "concurrent")}}), flush=True)

    def ratio(xs, ys) -> float:
        """Median over repeats of x/y measured in the same repeat: steadier than a ratio of medians on a busy
        machine, where the load drifts between repeats."""
        return round(statistics.median(x / y for x, y in zip(xs, ys)), 2)

    by_kv = {kv: dict(
        kv_dtype=kv, engine_single_tok_s=round(statistics.median(m["single"]), 1),
        engine_concurrent_tok_s=round(statistics.median(m["concurrent"]), 1),
        concurrency_speedup=ratio(m["concurrent"], m["single"]),
        speedup_vs_plain_single=ratio(m["concurrent"], runs["plain_single"]),
        engine_vs_plain_batched=ratio(m["concurrent"], runs["plain_batched"]),
        decode_step_ms=round(statistics.median(m["step_ms"]), 2), concurrency_ceiling=round(statistics.median(m["ceiling"]), 2),
        kv_bytes_per_token=round(peaks[kv]["kv_bytes_per_live_token"], 1),
        kv_bytes_per_token_ideal=peaks[kv]["kv_bytes_per_token_ideal"], kv_blocks_used_at_peak=peaks[kv]["kv_blocks_used"],
        live_tokens_at_peak=peaks[kv]["live_tokens"]) for kv, m in kvs.items()}
    result = dict(
        preset=args.preset, dtype=args.dtype, decode_path=decode_path(model), concurrency=args.concurrency,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, block_size=args.block_size,
        threads=torch.get_num_threads(), repeats=args.repeats,
        **{f"{k}_tok_s": round(statistics.median(v), 1) for k, v in runs.items()},
        gemm_ms=round(statistics.median(gemm_ms), 2), **by_kv[args.kv_dtype[0]],
        by_kv_dtype={kv: {k: v for k, v in r.items() if k != "kv_dtype"} for kv, r in by_kv.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
