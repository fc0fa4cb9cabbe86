"""Speculative decoding vs plain decoding on a target/draft pair trained by lmforge, side by side.

By default both models are trained here with lmforge's trainer on char-level tiny Shakespeare (one tokenizer,
one data folder): the target a gpt-micro (6 layers x 384 dims), the draft a 1-layer x 128-dim gpt-nano, a few
minutes each; the runs are kept under --cache so reruns only measure. Or pass --target RUN --draft RUN (two
runs sharing a tokenizer).

For each k, plain greedy decoding (`lmforge.infer.generate.generate`) and `speculative_generate` continue the
same prompt by --new-tokens tokens, interleaved, --repeats times; tok/s = new tokens / wall time (prefill
included), medians. `identical` says whether the speculative greedy tokens equal the plain greedy ones. A
sampled run (temperature 0.8) reports its acceptance rate too. The last line is JSON with speedup, identical,
acceptance_rate (greedy, at the best k) and the tok/s figures.

    python bench/speculative.py --threads 1
    python bench/speculative.py --target runs/big --draft runs/small --prompt "def main("
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import speculative_generate

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def train_pair(cache: Path, target_minutes: float, draft_minutes: float) -> tuple[Path, Path]:
    """Target and draft runs trained by lmforge on the same char-level data, reused from `cache` if there."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    data = cache / "data"
    if not (data / "meta.json").exists():
        prepare(SHAKESPEARE, data, tokenizer="char", val_fraction=0.1)
    runs = {
        "target": dict(preset="gpt-micro", dropout=0.0, block_size=128, batch_size=16, lr=1e-3,
                       max_minutes=target_minutes),
        "draft": dict(preset="gpt-nano", n_layer=1, n_head=4, n_embd=128, block_size=128, batch_size=16, lr=2e-3,
                      max_minutes=draft_minutes),
    }
    for name, settings in runs.items():
        if not (cache / name / "best" / "config.json").exists():
            train(TrainConfig(data=str(data), out=str(cache / name), max_iters=5000, lr_decay_iters=5000,
                              warmup_iters=50, eval_interval=100, eval_iters=10, progress=False,
                              log_interval=100, **settings))
    return cache / "target", cache / "draft"


def trained_iters(run: Path) -> int | None:
    """Optimizer steps a run was trained for (None for a plain model folder)."""
    from lmforge.checkpoint import CheckpointError, load_train_state

    try:
        return int(load_train_state(run / "last")["iter"])
    except (CheckpointError, FileNotFoundError, KeyError):
        return None


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=None, help="target run or model folder (default: train one)")
    parser.add_argument("--draft", default=None, help="draft run or model folder sharing the target's tokenizer")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "bench-speculative"),
                        help="where the trained pair and its data are kept between runs")
    parser.add_argument("--target-minutes", type=float, default=4.0, help="target training budget (minutes)")
    parser.add_argument("--draft-minutes", type=float, default=1.5, help="draft training budget (minutes)")
    parser.add_argument("--prompt", default="ROMEO:\n", help="prompt text")
    parser.add_argument("--new-tokens", type=int, default=120,
                        help="tokens generated per run (the prompt and these must fit the context)")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 4, 6], help="draft tokens per round to try")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together")
    target_dir, draft_dir = ((Path(args.target), Path(args.draft)) if args.target
                             else train_pair(Path(args.cache), args.target_minutes, args.draft_minutes))

    target, tokenizer = load_model(target_dir)
    draft, _ = load_model(draft_dir, with_tokenizer=False)
    prompt = tokenizer.encode(args.prompt)
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=args.new_tokens, ignore_eos=True, seed=0)
    print(json.dumps({"target": str(target_dir), "draft": str(draft_dir),
                      "target_params": target.num_params(), "draft_params": draft.num_params(),
                      "target_iters": trained_iters(target_dir), "draft_iters": trained_iters(draft_dir),
                      "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                      "threads": torch.get_num_threads()}), flush=True)

    results = []
    for k in args.k:
        plain_t, spec_t, stats = [], [], None
        for _ in range(args.repeats):  # interleaved: machine load drifts alike for both
            t, plain = timed(lambda: generate(target, [prompt], greedy)[0].tokens)
            plain_t.append(t)
            t, (spec, stats) = timed(lambda: speculative_generate(target, draft, prompt, greedy, k=k))
            spec_t.append(t)
        _, (_, sampled_stats) = timed(lambda: speculative_generate(target, draft, prompt, sampled, k=k))
        row = {"k": k, "plain_tok_s": round(args.new_tokens / statistics.median(plain_t), 2),
               "speculative_tok_s": round(args.new_tokens / statistics.median(spec_t), 2),
               "identical": spec == plain, "acceptance_rate": round(stats["acceptance_rate"], 3),
               "tokens_per_round": round(stats["tokens_per_round"], 2),
               "sampled_acceptance_rate": round(sampled_stats["acceptance_rate"], 3)}
        row["speedup"] = round(row["speculative_tok_s"] / row["plain_tok_s"], 3)
        print(json.dumps(row), flush=True)
        results.append(row)

    best = max(results, key=lambda r: r["speedup"])
    print("sample:", json.dumps(tokenizer.decode(prompt + spec)[:300]), flush=True)
    print(json.dumps({"speedup": best["speedup"], "identical": all(r["identical"] for r in results),
                      "acceptance_rate": best["acceptance_rate"], "k": best["k"],
                      "plain_tok_s": best["plain_tok_s"], "speculative_tok_s": best["speculative_tok_s"],
                      "sampled_acceptance_rate": best["sampled_acceptance_rate"],
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
