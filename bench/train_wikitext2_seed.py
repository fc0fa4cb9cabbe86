"""The `seed` model (PyTorch word_language_model's Transformer) on WikiText-2 with the example's settings.

`python main.py --model Transformer` in pytorch/examples: word-level vocabulary (one `<eos>` per line), batch 20
streams, bptt 35, SGD lr 5 with no momentum, gradient clip 0.25, dropout 0.2, learning rate divided by 4 whenever
validation loss does not improve, evaluation over the validation split as 10 streams of consecutive bptt
windows. Prints validation perplexity and time after each epoch; the last line is JSON with val_ppl, epochs and
epoch_s (mean seconds per epoch, evaluation included).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from lmforge.data import prepare
from lmforge.train.trainer import TrainConfig, train

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-iters", type=int, default=None, help="stop early (a quick check of speed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmforge-wikitext2-"))
    meta = prepare(args.data, work / "data", tokenizer="word")
    out = args.out or str(work / "run")
    cfg = TrainConfig(
        data=str(work / "data"),
        out=out,
        preset="seed",
        block_size=35,
        dropout=0.2,
        batch_size=20,
        batch_mode="sequential",
        optimizer="sgd",
        lr=5.0,
        momentum=0.0,
        weight_decay=0.0,
        schedule="plateau",
        warmup_iters=0,
        grad_clip=0.25,
        epochs=args.epochs,
        max_iters=args.max_iters,
        eval_interval=0,
        eval_mode="streams",
        eval_batch_size=10,
        log_interval=200,
        seed=1111,
        num_threads=args.threads,
        progress=False,
    )
    summary = train(cfg)
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    previous = 0.0
    for epoch, r in enumerate(evals, 1):
        print(
            f"| end of epoch {epoch:3d} | time: {r['elapsed_s'] - previous:7.1f}s | valid loss {r['val_loss']:5.2f} "
            f"| valid ppl {r['val_ppl']:8.2f}",
            flush=True,
        )
        previous = r["elapsed_s"]
    epochs_done = summary["iters"] / summary["iters_per_epoch"]
    print(
        json.dumps(
            {
                "val_ppl": round(math.exp(evals[-1]["val_loss"]), 2),
                "epochs": round(epochs_done, 3),
                "epoch_s": round(evals[-1]["elapsed_s"] / max(epochs_done, 1e-9), 1),
                "vocab_size": meta["vocab_size"],
                "iters": summary["iters"],
                "train_tokens_per_s": round(summary["train_tokens_per_s"]),
                "threads": torch.get_num_threads(),
                "run_dir": out,
            }
        )
    )


if __name__ == "__main__":
    main()
