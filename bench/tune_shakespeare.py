"""A TPE search with median pruning on tiny Shakespeare (char level) against the default recipe at the same budget.

Every trial, and the default, trains the same small model (2 layers x 4 heads x 64 dims by default, context 64,
batch 12) for the same number of iterations, evaluating every --eval-interval iterations on the same fixed-seed
validation batches. The search covers the learning rate, warmup, weight decay, dropout, beta2, label smoothing and
depth; the default is TrainConfig's own settings for all of those. Each run uses one thread.

The last line is JSON: trials, pruned, best_val_loss, default_val_loss (both the best validation loss of the run),
improvement, best_params, wall_s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.data import prepare
from lmforge.train.space import parse_spec
from lmforge.train.trainer import TrainConfig, train
from lmforge.train.tune import tune

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPACE = [
    "lr=3e-4:3e-2:log",
    "warmup_iters=0:100",
    "weight_decay=0:0.3",
    "dropout=0:0.2",
    "beta2=0.9:0.999",
    "label_smoothing=0:0.1",
    "n_layer=1,2,3",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding tinyshakespeare/input.txt")
    parser.add_argument("--out", default=None, help="search folder (default: a temporary one)")
    parser.add_argument("--trials", type=int, default=20, help="trials to finish (completed + pruned)")
    parser.add_argument("--iters", type=int, default=300, help="iterations per trial and for the default")
    parser.add_argument("--eval-interval", type=int, default=50, help="iterations between evaluations")
    parser.add_argument("--eval-iters", type=int, default=10, help="validation batches per evaluation")
    parser.add_argument("--n-embd", type=int, default=64, help="model width")
    parser.add_argument("--n-layer", type=int, default=2, help="depth of the default (the search tries 1-3)")
    parser.add_argument("--startup-trials", type=int, default=6, help="random trials before TPE models")
    parser.add_argument("--pruner-startup-trials", type=int, default=4, help="trials finished before pruning")
    parser.add_argument("--pruner-warmup-steps", type=int, default=100, help="iterations before a trial may be pruned")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    args = parser.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="lmforge-tune-"))
    data = work / "data"
    if not (data / "meta.json").exists():
        prepare(Path(args.data) / "tinyshakespeare" / "input.txt", data, tokenizer="char", val_fraction=0.1)
    fixed = dict(
        preset="gpt-nano",
        n_embd=args.n_embd,
        n_head=4,
        block_size=64,
        batch_size=12,
        max_iters=args.iters,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        log_interval=50,
        num_threads=1,
    )

    t0 = time.perf_counter()
    default = train(
        TrainConfig(data=str(data), out=str(work / "default"), n_layer=args.n_layer, progress=False, **fixed)
    )
    print(
        json.dumps(
            {
                "default": {
                    "best_val_loss": round(default["best_val_loss"], 4),
                    "wall_s": round(default["wall_s"], 1),
                    "params": default["params"],
                }
            }
        ),
        flush=True,
    )

    space = dict(parse_spec(spec) for spec in SPACE)
    result = tune(
        str(data),
        str(work / "search"),
        space,
        fixed,
        trials=args.trials,
        sampler="tpe",
        seed=args.seed,
        startup_trials=args.startup_trials,
        pruner_startup_trials=args.pruner_startup_trials,
        pruner_warmup_steps=args.pruner_warmup_steps,
    )
    print(
        json.dumps({"search": {k: result[k] for k in ("complete", "pruned", "failed", "wall_s", "best_trial")}}),
        flush=True,
    )
    print(
        json.dumps(
            {
                "trials": result["trials"],
                "pruned": result["pruned"],
                "pruned_fraction": round(result["pruned"] / result["trials"], 3),
                "best_val_loss": round(result["best_val_loss"], 4),
                "default_val_loss": round(default["best_val_loss"], 4),
                "improvement": round(default["best_val_loss"] - result["best_val_loss"], 4),
                "beats_default": result["best_val_loss"] < default["best_val_loss"],
                "best_params": {
                    k: round(v, 6) if isinstance(v, float) else v for k, v in result["best_params"].items()
                },
                "iters_per_trial": args.iters,
                "search_wall_s": result["wall_s"],
                "wall_s": round(time.perf_counter() - t0, 1),
                "out": str(work),
            }
        )
    )


if __name__ == "__main__":
    main()
