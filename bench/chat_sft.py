"""Chat instruction tuning: held-out assistant-token loss of a real pretrained model before and after SFT.

Base: stories260K (llama2.c, trained on TinyStories only), imported by lmforge.loader. Data (/work/shared/data/chat,
see its SOURCE.md): Anthropic HH-RLHF helpful-base dialogues (`chosen` side, split into user/assistant turns) and
the 175 Self-Instruct seed tasks (instruction + input -> output). Each source is split with a fixed seed into
train / held-out test; a further 48 HH dialogues are the validation set that picks the best checkpoint. The 252
Self-Instruct user-oriented instructions are evaluation only, never trained on (their authors ask for that).

Every conversation is rendered with the model's chat template (the plain "User: ... / Assistant: ..." one for this
tokenizer) and only assistant tokens (plus the EOS that ends each reply) count, in training and in every loss
here (`lmforge.apps.sft.chat_example`). Full fine-tuning through `lmforge.apps.finetune.finetune`, bounded by
--minutes. Then a short conversation with the tuned model (sampled, temperature 0.7) is printed.

The last line is JSON: base_assistant_loss and sft_assistant_loss (held-out HH, nats per token), the same for every
eval set in `eval_sets`, and the sizes of the splits.

    python bench/chat_sft.py                # ~10 minutes on one thread
    python bench/chat_sft.py --smoke        # a few steps
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch

from lmforge.apps.finetune import FinetuneConfig, evaluate_examples, finetune, fit_context, load_base
from lmforge.apps.sft import chat_example
from lmforge.templates import PLAIN_TEMPLATE

SHARED = Path(__file__).resolve().parents[2] / "shared"
BASE = SHARED / "models" / "stories260K" / "stories260K.bin"
CHAT = SHARED / "data" / "chat"


def hh_dialogues(path: Path) -> list[list[dict]]:
    """HH-RLHF `chosen` dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...") as message lists ending with the
    assistant."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])[1:]
        messages = [
            {"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[::2], parts[1::2])
        ]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages and all(m["content"] for m in messages):
            out.append(messages)
    return out


def self_instruct(path: Path) -> list[list[dict]]:
    """One user turn (instruction, then the input when there is one) and the expected output per task instance."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            prompt = task["instruction"] + (f"\n\n{inst['input']}" if inst["input"].strip() else "")
            out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": inst["output"]}])
    return out


def split(items: list, n_test: int, seed: int) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items[n_test:], items[:n_test]


def transcript(model_dir: str, prompts: list[str], max_tokens: int) -> list[dict]:
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.loader import load

    loaded = load(model_dir, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    template = loaded.chat_template()
    turns = []
    for i, prompt in enumerate(prompts):
        ids = tok.encode(template.render([{"role": "user", "content": prompt}]))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i, stop=template.turn_stops)
        reply = generate(model, [ids], params, tokenizer=tok, eos_id=tok.eos_id)[0].text
        turns.append({"user": prompt, "assistant": reply.strip()})
    return turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget")
    ap.add_argument("--epochs", type=float, default=3.0, help="training budget in passes (whichever ends first)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hh-test", type=int, default=200, help="held-out HH dialogues")
    ap.add_argument("--seed-test", type=int, default=25, help="held-out Self-Instruct seed tasks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="30 steps on a 200-dialogue subset")
    args = ap.parse_args()
    for path in (BASE, CHAT):
        if not path.exists():
            raise SystemExit(f"needs {path} (the shared models/data folder)")
    torch.set_num_threads(args.threads)

    model, tok, template = load_base(str(BASE))
    hh_train, hh_test = split(hh_dialogues(CHAT / "hh_rlhf_helpful_base_test.jsonl"), args.hh_test, 0)
    hh_train, hh_val = hh_train[48:], hh_train[:48]
    seed_train, seed_test = split(self_instruct(CHAT / "self_instruct_seed_tasks.jsonl"), args.seed_test, 0)
    user_oriented = self_instruct(CHAT / "self_instruct_user_oriented_instructions.jsonl")  # evaluation only
    if args.smoke:
        hh_train, hh_test, user_oriented = hh_train[:200], hh_test[:40], user_oriented[:40]

    def examples(dialogues):
        return [chat_example(tok, template, d) for d in dialogues]

    train = examples(hh_train + seed_train)
    eval_sets = {
        "hh_rlhf_heldout": examples(hh_test),
        "self_instruct_seed_heldout": examples(seed_test),
        "self_instruct_user_oriented": examples(user_oriented),
    }
    eval_sets = {k: fit_context(v, model.config.block_size + 1)[0] for k, v in eval_sets.items()}
    sizes = {"train": len(train), "val": len(hh_val), **{k: len(v) for k, v in eval_sets.items()}}
    print(
        json.dumps({"template": "plain" if template == PLAIN_TEMPLATE else template[:60], "examples": sizes}),
        flush=True,
    )
    t0 = time.time()
    before = {k: evaluate_examples(model, v) for k, v in eval_sets.items()}
    print(
        json.dumps({"base_losses": {k: round(v, 4) for k, v in before.items()}, "seconds": round(time.time() - t0, 1)}),
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        config = FinetuneConfig(
            base=str(BASE),
            out=f"{tmp}/sft",
            method="full",
            lr=args.lr,
            epochs=None if args.smoke else args.epochs,
            max_iters=30 if args.smoke else None,
            max_minutes=args.minutes,
            batch_size=args.batch_size,
            eval_interval=10 if args.smoke else 100,
            warmup_iters=20,
            seed=0,
        )
        summary = finetune(
            config,
            train,
            examples(hh_val),
            on_eval=lambda it, v: print(json.dumps({"iter": it, "val_loss": round(v, 4)}), flush=True),
        )
        print(
            json.dumps({k: summary[k] for k in ("iters", "epochs", "base_val_loss", "best_val_loss", "seconds")}),
            flush=True,
        )
        tuned, _, _ = load_base(summary["model_dir"])
        after = {k: evaluate_examples(tuned, v) for k, v in eval_sets.items()}
        prompts = [
            "Can you tell me a story about a cat?",
            "What should I cook for dinner tonight?",
            user_oriented[3][0]["content"],
        ]
        for turn in transcript(summary["model_dir"], prompts, max_tokens=60):
            print(json.dumps(turn), flush=True)
    print(
        json.dumps(
            {
                "base_assistant_loss": round(before["hh_rlhf_heldout"], 4),
                "sft_assistant_loss": round(after["hh_rlhf_heldout"], 4),
                "eval_sets": {
                    k: {"base": round(before[k], 4), "sft": round(after[k], 4), "examples": sizes[k]} for k in eval_sets
                },
                "train_examples": sizes["train"],
                "iters": summary["iters"],
                "epochs": summary["epochs"],
            }
        )
    )


if __name__ == "__main__":
    main()
