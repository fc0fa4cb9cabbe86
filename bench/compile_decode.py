"""torch.compile of the batch-1 decode step: eager vs compiled, compile time, recompiles, tok/s, side by side.

The decode step is `model(token[:, None], kv_cache=cache)` (what `lmforge.infer.generate.decode_step` runs).
Three ways, each over the same prefilled prompt and --steps new tokens, in this one process:

- eager: the model as it is, with lmforge's `KVCache`;
- compiled: `torch.compile` of the same step with `KVCache`, whose fill level `length` is a Python int: dynamo
  specialises on it, so the second length recompiles (then automatic dynamic shapes make it symbolic); the
  attended slice [:length] also changes shape every step;
- compiled_static: `torch.compile` with `StaticKVCache` below (gpt-fast's layout): the fill level is a tensor,
  writes go through `index_copy_` at tensor positions, attention always spans all max_len slots under a mask,
  so every step has the same shapes and one graph serves all lengths.

For each: compile_s (first compiled call minus an eager one, recompiles counted separately), graphs (dynamo's
unique graphs), tok/s over the timed steps (median of --repeats), and the largest logit difference to eager.
One JSON line per (preset, variant); the last line summarises the speedups.

    python bench/compile_decode.py --threads 1 --presets gpt-14m gpt2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.config import ModelConfig
from lmforge.model import KVCache, Transformer


class StaticKVCache(KVCache):
    """A KVCache whose fill level is a tensor: fixed shapes for every decode step (no int to specialise on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # sets self.length = 0, which creates self.pos
        if self.pad is not None:
            raise ValueError("StaticKVCache serves unpadded batches")
        self.slots = torch.arange(self.max_len, device=self.k.device)

    @property
    def length(self) -> int:  # for callers outside the compiled step (crop, speculative decoding)
        return int(self.pos)

    @length.setter
    def length(self, value: int) -> None:
        self.pos = torch.full((), value, dtype=torch.long, device=self.k.device)  # slots written so far

    def positions(self, T: int) -> torch.Tensor:
        return self.pos + torch.arange(T, device=self.k.device)

    def attention(self, T: int):
        q_pos = self.positions(T)[:, None]  # (T, 1)
        return self.slots[None, :] <= q_pos, False  # (T, max_len): each query sees slots up to itself

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        index = self.positions(k.shape[2])
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer], self.v[layer]  # all max_len slots; the mask hides the unwritten ones

    def advance(self, T: int) -> None:
        self.pos += T  # in place: the compiled step sees the same tensor every time


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@torch.inference_mode()
def run(model: Transformer, step, cache_cls, prompt: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor]:
    """Prefill eagerly, then `steps` greedy decode steps through `step`; per-step seconds and all logits."""
    cache = cache_cls(model.config, 1, prompt.shape[1] + steps)
    logits = model(prompt, kv_cache=cache)[:, -1]
    times, out = [], []
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)  # (1, 1)
        t0 = time.perf_counter()
        logits = step(token, cache)[:, -1]
        times.append(time.perf_counter() - t0)
        out.append(logits)
    return times, torch.cat(out)


def bench_preset(preset: str, steps: int, repeats: int, mode: str | None) -> list[dict]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32))

    def eager(token, cache):
        return model(token, kv_cache=cache)

    rows = []
    ref_times, ref_logits = run(model, eager, KVCache, prompt, steps)
    for name, cache_cls in (("eager", KVCache), ("compiled", KVCache), ("compiled_static", StaticKVCache)):
        torch._dynamo.reset()
        step = eager if name == "eager" else torch.compile(eager, mode=mode, fullgraph=False)
        graphs0 = dynamo_graphs()
        first_times, logits = run(model, step, cache_cls, prompt, steps)  # compiles (and recompiles) here
        graphs = dynamo_graphs() - graphs0
        per_run = [first_times] + [run(model, step, cache_cls, prompt, steps)[0] for _ in range(repeats)]
        steady = statistics.median(statistics.median(t) for t in per_run[1:])
        row = {
            "preset": preset,
            "variant": name,
            "steps": steps,
            "compile_s": round(first_times[0] - statistics.median(ref_times), 2) if name != "eager" else 0.0,
            "recompile_s": round(sum(t - steady for t in first_times[1:] if t > 10 * steady), 2),
            "graphs": graphs,
            "tok_s": round(1 / steady, 2),
            "max_logit_diff_vs_eager": float((logits - ref_logits).abs().max()),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpt-14m", "gpt2"], help="model presets (random weights)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the compiling one (median)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs...)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = {}
    for preset in args.presets:
        rows = {r["variant"]: r for r in bench_preset(preset, args.steps, args.repeats, args.mode)}
        summary[preset] = {
            v: {
                "speedup": round(r["tok_s"] / rows["eager"]["tok_s"], 3),
                "compile_s": r["compile_s"],
                "graphs": r["graphs"],
            }
            for v, r in rows.items()
            if v != "eager"
        }
    print(json.dumps({"speedup_vs_eager": summary, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
