"""LoRA against full fine-tuning: held-out loss of a pretrained model adapted to new text.

The base (default): a GPT-style model, 4 layers x 256 dims with a byte-level BPE vocabulary of 4,096, pretrained by
lmforge on WikiText-2's training text for 15 minutes (one thread; cached under --cache, so reruns only fine-tune).
The new domain (default): short product, movie and restaurant reviews, the sentences of the UCI "Sentiment
Labelled Sentences" (labels dropped), shuffled with a fixed seed, 80% cut into training windows and 20% (never
trained on) into validation windows: about 53k training tokens, the small-data setting LoRA is for. Full
fine-tuning and LoRA get the same windows, batches and number of steps through `lmforge.apps.finetune.finetune`,
each keeping its best validation loss (evaluated every iters/12 steps), each with its own learning rate (LoRA's
updates are low-rank and start at zero, so it takes a larger one, as usual).

Default LoRA: rank 10, alpha 20 on qkv, attention projection, MLP fc, MLP projection and the output head (4.7% of
the parameters trainable), lr 3e-3 (5e-3 with rank 8 overfit sooner and stopped at 4.559); full: lr 3e-4.
`--base stories260K` (Karpathy's 64-wide llama2.c model) and `--corpus shakespeare` give the earlier setting, where
a rank-2 adapter (the most under 5% of a 64-wide model) stays 8-15% behind full fine-tuning. The last line is JSON
with full_val_loss, lora_val_loss, ratio (lora / full), trainable_fraction and base_val_loss (nats per token).

    python bench/lora_vs_full.py                  # ~15 minutes pretraining (once), then ~10 minutes, one thread
    python bench/lora_vs_full.py --smoke          # a few steps, to check it runs
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from lmforge.apps.finetune import FinetuneConfig, finetune, load_base
from lmforge.apps.sft import Example

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
WIKITEXT = SHARED / "data" / "wikitext-2"


def pretrained_base(cache: Path, minutes: float, threads: int) -> Path:
    """A GPT-style base (4 layers x 256 dims, byte-level BPE 4096) pretrained by lmforge on WikiText-2's training
    text for `minutes`, cached under `cache` (keyed by the minutes) so reruns only fine-tune."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    root = cache / f"wikitext-4x256-{minutes:g}min"
    if not (root / "run" / "best" / "config.json").is_file():
        prepare(WIKITEXT, root / "data", tokenizer="bpe", vocab_size=4096)  # its given splits; BPE on train
        train(
            TrainConfig(
                data=str(root / "data"),
                out=str(root / "run"),
                preset="gpt-mini",
                block_size=128,
                dropout=0.0,
                batch_size=16,
                lr=1e-3,
                warmup_iters=100,
                max_minutes=minutes,
                eval_interval=250,
                eval_iters=10,
                num_threads=threads,
                seed=0,
                progress=False,
            )
        )
    return root / "run" / "best"


CORPORA = {
    "shakespeare": [SHARED / "data" / "tinyshakespeare" / "input.txt"],
    "reviews": [SHARED / "data" / "sentiment" / f"{name}_labelled.txt" for name in ("amazon_cells", "imdb", "yelp")],
}


def corpus_text(name: str) -> tuple[str, str]:
    """(training text, held-out text): Shakespeare's first 90% / last 10%; the reviews' sentences (labels dropped)
    shuffled with a fixed seed, 80% / 20%."""
    if name == "shakespeare":
        text = CORPORA[name][0].read_text(encoding="utf-8")
        cut = int(0.9 * len(text))
        return text[:cut], text[cut:]
    lines = [
        line.split("\t")[0].strip()
        for path in CORPORA[name]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    random.Random(0).shuffle(lines)
    cut = int(0.8 * len(lines))
    return "\n".join(lines[:cut]) + "\n", "\n".join(lines[cut:]) + "\n"


def windows(ids: list[int], length: int) -> list[Example]:
    return [Example(ids[i : i + length + 1], [True] * (length + 1)) for i in range(0, len(ids) - length, length)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--base",
        default="wikitext",
        help="wikitext: a 4x256 GPT pretrained here on WikiText-2 (cached); stories260K: Karpathy's "
        "llama2.c model; or a path to any base lmforge can load",
    )
    ap.add_argument("--base-minutes", type=float, default=15.0, help="pretraining budget of the wikitext base")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "bench-lora"))
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="reviews", help="the new domain")
    ap.add_argument("--iters", type=int, default=600, help="optimizer steps for each method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=64, help="tokens per example")
    ap.add_argument("--val-windows", type=int, default=200, help="held-out windows evaluated")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=20.0)
    ap.add_argument(
        "--targets",
        nargs="+",
        default=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"],
        help="LoRA target modules",
    )
    ap.add_argument("--full-lr", type=float, default=3e-4)
    ap.add_argument("--lora-lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], help="run only some (tuning runs)")
    ap.add_argument("--smoke", action="store_true", help="20 steps, 16 validation windows, a 12-second base")
    args = ap.parse_args()
    if args.smoke:
        args.iters, args.val_windows, args.base_minutes = 20, 16, 0.2
    needs = {"wikitext": [WIKITEXT], "stories260K": [STORIES]}.get(args.base, [Path(args.base)])
    for path in (*needs, *CORPORA[args.corpus]):
        if not path.exists():
            raise SystemExit(f"needs {path} (the shared models/data folder)")
    torch.set_num_threads(args.threads)
    base = {
        "wikitext": lambda: pretrained_base(Path(args.cache), args.base_minutes, args.threads),
        "stories260K": lambda: STORIES,
    }.get(args.base, lambda: Path(args.base))()

    _, tok, _ = load_base(str(base))
    train_text, val_text = corpus_text(args.corpus)
    train = windows(tok.encode(train_text), args.window)
    val = windows(tok.encode(val_text), args.window)
    val = random.Random(0).sample(val, min(args.val_windows, len(val)))
    print(json.dumps({"train_windows": len(train), "val_windows": len(val), "window": args.window}), flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, lr in (("lora", args.lora_lr), ("full", args.full_lr)):
            if method not in args.methods:
                continue
            config = FinetuneConfig(
                base=str(base),
                out=f"{tmp}/{method}",
                method=method,
                lr=lr,
                max_iters=args.iters,
                batch_size=args.batch_size,
                eval_interval=max(args.iters // 12, 1),
                warmup_iters=20,
                lora_rank=args.rank,
                lora_alpha=args.alpha,
                lora_targets=args.targets,
                seed=0,
            )
            t0 = time.time()
            summary = finetune(
                config,
                train,
                val,
                on_eval=lambda it, v: print(
                    json.dumps({"method": method, "iter": it, "val_loss": round(v, 4)}), flush=True
                ),
            )
            results[method] = summary
            print(
                json.dumps(
                    {
                        "method": method,
                        "lr": lr,
                        "iters": summary["iters"],
                        "base_val_loss": round(summary["base_val_loss"], 4),
                        "val_loss": round(summary["best_val_loss"], 4),
                        "trainable_params": summary["trainable_params"],
                        "trainable_fraction": round(summary["trainable_fraction"], 4),
                        "seconds": round(time.time() - t0, 1),
                    }
                ),
                flush=True,
            )
    if len(results) < 2:
        return
    full, lo = results["full"]["best_val_loss"], results["lora"]["best_val_loss"]
    print(
        json.dumps(
            {
                "full_val_loss": round(full, 4),
                "lora_val_loss": round(lo, 4),
                "ratio": round(lo / full, 4),
                "trainable_fraction": round(results["lora"]["trainable_fraction"], 4),
                "base_val_loss": round(results["full"]["base_val_loss"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
