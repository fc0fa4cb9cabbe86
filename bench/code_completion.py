"""Code completion on the Python standard library, end to end, under a training budget (docs/code-completion.md).

prepare python-stdlib with whole files held out (default: corpus.STDLIB_HOLDOUT) and a 4096-token byte-level BPE
trained without them -> train gpt-mini (context 256) for `--minutes` of wall time -> on the held-out files:
perplexity, and next-line exact match on `--next-line` sampled code lines (with the score of repeating the
previous line beside it, the floor a model must beat). The iteration count is chosen to fill the budget: 20
timed steps first, then as many as fit, so the cosine schedule ends on time; a wall-clock stop is the safety net.
Prints JSON lines; the last holds heldout_ppl, next_line_exact_match, lines, heldout_files and train_minutes.

    .venv/bin/python bench/code_completion.py                    # ~10 minutes of training, 1 thread
    .venv/bin/python bench/code_completion.py --minutes 0.3 --max-chars 300000 --vocab-size 1024 --next-line 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RECIPE = {
    "preset": "gpt-mini",
    "block_size": 256,
    "batch_size": 8,
    "lr": 2e-3,
    "min_lr": 2e-4,
    "warmup_iters": 40,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "eval_interval": 200,
    "eval_iters": 10,
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for training")
    parser.add_argument("--preset", default=RECIPE["preset"], help="model preset")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--max-chars", type=int, default=4_000_000, help="characters of train + val text")
    parser.add_argument("--holdout-files", nargs="+", default=["default"], help="held-out files (names, globs)")
    parser.add_argument("--next-line", type=int, default=200, help="held-out lines to complete")
    parser.add_argument("--max-line-tokens", type=int, default=48, help="tokens a line completion may use")
    parser.add_argument("--threads", type=int, default=1, help="torch (and tokenizer) threads")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the BPE trainer's and encoder's threads

    import torch

    from lmforge.checkpoint import load_model
    from lmforge.data import load_split, prepare
    from lmforge.evaluate import (
        complete_lines,
        evaluate,
        next_line_exact_match,
        sample_line_targets,
        split_documents,
    )
    from lmforge.train.trainer import TrainConfig, train

    torch.set_num_threads(args.threads)
    work = Path(args.out or tempfile.mkdtemp(prefix="lmforge-code-"))
    data, run = work / "data", work / "run"
    recipe = {**RECIPE, "preset": args.preset}

    t0 = time.perf_counter()
    meta = prepare(
        "python-stdlib",
        data,
        tokenizer="bpe",
        vocab_size=args.vocab_size,
        max_chars=args.max_chars,
        holdout_files=args.holdout_files,
    )
    emit(
        {
            "stage": "prepare",
            "seconds": round(time.perf_counter() - t0, 1),
            "splits": meta["splits"],
            "documents": meta["documents"],
            "holdout_files": meta["holdout_files"],
        }
    )

    # Calibrate: 20 steps of the recipe (constant lr, no evaluation) give the seconds per iteration.
    probe = train(
        TrainConfig(
            data=str(data),
            out=str(work / "probe"),
            **{**recipe, "eval_interval": 10**6},
            schedule="constant",
            max_iters=20,
            log_interval=20,
            progress=False,
            num_threads=args.threads,
            seed=args.seed,
        )
    )
    step_s = probe["tokens_per_iter"] / probe["train_tokens_per_s"]
    iters = max(20, int(60 * args.minutes / (step_s * 1.08)))  # ~8 % goes to the periodic evaluations
    t_train = time.perf_counter()
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(run),
            **recipe,
            max_iters=iters,
            max_minutes=args.minutes,
            log_interval=50,
            progress=False,
            num_threads=args.threads,
            seed=args.seed,
        )
    )
    train_minutes = (time.perf_counter() - t_train) / 60
    emit(
        {
            "stage": "train",
            "iters": summary["iters"],
            "planned_iters": iters,
            "stop_reason": summary["stop_reason"],
            "best_val_loss": round(summary["best_val_loss"], 4) if summary["best_val_loss"] < float("inf") else None,
            "train_minutes": round(train_minutes, 2),
            "train_tokens_per_s": round(summary["train_tokens_per_s"]),
            "params": summary["params"],
        }
    )

    model, tok = load_model(run / "best")
    t1 = time.perf_counter()
    held = evaluate(model, load_split(data, "test"))
    val = evaluate(model, load_split(data, "val"), max_windows=200)
    emit(
        {
            "stage": "perplexity",
            "heldout_ppl": round(held["ppl"], 3),
            "heldout_tokens": held["tokens"],
            "val_ppl": round(val["ppl"], 3),
            "seconds": round(time.perf_counter() - t1, 1),
        }
    )

    documents = [tok.decode(d.tolist()) for d in split_documents(load_split(data, "test"), tok.eos_id)]
    t2 = time.perf_counter()
    score = next_line_exact_match(model, tok, documents, args.next_line, max_line_tokens=args.max_line_tokens)
    targets = sample_line_targets(documents, args.next_line)  # the same lines (same seed)
    repeat = sum(
        documents[d][:cut].rsplit("\n", 1)[-1].rstrip() == documents[d][s:e].rstrip() for d, cut, s, e in targets
    ) / max(len(targets), 1)
    emit(
        {
            "stage": "next_line",
            **score,
            "baseline_repeat_previous_line": round(repeat, 4),
            "seconds": round(time.perf_counter() - t2, 1),
        }
    )
    for (d, cut, s, e), line in zip(
        targets[:8], complete_lines(model, tok, documents, targets[:8], max_line_tokens=args.max_line_tokens)
    ):
        emit({"example": documents[d][:cut].rsplit("\n", 1)[-1], "truth": documents[d][s:e], "predicted": line})

    emit(
        {
            "heldout_ppl": round(held["ppl"], 3),
            "next_line_exact_match": round(score["next_line_exact_match"], 4),
            "lines": score["next_line_count"],
            "heldout_files": meta["holdout_files"],
            "train_minutes": round(train_minutes, 2),
            "iters": summary["iters"],
            "val_ppl": round(val["ppl"], 3),
            "baseline_repeat_previous_line": round(repeat, 4),
            "preset": args.preset,
            "vocab_size": meta["vocab_size"],
            "max_chars": args.max_chars,
            "threads": args.threads,
            "wall_s": round(time.perf_counter() - t0, 1),
            "run_dir": str(run),
        }
    )


if __name__ == "__main__":
    main()
