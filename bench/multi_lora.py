"""Many LoRA adapters on one engine (batched, unmerged) vs one merged model: throughput and mixed-up outputs.

--requests concurrent requests spread round-robin over --adapters LoRA adapters (rank --rank on every linear layer
of every block, random A and B: a fresh adapter's B is zero and would change nothing) run through one
`lmforge.engine.Engine` whose `AdapterBank` holds them all: rows of different adapters share every step, each
adding its own low-rank product after the base one (lmforge.infer.multi_lora; the decoding rows in the fused step).
The same requests then run against a single model with one adapter merged into its weights (what serving one
adapter costs: the ceiling), and, for the check, each adapter's requests against a model with that adapter merged.

tok/s = generated tokens / wall time (prefill included), medians of --repeats interleaved runs; ratio = tok_s /
merged_tok_s (the issue's floor: 0.7); mismatches = requests whose greedy tokens differ from those of the model with
their own adapter merged (0: nothing was mixed up between rows). The model is --model (a preset: random weights),
prepared for decoding as `lmforge serve` prepares it. The last line is JSON with adapters, requests, tok_s,
merged_tok_s, ratio, mismatches.

    python bench/multi_lora.py                           # llama-micro, 8 adapters of rank 16, 32 requests
    python bench/multi_lora.py --model gpt-14m --rank 8
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def random_adapter(model, seed: int, rank: int):
    from lmforge.lora import BLOCK_TARGETS, Adapter, LoRAWeights

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = {}
    for i in range(model.config.n_layer):
        for t in BLOCK_TARGETS:
            m = modules[f"blocks.{i}.{t}"]
            A = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            layers[f"blocks.{i}.{t}"] = LoRAWeights(A, torch.randn(m.out_features, rank, generator=g) * 0.05, 2.0)
    return Adapter(layers, source=f"random-{seed}")


def run(engine, prompts, params, names) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, adapters=names)
    return time.perf_counter() - t0, [c.tokens for c in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-micro", help="a preset (random weights) or model folder")
    parser.add_argument("--adapters", type=int, default=8, help="LoRA adapters")
    parser.add_argument("--requests", type=int, default=32, help="concurrent requests, round-robin over adapters")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.engine.engine import Engine
    from lmforge.infer.fused import decode_path, prepare_for_decoding
    from lmforge.infer.multi_lora import AdapterBank
    from lmforge.infer.sampling import SamplingParams
    from lmforge.loader import load
    from lmforge.lora import merge_adapter

    base = load(args.model, prepare=False).model
    adapters = {f"lora{i}": random_adapter(base, i, args.rank) for i in range(args.adapters)}
    names = [f"lora{i % args.adapters}" for i in range(args.requests)]
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, base.config.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.requests)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

    def merged(name):
        return prepare_for_decoding(merge_adapter(copy.deepcopy(base), adapters[name], check_base=False))

    served = prepare_for_decoding(copy.deepcopy(base))
    bank = AdapterBank(served)
    for name, adapter in adapters.items():
        bank.add(name, adapter)
    single = merged(names[0])
    kw = dict(max_num_seqs=args.requests, max_num_batched_tokens=max(256, args.requests * 8))
    print(
        json.dumps(
            {
                "model": args.model,
                "params": base.num_params(),
                "decode_path": decode_path(served),
                "adapters": args.adapters,
                "rank": args.rank,
                "requests": args.requests,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )

    times = {"multi": [], "merged": []}
    for _ in range(args.repeats):
        t, multi_out = run(Engine(served, adapters=bank, **kw), prompts, params, names)
        times["multi"].append(t)
        t, _ = run(Engine(single, **kw), prompts, params, None)
        times["merged"].append(t)
    tokens = args.requests * args.max_tokens
    tok_s, merged_tok_s = (tokens / statistics.median(times[k]) for k in ("multi", "merged"))

    mismatches = 0
    for name in adapters:
        rows = [i for i, n in enumerate(names) if n == name]
        _, expected = run(Engine(merged(name), **kw), [prompts[i] for i in rows], params, None)
        mismatches += sum(multi_out[i] != e for i, e in zip(rows, expected))
    print(
        json.dumps(
            {
                "adapters": args.adapters,
                "requests": args.requests,
                "tok_s": round(tok_s, 1),
                "merged_tok_s": round(merged_tok_s, 1),
                "ratio": round(tok_s / merged_tok_s, 3),
                "mismatches": mismatches,
                "rank": args.rank,
                "model": args.model,
                "decode_path": decode_path(served),
                "max_tokens": args.max_tokens,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
