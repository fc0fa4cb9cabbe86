"""`lmforge bench MODEL`: prefill and decode speed of one model, per batch size and dtype, as JSON lines.

Prefill tok/s = batch * prompt_len / time of the prompt's forward pass; decode tok/s = batch * new_tokens /
(time of the whole greedy `generate` call - prefill time). Each figure is the median of a few repeats after a
warm-up. Random prompts; with a preset name the weights are random too, which does not change the speed.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from lmforge.infer.fused import decode_path
from lmforge.infer.generate import generate, prefill
from lmforge.infer.sampling import SamplingParams
from lmforge.loader import load


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s of greedy generation for `batch` random prompts of `prompt_len` tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def run_prefill():
        with torch.inference_mode():
            prefill(model, prompts, prompt_len + new_tokens - 1)

    def run_generate():
        generate(model, prompts, params)

    run_generate()  # warm-up: allocator, kernels
    t_prefill = _median_time(run_prefill, repeats)
    t_total = _median_time(run_generate, repeats)
    t_decode = max(t_total - t_prefill, 1e-9)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tok_s": round(batch * prompt_len / t_prefill, 1),
        "decode_tok_s": round(batch * new_tokens / t_decode, 1),
        "total_s": round(t_total, 3),
    }


# The list defaults are what the CLI shows and passes (lmforge.cli); nothing mutates them.
def bench_command(
    model: str,
    batch_sizes: list[int] = [1, 8],  # noqa: B006
    dtypes: list[str] = ["float32"],  # noqa: B006
    prompt_len: int = 32,
    new_tokens: int | None = None,
    repeats: int = 3,
) -> int:
    """Measure prefill and decode tokens/s of a model, one JSON line per batch size and dtype.

    Args:
        model: model folder, or a preset name (e.g. gpt-14m) for random weights.
        batch_sizes: batch sizes to measure.
        dtypes: weight dtypes to measure (float32, bfloat16).
        prompt_len: tokens per prompt.
        new_tokens: greedy tokens generated per prompt; default 128, or what the model's context leaves after
            the prompt when that is less.
        repeats: timed repeats per case (the median is reported).
    """
    for name, values, low in (
        ("batch_sizes", batch_sizes, 1),
        ("prompt_len", [prompt_len], 1),
        ("new_tokens", [1 if new_tokens is None else new_tokens], 1),
        ("repeats", [repeats], 1),
    ):
        if not values or min(values) < low:
            raise ValueError(f"{name}={values} must hold values >= {low}")
    cases = []
    for dtype in dtypes:
        net = load(model, dtype=dtype).model
        if new_tokens is None:  # the demo's 128-token model: 32 + 128 would not fit
            new_tokens = max(1, min(128, net.config.block_size - prompt_len))
        for batch in batch_sizes:
            case = {
                "model": model,
                "dtype": dtype,
                **measure(net, batch, prompt_len, new_tokens, repeats),
                "decode_path": decode_path(net),
                "threads": torch.get_num_threads(),
            }
            cases.append(case)
            print(json.dumps(case), flush=True)
    best = max(cases, key=lambda c: c["decode_tok_s"])
    print(
        json.dumps(
            {
                "summary": True,
                "model": model,
                "cases": len(cases),
                "decode_tok_s": {f"{c['dtype']}/b{c['batch']}": c["decode_tok_s"] for c in cases},
                "prefill_tok_s": {f"{c['dtype']}/b{c['batch']}": c["prefill_tok_s"] for c in cases},
                "best": f"{best['dtype']}/b{best['batch']}",
            }
        ),
        flush=True,
    )
    return 0
