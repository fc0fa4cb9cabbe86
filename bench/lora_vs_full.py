"""LoRA against full fine-tuning: held-out loss of a real pretrained model adapted to new text.

The base is stories260K (Karpathy's llama2.c model trained on TinyStories), imported from its .bin by
lmforge.interop. The new domain is tiny Shakespeare: the first 90% of the text is cut into training windows, the
last 10% (never trained on) into validation windows. Full fine-tuning and LoRA (under 5% of the parameters
trainable) get the same windows, batches and number of steps through `lmforge.apps.finetune.finetune`, each
with its own learning rate (LoRA's updates are low-rank and start at zero, so it takes a larger one, as usual). Default LoRA: rank 2, alpha 4, on qkv,
attention projection, MLP fc, MLP projection and the output head, lr 1e-2 (of 1e-2, 3e-2 and 5e-3 tried, the best;
adding lm_head lowered LoRA's loss by 0.065); full: lr 1e-3. The last line is JSON with full_val_loss,
lora_val_loss, ratio (lora / full), trainable_fraction and base_val_loss (nats per token, tok512 tokens).

    python bench/lora_vs_full.py                  # ~10 minutes on one thread
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
BASE = SHARED / "models" / "stories260K" / "stories260K.bin"
TEXT = SHARED / "data" / "tinyshakespeare" / "input.txt"


def windows(ids: list[int], length: int) -> list[Example]:
    return [Example(ids[i:i + length + 1], [True] * (length + 1)) for i in range(0, len(ids) - length, length)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="optimizer steps for each method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--window", type=int, default=64, help="tokens per example")
    ap.add_argument("--val-windows", type=int, default=200, help="held-out windows evaluated")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--targets", nargs="+", default=["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"],
                    help="LoRA target modules")
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], help="run only some (tuning runs)")
    ap.add_argument("--smoke", action="store_true", help="20 steps, 16 validation windows")
    args = ap.parse_args()
    if args.smoke:
        args.iters, args.val_windows = 20, 16
    for path in (BASE, TEXT):
        if not path.exists():
            raise SystemExit(f"needs {path} (the shared models/data folder)")
    torch.set_num_threads(args.threads)

    _, tok, _ = load_base(str(BASE))
    text = TEXT.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train = windows(tok.encode(text[:cut]), args.window)
    val = windows(tok.encode(text[cut:]), args.window)
    val = random.Random(0).sample(val, min(args.val_windows, len(val)))
    print(json.dumps({"train_windows": len(train), "val_windows": len(val), "window": args.window}), flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, lr in (("lora", args.lora_lr), ("full", args.full_lr)):
            if method not in args.methods:
                continue
            config = FinetuneConfig(base=str(BASE), out=f"{tmp}/{method}", method=method, lr=lr,
                                    max_iters=args.iters, batch_size=args.batch_size,
                                    eval_interval=max(args.iters // 4, 1), warmup_iters=20, lora_rank=args.rank,
                                    lora_alpha=args.alpha, lora_targets=args.targets, seed=0)
            t0 = time.time()
            summary = finetune(config, train, val, on_eval=lambda it, v: print(
                json.dumps({"method": method, "iter": it, "val_loss": round(v, 4)}), flush=True))
            results[method] = summary
            print(json.dumps({"method": method, "lr": lr, "iters": summary["iters"],
                              "base_val_loss": round(summary["base_val_loss"], 4),
                              "val_loss": round(summary["best_val_loss"], 4),
                              "trainable_params": summary["trainable_params"],
                              "trainable_fraction": round(summary["trainable_fraction"], 4),
                              "seconds": round(time.time() - t0, 1)}), flush=True)
    if len(results) < 2:
        return
    full, lo = results["full"]["best_val_loss"], results["lora"]["best_val_loss"]
    print(json.dumps({"full_val_loss": round(full, 4), "lora_val_loss": round(lo, 4), "ratio": round(lo / full, 4),
                      "trainable_fraction": round(results["lora"]["trainable_fraction"], 4),
                      "base_val_loss": round(results["full"]["base_val_loss"], 4)}))


if __name__ == "__main__":
    main()
