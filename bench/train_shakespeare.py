"""nanoGPT's CPU recipe on tiny Shakespeare (char level): lmforge's trainer vs the plain PyTorch loop, side by side.

The recipe (nanoGPT README, "I only have a macbook"): 4 layers x 4 heads x 128 dims, context 64, batch 12,
2000 iterations, AdamW lr 1e-3 (100 warmup iterations, cosine to 1e-4), beta2 0.99, weight decay 0.1, grad clip
1.0, no dropout, bias=False (nanoGPT's default), evaluation every 250 iterations on 20 batches.

First a short timing of the same model and batches in the plain way (nanoGPT's loop: foreach AdamW, `loss.item()`
every step) against lmforge's step, in this process one after the other, with the time the step's matrix multiplies
alone take (profiled: `matmul_ms`, a floor under any float32 implementation on a CPU without fast bfloat16), then
the full lmforge run. The last line is JSON: val_loss_at_2000 (nanoGPT-style: mean over 20 random val batches, the
same fixed-seed batches at every evaluation), full_val_loss_at_2000 (every validation token, in non-overlapping
64-token windows: the same quantity without the sampling noise of 20 batches, which is about +-0.02 here),
train_tokens_per_s, wall_s, and the speed ratio to the plain loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model
from lmforge.data import load_split, prepare, random_batch
from lmforge.evaluate import evaluate
from lmforge.model import Transformer
from lmforge.train.optim import make_optimizer
from lmforge.train.trainer import TrainConfig, build_model_config, train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def recipe(data: str, out: str, args) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=out,
        preset="gpt-nano",
        bias=args.bias,
        dropout=0.0,
        block_size=64,
        batch_size=12,
        max_iters=2000,
        lr=1e-3,
        warmup_iters=100,
        lr_decay_iters=2000,
        min_lr=1e-4,
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        eval_interval=250,
        eval_iters=20,
        log_interval=50,
        dtype=args.dtype,
        compile=args.compile,
        num_threads=args.threads,
        seed=args.seed,
        progress=not args.quiet,
    )


def make_step(cfg: TrainConfig, plain: bool):
    """One training step on a fresh model: the plain nanoGPT loop (plain=True: foreach AdamW, `loss.item()` every
    step) or the one lmforge's trainer runs (its optimizer, its autocast)."""
    torch.manual_seed(0)
    data = load_split(cfg.data, "train")
    model = Transformer(build_model_config(cfg, 65))
    if plain:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=True)
    else:
        opt = make_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and not plain)

    def step() -> None:
        x, y = random_batch(data, cfg.batch_size, cfg.block_size, gen)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if plain:
            loss.item()  # nanoGPT reads the loss every iteration (log_interval=1 in its CPU recipe)

    for _ in range(5):  # warm-up
        step()
    return step


def time_steps(cfg: TrainConfig, plain: bool, iters: int) -> float:
    """Median seconds per training step of `make_step`."""
    step, times = make_step(cfg, plain), []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_time(cfg: TrainConfig, steps: int = 20) -> dict:
    """Milliseconds per plain training step spent in matrix multiplies (forward and backward, profiled) and in all.

    On a CPU without fast bfloat16 the recipe's float32 matmuls already run near the GEMM peak, so their time
    is a floor under any float32 step: the step cannot get faster than this however little else it does.
    """
    from torch.profiler import profile

    step = make_step(cfg, plain=True)
    t0 = time.perf_counter()
    with profile() as prof:
        for _ in range(steps):
            step()
    total_ms = 1000 * (time.perf_counter() - t0) / steps
    mm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return {"matmul_ms": round(mm_us / 1000 / steps, 2), "profiled_step_ms": round(total_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="biases in linear layers and norms (nanoGPT's default: no)",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--compare-iters", type=int, default=60, help="steps timed for the side-by-side (0: skip)")
    parser.add_argument("--seed", type=int, default=1337, help="nanoGPT's seed by default")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmforge-shakespeare-"))
    text = Path(args.data) / "tinyshakespeare" / "input.txt"
    prepare(text, work / "data", tokenizer="char", val_fraction=0.1)
    cfg = recipe(str(work / "data"), args.out or str(work / "run"), args)
    if args.threads:
        torch.set_num_threads(args.threads)

    compare = {}
    if args.compare_iters:
        plain, ours = time_steps(cfg, True, args.compare_iters), time_steps(cfg, False, args.compare_iters)
        mm = matmul_time(cfg)
        compare = {
            "plain_step_ms": round(1000 * plain, 2),
            "lmforge_step_ms": round(1000 * ours, 2),
            "step_speedup_vs_plain": round(plain / ours, 3),
            **mm,
            "speedup_if_only_matmuls_ran": round(1000 * plain / mm["matmul_ms"], 3),
        }
        print(json.dumps({"side_by_side": compare}), flush=True)

    summary = train(cfg)
    evals = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    at_2000 = next(r["val_loss"] for r in evals if r.get("iter") == 2000 and "val_loss" in r)
    with torch.no_grad():  # the model after 2,000 steps on every validation token: no sampling noise
        model, _ = load_model(Path(cfg.out) / "last")
        full = evaluate(model, load_split(cfg.data, "val"), block_size=64)["loss"]
    print(
        json.dumps(
            {
                "val_loss_at_2000": round(at_2000, 4),
                "full_val_loss_at_2000": round(full, 4),
                "train_tokens_per_s": round(summary["train_tokens_per_s"]),
                "wall_s": round(summary["wall_s"], 1),
                "iters": summary["iters"],
                "preset": "gpt-nano",
                "bias": args.bias,
                "dtype": args.dtype,
                "seed": args.seed,
                "compile": args.compile,
                "threads": torch.get_num_threads(),
                "run_dir": cfg.out,
                **compare,
                "nanogpt_reference": {"val_loss_at_2000": 1.886, "train_tokens_per_s": 15500, "wall_s": 114},
            }
        )
    )


if __name__ == "__main__":
    main()
