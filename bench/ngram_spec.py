"""Prompt-lookup (n-gram) speculative decoding vs plain decoding on the serving engine, where the output repeats the
input and where it does not.

The model: an lmforge-trained code model. By default it is trained here (kept under --cache, so reruns only measure):
3 layers x 128, a 1024-token BPE, a 320-token context (small enough to train in tens of minutes on two
cores), on python-stdlib functions (the library's files minus data.STDLIB_HOLDOUT) each followed by an edit of it,
a document per function:

    # Rename `data` to `value` in this function.
    def f(data):
        ...
    # Result:
    def f(value):
        ...

so that the model learns Python and to copy a function with one change. It does not learn the copying yet: its greedy
edits of held-out functions reproduce none of them (edits_whole 0), so the repetitive workload's accepted proposals come
from the model repeating its own output, and the speed-up there is not yet the one the workload is for. (Neither did a
Llama-style 2 x 128 with a 2048-token BPE, trained 3,500 steps of 16 x 320 tokens on these edits plus two documents per
function that only copying predicts, random identifiers then the same ones again: a small model learns Python's
regularities long before it learns to copy.) The repetitive workload gives it held-out functions (from the
STDLIB_HOLDOUT files, which neither the tokenizer nor the model saw) up to "# Result:\\n" and asks for as many tokens as
the edited function has: the output repeats the input. The plain workload asks it to write new code from the first line
of the same held-out functions (no instruction, nothing to copy), sampled at temperature 1, so little of the output
repeats anything.

Both workloads run through `lmforge.engine.Engine` as `lmforge serve` runs it (the model prepared for decoding, so
decoding and verification take the fused step), with and without `speculative="ngram"`, --requests at a time (default 1:
prompt lookup is a latency technique; on this 0.8M-parameter model the forward is compute-bound: checking 9 tokens a row
costs 5.3 one-token forwards at 4 rows, 2.8 at 1 row, AMD EPYC Zen 5, 2 threads), interleaved, --repeats times, after an
untimed warm-up; tok/s = generated tokens / wall time (prefill included), medians; speedup_*_cpu compare the process's
CPU time instead (a check on a shared machine, not the figure). `identical` says whether the greedy tokens of the
repetitive workload equal plain decoding's (they must); edits_first_line and edits_whole count the held-out functions
whose greedy output begins with the edited function's first line, or with all of it: whether the model copies its input,
or its speed-up comes from repeating itself. The last line is JSON with speedup_repetitive, speedup_plain, identical,
the tok/s figures, the acceptance rates and those counts.

    python bench/ngram_spec.py --train-only           # 2000 steps of training once (cached; ~20 minutes on two
                                                      # idle cores)
    python bench/ngram_spec.py                        # then seconds of measuring
    python bench/ngram_spec.py --requests 4           # four requests at a time
    python bench/ngram_spec.py --model runs/code      # an lmforge code model of your own (its own tokenizer)
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import statistics
import textwrap
import time
from pathlib import Path

import torch

SHAPE = dict(n_layer=3, n_head=4, n_embd=128, block_size=320)
NAMES = (
    "value",
    "item",
    "result",
    "count",
    "data",
    "node",
    "key",
    "text",
    "entry",
    "total",
    "buf",
    "obj",
    "size",
    "name",
    "index",
    "parts",
    "token",
    "state",
    "limit",
    "target",
)


def functions(source: str, lo: int = 120, hi: int = 400) -> list[str]:
    """The function definitions of a module (methods too), dedented, of lo..hi characters."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines, out = source.splitlines(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
            text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno])) + "\n"
            if lo <= len(text) <= hi and "\t" not in text:
                out.append(text)
    return out


def rename_task(func: str, rng: random.Random) -> tuple[str, str] | None:
    """(instruction + function + "# Result:\\n", the edited function): one of its names used twice or more,
    renamed to a name it does not use; None when it has none."""
    used = set(re.findall(r"\b[A-Za-z_]\w*\b", func))
    try:
        tree = ast.parse(func)
    except SyntaxError:
        return None
    names = sorted(
        {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
        | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    )
    names = [n for n in names if n not in ("self", "cls") and len(re.findall(rf"(?<![.\w]){n}\b", func)) >= 2]
    fresh = [n for n in NAMES if n not in used]
    if not names or not fresh:
        return None
    old, new = rng.choice(names), rng.choice(fresh)
    prompt = f"# Rename `{old}` to `{new}` in this function.\n{func}# Result:\n"
    return prompt, re.sub(rf"(?<![.\w]){old}\b", new, func)  # not attributes (self.old stays)


def stdlib_functions(holdout: bool) -> list[str]:
    from lmforge.corpus import STDLIB_HOLDOUT, python_stdlib_files

    root, names = python_stdlib_files()
    chosen = [n for n in names if (n in STDLIB_HOLDOUT) == holdout]
    out = []
    for name in chosen:
        try:
            out += functions((root / name).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def train_model(cache: Path, iters: int, threads: int) -> Path:
    """The code model (see the module docstring), trained once and kept under `cache`."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    run = cache / f"code-rename-{SHAPE['n_layer']}x{SHAPE['n_embd']}-{iters}it"
    if (run / "best" / "config.json").exists():
        return run
    corpus, data = cache / "corpus", cache / "data"
    if not (data / "meta.json").exists():
        rng = random.Random(0)
        docs = []
        for func in stdlib_functions(holdout=False):
            task = rename_task(func, rng)
            if task is not None:
                docs.append(task[0] + task[1])
        rng.shuffle(docs)
        n_val = max(1, len(docs) // 50)
        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "val.txt").write_text("\n\n".join(docs[:n_val]) + "\n", encoding="utf-8")
        (corpus / "train.txt").write_text("\n\n".join(docs[n_val:]) + "\n", encoding="utf-8")
        meta = prepare(corpus, data, tokenizer="bpe", vocab_size=1024)
        print(json.dumps({"stage": "prepare", "documents": len(docs), "splits": meta["splits"]}), flush=True)
    summary = train(
        TrainConfig(
            data=str(data),
            out=str(run),
            preset="gpt-mini",
            **SHAPE,
            batch_size=8,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=50,
            dropout=0.0,
            eval_interval=250,
            eval_iters=10,
            max_iters=iters,
            log_interval=50,
            progress=False,
            num_threads=threads,
            seed=0,
        )
    )
    print(
        json.dumps(
            {
                "stage": "train",
                "iters": summary["iters"],
                "best_val_loss": summary["best_val_loss"],
                "params": summary["params"],
            }
        ),
        flush=True,
    )
    return run


def run_engine(
    model, prompts, params, requests: int, speculative: str | None, k: int
) -> tuple[float, list, dict, float]:
    """Every prompt through one engine, `requests` at a time; (seconds, outputs, engine stats, CPU seconds of this
    process: less swayed than wall time by other work on a shared machine)."""
    from lmforge.engine.engine import Engine

    engine = Engine(
        model, max_num_seqs=requests, max_num_batched_tokens=1024, speculative=speculative, num_speculative_tokens=k
    )
    t0, c0 = time.perf_counter(), time.process_time()
    outs = []
    for i in range(0, len(prompts), requests):
        outs += [c.tokens for c in engine.generate(prompts[i : i + requests], params[i : i + requests])]
    return time.perf_counter() - t0, outs, engine.stats(), time.process_time() - c0


def compare(model, prompts, params, requests: int, k: int, repeats: int) -> tuple[dict, list[list[int]]]:
    """Plain vs prompt lookup, interleaved: (figures, plain decoding's outputs)."""
    run_engine(model, prompts[:requests], params[:requests], requests, "ngram", k)  # warm-up, not timed
    times, cpu = {"plain": [], "ngram": []}, {"plain": [], "ngram": []}
    outs, stats = {}, {}
    for _ in range(repeats):
        for name, method in (("plain", None), ("ngram", "ngram")):
            t, outs[name], stats[name], c = run_engine(model, prompts, params, requests, method, k)
            times[name].append(t)
            cpu[name].append(c)
    tokens = sum(len(o) for o in outs["plain"])
    plain = tokens / statistics.median(times["plain"])
    ngram = sum(len(o) for o in outs["ngram"]) / statistics.median(times["ngram"])
    s = stats["ngram"]
    return {
        "plain_tok_s": round(plain, 1),
        "ngram_tok_s": round(ngram, 1),
        "speedup": round(ngram / plain, 3),
        "speedup_cpu": round(statistics.median(cpu["plain"]) / statistics.median(cpu["ngram"]), 3),
        "identical": outs["plain"] == outs["ngram"],
        "tokens": tokens,
        "acceptance_rate": round(s["draft_accepted"] / max(s["draft_proposed"], 1), 3),
        "tokens_per_step": round(s["generated_tokens"] / max(s["steps"], 1), 2),
        "plain_steps": stats["plain"]["steps"],
        "ngram_steps": s["steps"],
    }, outs["plain"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="an lmforge code model folder or run (default: train one)")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "lmforge" / "bench-ngram"),
        help="where the trained model and its data are kept between runs",
    )
    parser.add_argument(
        "--iters", type=int, default=2000, help="training steps of the default model (8 x 320 tokens each)"
    )
    parser.add_argument("--functions", type=int, default=48, help="held-out functions per workload (at most)")
    parser.add_argument("--requests", type=int, default=1, help="concurrent requests in the engine")
    parser.add_argument("--k", type=int, default=8, help="tokens prompt lookup proposes at most per step")
    parser.add_argument("--repeats", type=int, default=7, help="runs per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the model and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.infer.fused import decode_path
    from lmforge.infer.sampling import SamplingParams
    from lmforge.loader import load

    path = Path(args.model) if args.model else train_model(Path(args.cache), args.iters, args.threads)
    if args.train_only:
        return
    loaded = load(path)
    model, tok = loaded.model, loaded.tokenizer
    context = model.config.block_size
    rng = random.Random(1)
    tasks = []
    for func in stdlib_functions(holdout=True):
        task = rename_task(func, rng)
        if task is not None and len(tok.encode(task[0])) + len(tok.encode(task[1])) + 8 <= context:
            tasks.append(task)
    rng.shuffle(tasks)
    tasks = tasks[: args.functions]
    print(
        json.dumps(
            {
                "model": str(path),
                "params": model.num_params(),
                "decode_path": decode_path(model),
                "functions": len(tasks),
                "requests": args.requests,
                "k": args.k,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )

    prompts = [tok.encode(p) for p, _ in tasks]
    greedy = [SamplingParams(temperature=0, max_tokens=len(tok.encode(edit)) + 4, ignore_eos=True) for _, edit in tasks]
    repetitive, outs = compare(model, prompts, greedy, args.requests, args.k, args.repeats)
    # Whether the model really copies: its greedy output begins with the edited function's first line, or all of it.
    texts = [tok.decode(o) for o in outs]
    repetitive["edits_first_line"] = sum(t.startswith(e.split("\n", 1)[0]) for t, (_, e) in zip(texts, tasks))
    repetitive["edits_whole"] = sum(t.startswith(e) for t, (_, e) in zip(texts, tasks))
    print(json.dumps({"workload": "repetitive", **repetitive}), flush=True)

    starts = [tok.encode(edit.split("\n", 1)[0] + "\n") for _, edit in tasks]
    sampled = [
        SamplingParams(temperature=1.0, max_tokens=min(128, context - len(s)), ignore_eos=True, seed=i)
        for i, s in enumerate(starts)
    ]
    plain, _ = compare(model, starts, sampled, args.requests, args.k, args.repeats)
    print(json.dumps({"workload": "plain", **plain}), flush=True)

    print(
        json.dumps(
            {
                "speedup_repetitive": repetitive["speedup"],
                "speedup_plain": plain["speedup"],
                "speedup_repetitive_cpu": repetitive["speedup_cpu"],
                "speedup_plain_cpu": plain["speedup_cpu"],
                "identical": repetitive["identical"],
                "repetitive_plain_tok_s": repetitive["plain_tok_s"],
                "repetitive_ngram_tok_s": repetitive["ngram_tok_s"],
                "plain_plain_tok_s": plain["plain_tok_s"],
                "plain_ngram_tok_s": plain["ngram_tok_s"],
                "acceptance_rate_repetitive": repetitive["acceptance_rate"],
                "acceptance_rate_plain": plain["acceptance_rate"],
                "requests": args.requests,
                "k": args.k,
                "functions": len(tasks),
                "edits_first_line": repetitive["edits_first_line"],
                "edits_whole": repetitive["edits_whole"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
