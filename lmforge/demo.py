"""`lmforge demo`: raw text to a trained, evaluated model that writes text, in a few minutes on a laptop CPU.

It uses the one corpus every machine has, the Python standard library's own source, so it needs no download:
prepare (byte-level BPE) -> train (a small GPT under a wall-clock budget) -> evaluate -> sample.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path


def demo(
    out: str = "runs/demo",
    iters: int = 400,
    minutes: float = 5.0,
    preset: str = "gpt-mini",
    max_chars: int = 8_000_000,
    vocab_size: int = 4096,
    prompt: str = "def ",
    seed: int = 1337,
) -> int:
    """Prepare the python-stdlib corpus, train a small GPT for a few minutes, evaluate it and print a sample.

    Args:
        out: folder for the data and the run (data in OUT/data, the run in OUT/run).
        iters: optimizer steps; the learning rate decays (cosine) over them.
        minutes: wall-clock cap on training, for slow or busy machines.
        preset: model preset to train.
        max_chars: characters of the standard library to read.
        vocab_size: size of the byte-level BPE vocabulary trained on the corpus.
        prompt: text the sample continues.
        seed: random seed for training and sampling.
    """
    from lmforge.checkpoint import load_model
    from lmforge.data import load_split, prepare
    from lmforge.evaluate import evaluate
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.train.trainer import TrainConfig, train

    out_dir = Path(out)
    data_dir, run_dir = out_dir / "data", out_dir / "run"
    t0 = time.perf_counter()
    print(f"[1/4] preparing the python-stdlib corpus ({max_chars:,} characters) with a {vocab_size}-token BPE ...")
    meta = prepare("python-stdlib", data_dir, tokenizer="bpe", vocab_size=vocab_size, max_chars=max_chars)
    print(
        f"      train {meta['splits']['train']:,} tokens, validation {meta['splits']['val']:,} tokens "
        f"({time.perf_counter() - t0:.0f} s)"
    )

    print(f"[2/4] training {preset} for {iters} steps (at most {minutes:g} minutes) ...")
    summary = train(
        TrainConfig(
            data=str(data_dir),
            out=str(run_dir),
            preset=preset,
            max_iters=iters,
            lr_decay_iters=iters,
            max_minutes=minutes,
            seed=seed,
            overwrite=True,
            **DEMO_RECIPE,
        )
    )
    if summary["stop_reason"] == "minutes":
        print(
            f"      stopped at the {minutes:g}-minute cap after {summary['iters']} of {iters} steps (a slow or busy "
            f"machine; `lmforge demo --minutes M` allows more)"
        )
    print(f"      loss curve: {run_dir / 'loss.png'}")

    print("[3/4] evaluating the best checkpoint on the held-out files ...")
    model, tokenizer = load_model(run_dir)
    result = evaluate(model, load_split(data_dir, "val"), max_windows=400)
    print(
        f"      validation loss {result['loss']:.3f}, perplexity {result['ppl']:.1f} over {result['tokens']:,} tokens"
    )

    print(f"[4/4] sampling from the prompt {prompt!r}:\n")
    prompt_ids = tokenizer.encode(prompt)
    max_tokens = min(160, model.config.block_size - len(prompt_ids))  # the model sees at most its context
    [completion] = generate(
        model,
        [prompt_ids],
        SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed),
        tokenizer=tokenizer,
    )
    print(prompt + completion.text)
    print(
        "\n"
        + json.dumps(
            {
                "val_loss": round(result["loss"], 4),
                "val_ppl": round(result["ppl"], 2),
                "train_iters": summary.get("iters"),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    commands = next_commands(run_dir, data_dir, out_dir, model.config.block_size, minutes)
    print("\nnext, try:\n" + "\n".join(f"  {command}" for command in commands))
    return 0


def next_commands(run_dir: Path, data_dir: Path, out_dir: Path, block_size: int, minutes: float) -> list[str]:
    """What to run on the demo's model next; each works as printed, offline (tests/test_demo.py runs them all).
    The sample leaves a quarter of the model's context (`block_size` tokens) to the prompt."""
    run, data, llama = (shlex.quote(str(p)) for p in (run_dir, data_dir, out_dir / "llama"))
    return [
        f"lmforge generate {run} --prompt 'class ' --max-new-tokens {block_size * 3 // 4}",
        f"lmforge eval {run} {data}",
        f"lmforge bench {run}",
        # a Llama-style model of the demo's size on the same data and time: compare the validation losses
        f"lmforge train {data} {llama} --preset llama-nano --n-embd 256 --block-size {DEMO_RECIPE['block_size']} "
        f"--max-minutes {minutes:g}",
    ]


# A recipe that learns fast in few steps on two CPU cores: a high learning rate, a short warmup, cosine decay.
DEMO_RECIPE = dict(
    batch_size=12,
    block_size=128,
    lr=2e-3,
    min_lr=2e-4,
    warmup_iters=40,
    weight_decay=0.1,
    eval_interval=100,
    eval_iters=20,
)
