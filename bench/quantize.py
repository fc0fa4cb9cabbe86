"""Weight-only int8: decode speed on GPT-2 small and the perplexity change on a model trained by lmforge.

Three parts, all in this one process, side by side:

1. kernels: one GPT-2-small Linear (768 -> 3072) and the output head (768 -> 50257) at batch 1, median time of
   float32 `F.linear`, the int8 options (`torch._weight_int8pack_mm` with bfloat16 or float32 activations,
   dequantize-then-matmul), a bfloat16 `F.linear`, int4 group-wise (`_weight_int4pack_mm_for_cpu`, group 32) and
   PyTorch's own dynamic int8 (`torch.ao` W8A8, activations quantized too: the peer).
2. decode: GPT-2 small with random weights, batch 1, a 32-token prompt, 128 greedy new tokens through
   `lmforge.infer.generate.generate`; tok/s = 128 / wall time (prefill included), median of --repeats runs,
   the variants interleaved: fp32 and int8 (`quantize_model`) as `lmforge generate` runs them (the fused decode
   step of lmforge.infer.fused, which streams int8 weights and widens them to float in registers); the same
   two one module call per operation ("fp32_plain": nn.Linear; "int8_eager": Int8Linear through
   `torch._weight_int8pack_mm`, activations rounded to bfloat16), bf16, and the torch.ao dynamic-int8 peer.
3. perplexity: a gpt-nano trained by lmforge's trainer on tiny Shakespeare (cached under --cache, so reruns
   skip training) or --model RUN --data DIR; `lmforge.evaluate.evaluate` (non-overlapping windows over the
   validation split) on the fp32 model and its int8 copy.

The last line is JSON with speedup (int8 / fp32 decode tok/s, both lmforge's fast path), speedup_vs_plain_fp32,
ppl_delta_pct (through the model's forward, the eager int8 path), fp32_tok_s, int8_tok_s.

    python bench/quantize.py --threads 1          # a shared machine: one thread gives steadier ratios
    python bench/quantize.py --model runs/x --data data/x
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model
from lmforge.config import ModelConfig
from lmforge.evaluate import evaluate
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.generate import generate
from lmforge.infer.quantize import model_bytes, quantize_int8, quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e6 * statistics.median(times), 1)


def int4_pack(w: torch.Tensor, group: int = 32):
    """Asymmetric 4-bit groups of `group` inputs, packed for `_weight_int4pack_mm_for_cpu` (gpt-fast's layout)."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-6) / 15
    q = torch.round((g - lo) / scale).clamp(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()  # (K/group, N, 2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros


def dynamic_int8_peer(model: torch.nn.Module):
    """PyTorch's built-in dynamic int8 (weights int8, activations quantized per call); None if unavailable."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, torch.qint8)
    except Exception as e:  # removed or unsupported in this PyTorch build
        print(json.dumps({"peer_unavailable": f"{type(e).__name__}: {e}"}))
        return None


def kernels(repeats: int) -> None:
    torch.manual_seed(0)
    for name, (N, K) in {"mlp.fc": (3072, 768), "lm_head": (50257, 768)}.items():
        w, x = torch.randn(N, K) * 0.02, torch.randn(1, K)
        wq, s = quantize_int8(w)
        xb, sb, wb = x.bfloat16(), s.bfloat16(), w.bfloat16()
        cases = {
            "fp32": lambda: F.linear(x, w),
            "int8pack_bf16_act": lambda: torch._weight_int8pack_mm(x.bfloat16(), wq, sb).float(),
            "int8pack_fp32_act": lambda: torch._weight_int8pack_mm(x, wq, s),
            "dequant_then_fp32": lambda: F.linear(x, wq.float() * s[:, None]),
            "bf16": lambda: F.linear(xb, wb),
        }
        try:
            packed, sz = int4_pack(w)
            cases["int4pack_g32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        except Exception as e:
            print(json.dumps({"int4_unavailable": f"{type(e).__name__}: {e}"}))
        peer = dynamic_int8_peer(torch.nn.Sequential(torch.nn.Linear(K, N)))
        if peer is not None:
            cases["peer_torch_ao_dynamic_int8"] = lambda: peer(x)
        n = max(3, repeats // 10) if N > 10000 else repeats
        times = {case: median_us(fn, n) for case, fn in cases.items()}
        print(json.dumps({"kernel": name, "shape": [N, K], "batch": 1, "median_us": times,
                          "speedup_vs_fp32": {c: round(times["fp32"] / t, 2) for c, t in times.items()}}), flush=True)


def decode(repeats: int, new_tokens: int) -> dict:
    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig.from_name("gpt2")).eval()
    variants = {"fp32": prepare_for_decoding(copy.deepcopy(fp32)),  # what `lmforge generate` runs
                "int8": prepare_for_decoding(quantize_model(copy.deepcopy(fp32), "int8")),
                "fp32_plain": fp32, "int8_eager": quantize_model(copy.deepcopy(fp32), "int8"),
                "bf16": prepare_for_decoding(copy.deepcopy(fp32).to(torch.bfloat16))}
    paths = {name: decode_path(model) for name, model in variants.items()}
    peer = dynamic_int8_peer(fp32)
    if peer is not None:
        variants["peer_torch_ao_dynamic_int8"] = peer
    prompt = torch.randint(0, 50257, (32,)).tolist()
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    times = {name: [] for name in variants}
    outputs = {}
    for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for name, model in variants.items():
            t0 = time.perf_counter()
            outputs[name] = generate(model, [prompt], params)[0].tokens
            times[name].append(time.perf_counter() - t0)
    tok_s = {name: round(new_tokens / statistics.median(t), 2) for name, t in times.items()}
    result = {"model": "gpt2", "batch": 1, "prompt": 32, "new_tokens": new_tokens, "repeats": repeats,
              "tok_s": tok_s, "decode_path": paths,
              "mbytes": {n: round(model_bytes(m) / 2**20, 1) for n, m in variants.items()
                         if n in ("fp32", "int8", "bf16")},
              "int8_same_tokens_as_fp32": outputs["int8"] == outputs["fp32"],
              "int8_eager_same_tokens_as_fp32": outputs["int8_eager"] == outputs["fp32"]}
    print(json.dumps(result), flush=True)
    return result


def trained_model(cache: Path, minutes: float):
    """A gpt-nano trained by lmforge on char-level tiny Shakespeare, reused from `cache` when already there."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    data, run = cache / "data", cache / "run"
    if not (data / "meta.json").exists():
        prepare(SHAKESPEARE, data, tokenizer="char", val_fraction=0.1)
    if not (run / "best" / "config.json").exists():
        train(TrainConfig(data=str(data), out=str(run), preset="gpt-nano", max_iters=2000, max_minutes=minutes,
                          eval_interval=250, lr_decay_iters=2000, progress=False, log_interval=100))
    return run, data


def perplexity(run: Path, data: Path) -> dict:
    from lmforge.data import load_split

    fp32, _ = load_model(run, with_tokenizer=False)
    val = load_split(data, "val")
    variants = {"fp32": fp32, "int8": quantize_model(copy.deepcopy(fp32), "int8")}
    peer = dynamic_int8_peer(fp32)
    if peer is not None:
        peer.config = fp32.config
        variants["peer_torch_ao_dynamic_int8"] = peer
    ppl = {name: evaluate(m, val, batch_size=16)["ppl"] for name, m in variants.items()}
    result = {"model": str(run), "preset": fp32.config.name, "val_tokens": int(len(val)),
              "ppl": {n: round(p, 4) for n, p in ppl.items()},
              "ppl_delta_pct": {n: round(100 * (p / ppl["fp32"] - 1), 3) for n, p in ppl.items() if n != "fp32"}}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per variant (median)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run")
    parser.add_argument("--kernel-repeats", type=int, default=200, help="timed calls per kernel")
    parser.add_argument("--model", default=None, help="a trained run or model folder for the perplexity part")
    parser.add_argument("--data", default=None, help="the data folder the --model was trained on")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "lmforge" / "bench-quantize"),
                        help="where the trained gpt-nano and its data are kept between runs")
    parser.add_argument("--train-minutes", type=float, default=2.5, help="training budget when no run is cached")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")

    kernels(args.kernel_repeats)
    speed = decode(args.repeats, args.new_tokens)
    run, data = (Path(args.model), Path(args.data)) if args.model else trained_model(Path(args.cache),
                                                                                     args.train_minutes)
    ppl = perplexity(run, data)
    print(json.dumps({"speedup": round(speed["tok_s"]["int8"] / speed["tok_s"]["fp32"], 3),
                      "speedup_vs_plain_fp32": round(speed["tok_s"]["int8"] / speed["tok_s"]["fp32_plain"], 3),
                      "ppl_delta_pct": ppl["ppl_delta_pct"]["int8"], "fp32_tok_s": speed["tok_s"]["fp32"],
                      "int8_tok_s": speed["tok_s"]["int8"], "bf16_tok_s": speed["tok_s"]["bf16"],
                      "ppl_fp32": ppl["ppl"]["fp32"], "ppl_int8": ppl["ppl"]["int8"],
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
