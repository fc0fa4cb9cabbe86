"""Speculative decoding vs plain decoding on a target/draft pair trained by lmforge, side by side.

By default both models are trained here with lmforge's trainer on char-level tiny Shakespeare (one tokenizer, one
data folder), their minutes the budget so each ends with its cosine annealed: the target 8 layers x 512 dims (25M
parameters, --target-minutes), the draft 1 layer x 128 dims (--draft-minutes), then the draft is distilled towards
the target for --distill-minutes (KL to the target's next-token distributions: a draft that predicts what the
target will say, not what the text says, gets more of its proposals accepted); the runs are kept under --cache,
named by shape and minutes, so reruns only measure. Or pass --target RUN --draft RUN (two runs sharing a
tokenizer).

Why this shape: lmforge decodes through its fused step (lmforge.infer.fused), which costs what streaming the
weights costs plus a few tens of microseconds per layer. A draft saves time only where the target's step is long
against the draft's and checking k + 1 tokens costs little more than one: at batch 1, 2 threads, the 8x512
target's step takes 3.6 ms (100 MB of float32 weights) and checking 5 tokens 4.9 ms, the 1x128 draft's step 0.08
ms. A deep, narrow target (12 x 128, which an earlier version of this bench trained) decodes at 0.4 ms per token
through the fused step, too little for any draft to save (0.94x), though 2.1x on the models' own forward.

Two paths (--paths): "fused", both models as `lmforge generate [--draft]` runs them (the fused decode step for
plain decoding, the draft's steps and the target's verification: the headline), and "eager", the models' own
forward passes (the algorithm against plain decoding on equal terms, per-operation overhead included). For each
path and k, plain greedy decoding (`lmforge.infer.generate.generate`) and `speculative_generate` continue each of
six speaker prompts ("ROMEO:\\n", ...) by --new-tokens tokens, one after the other, interleaved, --repeats times;
tok/s = new tokens / wall time (prefill included), medians (a run of all six lasts seconds, not the fraction of one
that a single prompt takes, which the machine's noise swamps). `identical` says whether the speculative greedy
tokens equal the plain greedy ones. Sampled runs (temperature 0.8, seed 0), timed the same way, give
sampled_speedup and their acceptance rate (a greedy char-level model falls into loops that a draft finds easy to
guess; sampled text does not). Then the
serving engine (lmforge.engine) with and without the draft at the best k, for 1 and 8 concurrent requests
(--engine-batch), the models prepared as `lmforge serve` prepares them (fused step).
The last line is JSON with speedup, identical, acceptance_rate (greedy, at the best k), the tok/s figures and
engine_speedup.

    python bench/speculative.py --threads 2       # ~75 minutes of training once (cached), then ~5 of measuring
    python bench/speculative.py --target runs/big --draft runs/small --prompt "def main(" "class Foo:\\n"
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import speculative_generate

SPEAKERS = [
    "ROMEO:\\n",
    "JULIET:\\n",
    "KING RICHARD III:\\n",
    "First Citizen:\\n",
    "MENENIUS:\\n",
    "DUKE VINCENTIO:\\n",
]
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def train_pair(cache: Path, target_minutes: float, draft_minutes: float, distill_minutes: float) -> tuple[Path, Path]:
    """Target and draft runs trained by lmforge on the same char-level data, reused from `cache` if there."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    data = cache / "data"
    if not (data / "meta.json").exists():
        prepare(SHAKESPEARE, data, tokenizer="char", val_fraction=0.1)
    runs = {  # the minutes are the budget, so the cosine decays over them and each model ends annealed
        f"target-8x512-{target_minutes:g}min": dict(
            n_layer=8, n_head=8, n_embd=512, lr=1e-3, max_minutes=target_minutes
        ),
        f"draft-1x128-{draft_minutes:g}min": dict(n_layer=1, n_head=4, n_embd=128, lr=3e-3, max_minutes=draft_minutes),
    }
    for name, settings in runs.items():
        if not (cache / name / "best" / "config.json").exists():
            train(
                TrainConfig(
                    data=str(data),
                    out=str(cache / name),
                    preset="gpt-nano",
                    block_size=128,
                    batch_size=16,
                    dropout=0.0,
                    warmup_iters=50,
                    eval_interval=250,
                    eval_iters=10,
                    progress=False,
                    log_interval=100,
                    **settings,
                )
            )
    target, draft = (cache / name for name in runs)
    if distill_minutes <= 0:
        return target, draft
    distilled = cache / f"{draft.name}-distilled-{distill_minutes:g}min"
    if not (distilled / "config.json").exists():
        distill(target, draft, data, distilled, distill_minutes)
    return target, distilled


def distill(target_dir: Path, draft_dir: Path, data: Path, out: Path, minutes: float, lr: float = 1e-3) -> None:
    """Go on training the draft towards the target's next-token distributions (KL(target || draft) on training
    windows, AdamW, cosine over the minutes): a draft that predicts what the target will say, not what the text
    says, gets more of its proposals accepted (sequence-level knowledge distillation for speculative decoding)."""
    import torch.nn.functional as F

    from lmforge.checkpoint import save_model
    from lmforge.data import load_split, random_batch
    from lmforge.train.optim import Schedule, make_optimizer, set_lr

    target, _ = load_model(target_dir, with_tokenizer=False)
    draft, tokenizer = load_model(draft_dir)
    target.eval()
    draft.train()
    train_ids = load_split(str(data), "train")
    gen = torch.Generator().manual_seed(0)
    optimizer = make_optimizer(draft, "adamw", lr, 0.1, (0.9, 0.99))
    schedule = Schedule("cosine", lr, 20, 0, lr / 10)
    t0, it = time.perf_counter(), 0
    while (spent := (time.perf_counter() - t0) / (60 * minutes)) < 1:
        set_lr(optimizer, schedule.lr_at(it, spent))
        x, _ = random_batch(train_ids, 16, draft.config.block_size, gen)
        with torch.no_grad():
            teacher = F.log_softmax(target(x).float(), dim=-1)
        student = F.log_softmax(draft(x).float(), dim=-1)
        loss = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
    draft.eval()
    save_model(out, draft, tokenizer)
    print(json.dumps({"distilled_steps": it, "minutes": minutes, "final_kl": round(loss.item(), 4)}), flush=True)


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


def engine_row(target, draft, prompts, params, k: int, requests: int, repeats: int) -> dict:
    """The serving engine with and without the draft: every prompt in turn, `requests` at a time (each prompt
    repeated that many times); aggregate tok/s, medians."""
    from lmforge.engine.engine import Engine

    times, outs = {"plain": [], "speculative": []}, {}
    for _ in range(repeats):
        for name, kw in (("plain", {}), ("speculative", {"draft": draft, "num_speculative_tokens": k})):
            engine = Engine(target, max_num_seqs=requests, **kw)
            t, done = timed(lambda: [engine.generate([p] * requests, params) for p in prompts])
            times[name].append(t)
            outs[name] = [[c.tokens for c in batch] for batch in done]
    tokens = len(prompts) * requests * params.max_tokens
    plain, spec = (tokens / statistics.median(times[n]) for n in ("plain", "speculative"))
    return {
        "engine_requests": requests,
        "k": k,
        "plain_tok_s": round(plain, 2),
        "speculative_tok_s": round(spec, 2),
        "speedup": round(spec / plain, 3),
        "identical": outs["plain"] == outs["speculative"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default=None, help="target run or model folder (default: train one)")
    parser.add_argument("--draft", default=None, help="draft run or model folder sharing the target's tokenizer")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "lmforge" / "bench-speculative"),
        help="where the trained pair and its data are kept between runs",
    )
    parser.add_argument("--target-minutes", type=float, default=60.0, help="target training budget (minutes)")
    parser.add_argument("--draft-minutes", type=float, default=4.0, help="draft training budget (minutes)")
    parser.add_argument(
        "--distill-minutes",
        type=float,
        default=4.0,
        help="then distil the draft towards the target for this long (0: use the draft as trained)",
    )
    parser.add_argument(
        "--prompt",
        nargs="+",
        default=SPEAKERS,
        help="prompt texts (\\n for a newline); each run decodes all of them in turn",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=100,
        help="tokens generated per run (the prompt and these must fit the context)",
    )
    parser.add_argument("--k", type=int, nargs="+", default=[3, 4, 6], help="draft tokens per round to try")
    parser.add_argument(
        "--engine-batch",
        type=int,
        nargs="*",
        default=[1, 8],
        help="concurrent requests for the engine rows (none: skip the engine)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["fused", "eager"],
        default=["fused", "eager"],
        help="fused: both models as `lmforge generate --draft` runs them (lmforge.infer.fused); "
        "eager: the models' own forward; the first one gives the headline",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.target is None) != (args.draft is None):
        parser.error("--target and --draft go together")
    target_dir, draft_dir = (
        (Path(args.target), Path(args.draft))
        if args.target
        else train_pair(Path(args.cache), args.target_minutes, args.draft_minutes, args.distill_minutes)
    )

    target, tokenizer = load_model(target_dir)
    draft, _ = load_model(draft_dir, with_tokenizer=False)
    prompts = [tokenizer.encode(text.replace("\\n", "\n")) for text in args.prompt]
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=args.new_tokens, ignore_eos=True, seed=0)
    print(
        json.dumps(
            {
                "target": str(target_dir),
                "draft": str(draft_dir),
                "target_params": target.num_params(),
                "draft_params": draft.num_params(),
                "target_iters": trained_iters(target_dir),
                "draft_iters": trained_iters(draft_dir),
                "prompts": len(prompts),
                "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )

    def run_all(fn) -> tuple[float, list]:
        """Seconds for every prompt in turn, and each one's output."""
        t0 = time.perf_counter()
        outs = [fn(p) for p in prompts]
        return time.perf_counter() - t0, outs

    models = {
        "fused": (prepare_for_decoding(copy.deepcopy(target)), prepare_for_decoding(copy.deepcopy(draft))),
        "eager": (target, draft),
    }
    results = []
    for path in args.paths:
        fast_target, fast_draft = models[path]
        for k in args.k:
            plain_t, spec_t, plain_sampled_t, spec_sampled_t = [], [], [], []
            for _ in range(args.repeats):  # interleaved: machine load drifts alike for all
                t, plain = run_all(lambda p: generate(fast_target, [p], greedy)[0].tokens)
                plain_t.append(t)
                t, spec_runs = run_all(lambda p: speculative_generate(fast_target, fast_draft, p, greedy, k=k))
                spec_t.append(t)
                plain_sampled_t.append(run_all(lambda p: generate(fast_target, [p], sampled))[0])
                t, sampled_runs = run_all(lambda p: speculative_generate(fast_target, fast_draft, p, sampled, k=k))
                spec_sampled_t.append(t)
            spec = [tokens for tokens, _ in spec_runs]
            stats = [st for _, st in spec_runs]
            sampled_stats = [st for _, st in sampled_runs]
            tokens = len(prompts) * args.new_tokens
            row = {
                "path": path,
                "decode_path": decode_path(fast_target),
                "k": k,
                "plain_tok_s": round(tokens / statistics.median(plain_t), 2),
                "speculative_tok_s": round(tokens / statistics.median(spec_t), 2),
                "identical": spec == plain,
                "acceptance_rate": round(statistics.mean(s["acceptance_rate"] for s in stats), 3),
                "tokens_per_round": round(statistics.mean(s["tokens_per_round"] for s in stats), 2),
                "sampled_acceptance_rate": round(statistics.mean(s["acceptance_rate"] for s in sampled_stats), 3),
                "sampled_plain_tok_s": round(tokens / statistics.median(plain_sampled_t), 2),
                "sampled_speculative_tok_s": round(tokens / statistics.median(spec_sampled_t), 2),
            }
            row["speedup"] = round(row["speculative_tok_s"] / row["plain_tok_s"], 3)
            row["sampled_speedup"] = round(row["sampled_speculative_tok_s"] / row["sampled_plain_tok_s"], 3)
            print(json.dumps(row), flush=True)
            results.append(row)

    best_of = {path: max((r for r in results if r["path"] == path), key=lambda r: r["speedup"]) for path in args.paths}
    best = best_of[args.paths[0]]
    engine_rows = [engine_row(*models["fused"], prompts, greedy, best["k"], n, args.repeats) for n in args.engine_batch]
    for row in engine_rows:
        print(json.dumps(row), flush=True)
    print("sample:", json.dumps(tokenizer.decode(prompts[0] + spec[0])[:300]), flush=True)
    print(
        json.dumps(
            {
                "speedup": best["speedup"],
                "path": best["path"],
                "speedup_by_path": {path: r["speedup"] for path, r in best_of.items()},
                "identical": all(r["identical"] for r in results),
                "acceptance_rate": best["acceptance_rate"],
                "k": best["k"],
                "plain_tok_s": best["plain_tok_s"],
                "speculative_tok_s": best["speculative_tok_s"],
                "sampled_acceptance_rate": best["sampled_acceptance_rate"],
                "sampled_speedup": best["sampled_speedup"],
                "engine_speedup": {r["engine_requests"]: r["speedup"] for r in engine_rows},
                "engine_identical": all(r["identical"] for r in engine_rows),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
