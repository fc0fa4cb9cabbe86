"""English -> Chinese translation trained from scratch in a fixed CPU budget, scored with BLEU and chrF.

Data: the Tatoeba pairs in shared/data/translation/cmn.txt (CC BY 2.0 FR; read from there, nothing copied), split by
lmforge.apps.translate.split_pairs: 1,000 held-out test pairs, 500 validation pairs, the rest (27,655) train.
Recipe: a 4096-token byte-level BPE trained on the training pairs; a gpt-nano model (4 layers x 4 heads x 128 dims,
context 128, 1.3M parameters) trained from random weights on "{src}\\n" + target + <|endoftext|> with the loss on
the target tokens only (lmforge.apps.finetune, full), AdamW, cosine decay fitted to the time budget, the weights
with the best validation loss kept. Then the 1,000 test sources are translated greedily and with beam search and
scored with sacrebleu (BLEU with tokenize="zh", chrF). The last line is JSON: bleu_greedy, bleu_beam, chrf_greedy,
chrf_beam, train_minutes, beam width, model size, train pairs and decode seconds.

    .venv/bin/python bench/translate.py                      # the full run: 30 minutes of training
    .venv/bin/python bench/translate.py --minutes 3 --limit 50   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.apps.translate import (
    PromptFormat,
    load_translator,
    read_pairs,
    score,
    split_pairs,
    train_translator,
    translate,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "translation" / "cmn.txt"
RECIPE = dict(
    template="{src}\n",
    tokenizer="bpe",
    vocab_size=4096,
    preset="gpt-nano",
    model_overrides=dict(block_size=128),
    lr=3e-3,
    batch_size=32,
    warmup_iters=100,
    weight_decay=0.0,
    eval_interval=200,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="tab-separated English/Chinese/attribution pairs")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget in wall-clock minutes")
    parser.add_argument("--beam", type=int, default=4, help="beam width for the beam-search decode")
    parser.add_argument("--limit", type=int, default=None, help="decode only the first N test pairs (smoke runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--n-layer", type=int, default=None, help="override the recipe's layers")
    parser.add_argument("--n-embd", type=int, default=None, help="override the recipe's width")
    parser.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.data).is_file():
        raise SystemExit(f"translation pairs not found at {args.data}; pass --data")

    split = split_pairs(read_pairs(args.data))
    test = split.test[: args.limit]
    print(
        json.dumps({"train_pairs": len(split.train), "val_pairs": len(split.val), "test_pairs": len(test)}), flush=True
    )
    out = args.out or str(Path(tempfile.mkdtemp(prefix="lmforge-translate-")) / "run")
    recipe = dict(RECIPE, model_overrides=dict(RECIPE["model_overrides"]))
    for key in ("n_layer", "n_embd"):
        if getattr(args, key) is not None:
            recipe["model_overrides"][key] = getattr(args, key)
    for key in ("lr", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    fmt = PromptFormat(template=recipe.pop("template"))

    def progress(it: int, val: float) -> None:
        print(json.dumps({"iter": it, "val_loss": round(val, 4)}), flush=True)

    print(json.dumps({"recipe": {**recipe, "template": fmt.template}, "threads": args.threads}), flush=True)
    summary = train_translator(split.train, split.val, out, fmt, max_minutes=args.minutes, on_eval=progress, **recipe)
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "iters",
                    "epochs",
                    "best_val_loss",
                    "final_train_loss",
                    "params",
                    "vocab_size",
                    "tokens_per_pair",
                    "train_minutes",
                    "model_dir",
                )
            }
        ),
        flush=True,
    )

    model, tok, fmt = load_translator(out)
    sources, refs = [p.src for p in test], [p.tgt for p in test]
    t = time.perf_counter()
    greedy = translate(model, tok, fmt, sources)
    greedy_s = time.perf_counter() - t
    g = score(greedy, refs)
    print(
        json.dumps(
            {
                "decode": "greedy",
                "bleu": round(g["bleu"], 2),
                "chrf": round(g["chrf"], 2),
                "seconds": round(greedy_s, 1),
            }
        ),
        flush=True,
    )
    t = time.perf_counter()
    beam = translate(model, tok, fmt, sources, beam=args.beam)
    beam_s = time.perf_counter() - t
    b = score(beam, refs)
    print(
        json.dumps(
            {
                "decode": f"beam{args.beam}",
                "bleu": round(b["bleu"], 2),
                "chrf": round(b["chrf"], 2),
                "seconds": round(beam_s, 1),
            }
        ),
        flush=True,
    )
    for p, gh, bh in list(zip(test, greedy, beam))[:10]:
        print(json.dumps({"src": p.src, "ref": p.tgt, "greedy": gh, "beam": bh}, ensure_ascii=False), flush=True)
    print(
        json.dumps(
            {
                "bleu_greedy": round(g["bleu"], 2),
                "bleu_beam": round(b["bleu"], 2),
                "chrf_greedy": round(g["chrf"], 2),
                "chrf_beam": round(b["chrf"], 2),
                "train_minutes": round(summary["train_minutes"], 2),
                "beam": args.beam,
                "params": summary["params"],
                "train_pairs": len(split.train),
                "test_pairs": len(test),
                "iters": summary["iters"],
                "epochs": summary["epochs"],
                "decode_seconds_greedy": round(greedy_s, 1),
                "decode_seconds_beam": round(beam_s, 1),
                "threads": torch.get_num_threads(),
                "recipe": {**recipe, "template": fmt.template},
                "run_dir": out,
            }
        )
    )


if __name__ == "__main__":
    main()
