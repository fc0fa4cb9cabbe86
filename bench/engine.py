"""Engine throughput: one request alone vs 32 at once on gpt-14m (random weights), and KV bytes per live token.

Each figure is the median of --repeats runs, measured side by side in one process:
- engine_single / engine_concurrent: tokens/s of the serving engine with 1 and with --concurrency requests
  submitted together (prompts of --prompt-len tokens, --new-tokens each, greedy, ignore_eos);
- plain_single / plain_batched: the same work through lmforge.infer.generate (one left-padded batch, contiguous
  KV cache), the plain way the engine must keep up with.
Every repeat runs each case: the same weights in each --dtype (bfloat16, the first and headline one, and float32),
each with the engine's KV pool in each --kv-dtype (float16, the headline, and the model's own). bfloat16 weights
are what make 32 rows cheap on a CPU: the fused step hands their matrix products to oneDNN's bfloat16 kernels
(AVX-512 BF16, AMX), 2-5x float32's time at 32 rows, while one row still streams the weights at memory speed;
float16 or bfloat16 keys and values halve what attention reads. Ends with one JSON line holding, for the first
case, concurrency_speedup (engine concurrent / engine single of the same case, the median of per-repeat ratios),
speedup_vs_best_single (concurrent / the fastest single request of any case in that repeat, so a slow single
request cannot flatter the ratio) and kv_bytes_per_token (measured: bytes of the KV blocks held / live tokens, at
the moment of most live tokens; kv_bytes_per_token_ideal is 2 * n_layer * kv_dim * KV dtype bytes), and by_case
with every case's.

Where the concurrent run's time goes, so a shortfall can be placed: decode_step_ms is the median step that decoded
every request and nothing else; gemm_ms is what that step's matrix products alone take (each linear layer and the
head, in order, --concurrency rows, through the decode path's own kernel); concurrency_ceiling is the speedup the
engine would show if each such step cost only gemm_ms (attention, norms, sampling and Python free): a bound no
scheduling or attention work can pass at this precision on this machine.

    python bench/engine.py [--dtype float32] [--kv-dtype auto] [--concurrency 32] [--repeats 3] [--decode packed]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.generate import generate
from lmforge.infer.packed import GemmLinear, PackedLinear, pack_linears
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_engine(
    model, prompts, params, block_size: int, budget: int, kv_dtype: str = "auto"
) -> tuple[float, dict, dict]:
    """(tokens/s, stats at the step with the most live tokens, timing) for one batch of requests through the engine;
    timing: tokens, seconds, and the seconds of each step that decoded every request and nothing else."""
    engine = Engine(
        model,
        block_size=block_size,
        max_num_seqs=len(prompts),
        max_num_batched_tokens=budget,
        kv_dtype=None if kv_dtype == "auto" else DTYPES[kv_dtype],
    )
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
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, GemmLinear, PackedLinear))]  # float32: Gemm...
    none = torch.Tensor()
    dtype = torch.float32 if fused is not None else next(model.parameters()).dtype  # the step's activations
    xs = [torch.randn(rows, m.in_features, dtype=dtype) for m in layers]

    def one_pass():
        for m, x in zip(layers, xs):
            if fused is None:
                m(x)
            else:  # bfloat16 models' layers are packed for oneDNN, and the step multiplies by the packed weight
                fused.extension.linear_act(x, m.packed if isinstance(m, PackedLinear) else m.weight, none, none, 0)

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
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=["bfloat16", "float32"],
        choices=["float32", "bfloat16"],
        help="weight dtype(s), each model measured in every repeat; the first gives the headline",
    )
    ap.add_argument(
        "--kv-dtype",
        nargs="+",
        default=["float16", "auto"],
        choices=["auto", "float16"],
        help="the engine's KV pool dtype(s), each measured in every repeat (auto: the model's); the "
        "first gives the headline",
    )
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--decode",
        default="fused",
        choices=["fused", "packed"],
        help="fused: the model as `lmforge serve` prepares it; packed: oneDNN-packed linear layers",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = Transformer(ModelConfig.from_name(args.preset)).eval()
    models = {}
    for dtype in args.dtype:  # the same weights in each dtype
        model = copy.deepcopy(base).to(DTYPES[dtype])
        # fused: as `lmforge serve` runs it (decoding rows through lmforge.infer.fused); packed: oneDNN linear layers
        models[dtype] = prepare_for_decoding(model) if args.decode == "fused" else pack_linears(model)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, base.config.vocab_size, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.concurrency)
    ]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    cases = [(dtype, kv) for dtype in args.dtype for kv in args.kv_dtype]

    with torch.inference_mode():
        for model in models.values():  # warm up
            run_engine(model, prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), 16, 512)
        runs = {f"plain_{n}_{dtype}": [] for dtype in args.dtype for n in ("single", "batched")}
        m_of = {c: {"single": [], "concurrent": [], "step_ms": [], "ceiling": []} for c in cases}
        peaks, gemm_ms = {}, {dtype: [] for dtype in args.dtype}
        for _ in range(args.repeats):
            for dtype, model in models.items():
                gemm = gemm_seconds(model, args.concurrency)
                gemm_ms[dtype].append(1e3 * gemm)
                for kv in args.kv_dtype:
                    m = m_of[dtype, kv]
                    single = run_engine(model, prompts[:1], params, args.block_size, args.budget, kv)[0]
                    tps, peaks[dtype, kv], timing = run_engine(model, prompts, params, args.block_size, args.budget, kv)
                    full = timing["full_steps"]
                    m["single"].append(single)
                    m["concurrent"].append(tps)
                    m["step_ms"].append(1e3 * statistics.median(full))
                    # the same run with every full decode step cut to its matrix products
                    m["ceiling"].append(timing["tokens"] / (timing["seconds"] - sum(full) + len(full) * gemm) / single)
                runs[f"plain_single_{dtype}"].append(run_plain(model, prompts[:1], params))
                runs[f"plain_batched_{dtype}"].append(run_plain(model, prompts, params))
            # the best single request of this repeat, whatever its weight and KV dtypes
            best = max(m["single"][-1] for m in m_of.values())
            for m in m_of.values():
                m.setdefault("best_single", []).append(best)
            print(
                json.dumps(
                    {
                        **{k: round(v[-1], 1) for k, v in runs.items()},
                        **{
                            f"engine_{n}_{dtype}_kv_{kv}": round(m[n][-1], 1)
                            for (dtype, kv), m in m_of.items()
                            for n in ("single", "concurrent")
                        },
                    }
                ),
                flush=True,
            )

    def ratio(xs, ys) -> float:
        """Median over repeats of x/y measured in the same repeat: steadier than a ratio of medians on a busy
        machine, where the load drifts between repeats."""
        return round(statistics.median(x / y for x, y in zip(xs, ys)), 2)

    def case(dtype, kv) -> dict:
        m, peak = m_of[dtype, kv], peaks[dtype, kv]
        return dict(
            dtype=dtype,
            kv_dtype=kv,
            decode_path=decode_path(models[dtype]),
            engine_single_tok_s=round(statistics.median(m["single"]), 1),
            engine_concurrent_tok_s=round(statistics.median(m["concurrent"]), 1),
            concurrency_speedup=ratio(m["concurrent"], m["single"]),
            speedup_vs_best_single=ratio(m["concurrent"], m["best_single"]),
            speedup_vs_plain_single=ratio(m["concurrent"], runs[f"plain_single_{dtype}"]),
            engine_vs_plain_batched=ratio(m["concurrent"], runs[f"plain_batched_{dtype}"]),
            gemm_ms=round(statistics.median(gemm_ms[dtype]), 2),
            decode_step_ms=round(statistics.median(m["step_ms"]), 2),
            concurrency_ceiling=round(statistics.median(m["ceiling"]), 2),
            kv_bytes_per_token=round(peak["kv_bytes_per_live_token"], 1),
            kv_bytes_per_token_ideal=peak["kv_bytes_per_token_ideal"],
            kv_blocks_used_at_peak=peak["kv_blocks_used"],
            live_tokens_at_peak=peak["live_tokens"],
        )

    by_case = {f"{dtype}/kv_{kv}": case(dtype, kv) for dtype, kv in cases}
    result = dict(
        preset=args.preset,
        concurrency=args.concurrency,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        block_size=args.block_size,
        threads=torch.get_num_threads(),
        repeats=args.repeats,
        **{f"{k}_tok_s": round(statistics.median(v), 1) for k, v in runs.items()},
        **case(*cases[0]),
        by_case={k: {n: v for n, v in r.items() if n not in ("dtype", "kv_dtype")} for k, r in by_case.items()},
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
