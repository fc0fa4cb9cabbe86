"""Weight-only int8 and int4: decode speed on GPT-2 small and the perplexity change on two models trained by lmforge.

Three parts, all in this one process, side by side:

1. kernels: one GPT-2-small Linear (768 -> 3072) and the output head (768 -> 50257) at batch 1, median time of
   float32 `F.linear`, the fused decode step's own kernel on float32, int8 and int4 weights (`*_fused`: what
   `lmforge generate` runs), `torch._weight_int8pack_mm` (bfloat16 / float32 activations), dequantize-then-matmul,
   a bfloat16 `F.linear`, PyTorch's int4 group-wise kernel (`_weight_int4pack_mm_for_cpu`, group 32) and its
   dynamic int8 (`torch.ao` W8A8, activations quantized too: the peer).
2. decode: GPT-2 small with random weights, batch 1, a 32-token prompt, 128 greedy new tokens; tok/s = 128 / wall
   time (prefill included), median of --repeats runs, the variants interleaved. Through the fused decode step
   (lmforge.infer.fused, as `lmforge generate` runs them): fp32, int8 and int4 (`quantize_model`; 4-bit weights in
   GGUF Q4_0's blocks, widened in registers), bf16; one module call per operation: "fp32_plain" (nn.Linear),
   "int8_eager" (Int8Linear through `torch._weight_int8pack_mm`), "int4_eager" (Int4Linear, the fused kernel per
   layer); the torch.ao dynamic-int8 peer. Then the serving engine (lmforge.engine, paged KV cache, decoding through
   the same fused step) on fp32, int8 and int4: one request alone and --concurrency at once, tok/s.
3. perplexity on two models trained by lmforge's trainer (cached under --cache, so reruns skip training): a
   GPT-2-style gpt-nano on character-level tiny Shakespeare, and a Llama-style llama-nano (RMSNorm, SwiGLU, rotary
   positions, grouped-query attention) on WikiText-2 with a 2,048-token byte-level BPE; `lmforge.evaluate.evaluate`
   (non-overlapping windows over the validation split) on the fp32 model and its int8 and int4 copies (prefill's
   path: each product one GEMM over the exactly dequantized weights). Or --model RUN --data DIR for one model.

The last line is JSON with speedup (int8 / fp32 decode tok/s, both fused), int4_speedup (int4 / fp32) and
int4_vs_int8, the engine's tok/s, and ppl_delta_pct per model and mode with int4_within_5pct.

    python bench/quantize.py --threads 2
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
from lmforge.infer.fused import _load_extension, decode_path, prepare_for_decoding
from lmforge.infer.generate import generate
from lmforge.infer.quantize import model_bytes, quantize_int4, quantize_int8, quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # /work/shared/data beside the checkout


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
        q4, s4 = quantize_int4(w)
        ext, none = _load_extension(), torch.Tensor()
        cases = {
            "fp32": lambda: F.linear(x, w),
            **(
                {
                    "fp32_fused": lambda: ext.linear_act(x, w, none, none, 0),
                    "int8_fused": lambda: ext.linear_act(x, wq, s, none, 0),
                    "int4_fused": lambda: ext.linear_act(x, q4, s4, none, 0),
                }
                if ext is not None
                else {}
            ),
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
        print(
            json.dumps(
                {
                    "kernel": name,
                    "shape": [N, K],
                    "batch": 1,
                    "median_us": times,
                    "speedup_vs_fp32": {c: round(times["fp32"] / t, 2) for c, t in times.items()},
                }
            ),
            flush=True,
        )


def decode(repeats: int, new_tokens: int, concurrency: int) -> dict:
    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig.from_name("gpt2")).eval()
    variants = {
        "fp32": prepare_for_decoding(copy.deepcopy(fp32)),  # what `lmforge generate` runs
        "int8": prepare_for_decoding(quantize_model(copy.deepcopy(fp32), "int8")),
        "int4": prepare_for_decoding(quantize_model(copy.deepcopy(fp32), "int4")),
        "fp32_plain": fp32,
        "int8_eager": quantize_model(copy.deepcopy(fp32), "int8"),
        "int4_eager": quantize_model(copy.deepcopy(fp32), "int4"),
        "bf16": prepare_for_decoding(copy.deepcopy(fp32).to(torch.bfloat16)),
    }
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
    result = {
        "model": "gpt2",
        "batch": 1,
        "prompt": 32,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "tok_s": tok_s,
        "decode_path": paths,
        "mbytes": {
            n: round(model_bytes(m) / 2**20, 1) for n, m in variants.items() if n in ("fp32", "int8", "int4", "bf16")
        },
        "int8_same_tokens_as_fp32": outputs["int8"] == outputs["fp32"],
        "int4_same_tokens_as_int4_eager": outputs["int4"] == outputs["int4_eager"],
        "engine": engine(variants, prompt, params, repeats, concurrency),
    }
    print(json.dumps(result), flush=True)
    return result


def engine(variants: dict, prompt: list[int], params: SamplingParams, repeats: int, concurrency: int) -> dict:
    """tok/s of the serving engine (fused decode step on the paged KV pool) per precision: 1 request, then
    `concurrency` requests submitted together, interleaved over the repeats."""
    from lmforge.engine.engine import Engine

    engines = {name: Engine(variants[name], max_num_seqs=concurrency) for name in ("fp32", "int8", "int4")}
    times = {(name, n): [] for name in engines for n in (1, concurrency)}
    for _ in range(repeats):
        for (name, n), t in times.items():
            t0 = time.perf_counter()
            engines[name].generate([prompt] * n, params)
            t.append(time.perf_counter() - t0)
    return {f"{name}_x{n}": round(n * params.max_tokens / statistics.median(t), 2) for (name, n), t in times.items()}


MODELS = {  # name -> (preset, corpus, tokenizer, vocab size)
    "gpt-nano-shakespeare-char": ("gpt-nano", "tinyshakespeare/input.txt", "char", None),
    "llama-nano-wikitext2-bpe": ("llama-nano", "wikitext-2", "bpe", 2048),
}


def trained_model(cache: Path, name: str, minutes: float, shared_data: Path = SHARED_DATA):
    """One of MODELS trained by lmforge (2,000 iterations or `minutes`), reused from `cache` when already there."""
    from lmforge.data import prepare
    from lmforge.train.trainer import TrainConfig, train

    preset, corpus, tokenizer, vocab = MODELS[name]
    data, run = cache / name / "data", cache / name / "run"
    if not (data / "meta.json").exists():
        prepare(shared_data / corpus, data, tokenizer=tokenizer, vocab_size=vocab, val_fraction=0.1)
    if not (run / "best" / "config.json").exists():
        overrides = {"block_size": 128} if preset == "llama-nano" else {}
        train(
            TrainConfig(
                data=str(data),
                out=str(run),
                preset=preset,
                max_iters=2000,
                max_minutes=minutes,
                eval_interval=250,
                lr_decay_iters=2000,
                progress=False,
                log_interval=100,
                **overrides,
            )
        )
    return run, data


def perplexity(run: Path, data: Path) -> dict:
    from lmforge.data import load_split

    fp32, _ = load_model(run, with_tokenizer=False)
    val = load_split(data, "val")
    variants = {
        "fp32": fp32,
        "int8": quantize_model(copy.deepcopy(fp32), "int8"),
        "int4": quantize_model(copy.deepcopy(fp32), "int4"),
    }
    peer = dynamic_int8_peer(fp32)
    if peer is not None:
        peer.config = fp32.config
        variants["peer_torch_ao_dynamic_int8"] = peer
    with torch.inference_mode():
        ppl = {name: evaluate(m, val, batch_size=16)["ppl"] for name, m in variants.items()}
    result = {
        "model": str(run),
        "preset": fp32.config.name,
        "val_tokens": int(len(val)),
        "ppl": {n: round(p, 4) for n, p in ppl.items()},
        "ppl_delta_pct": {n: round(100 * (p / ppl["fp32"] - 1), 3) for n, p in ppl.items() if n != "fp32"},
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    parser.add_argument("--repeats", type=int, default=3, help="decode runs per variant (median)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once in the engine's second case")
    parser.add_argument("--kernel-repeats", type=int, default=200, help="timed calls per kernel")
    parser.add_argument("--model", default=None, help="a trained run or model folder for the perplexity part")
    parser.add_argument("--data", default=None, help="the data folder the --model was trained on")
    parser.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "lmforge" / "bench-quantize"),
        help="where the trained models and their data are kept between runs",
    )
    parser.add_argument("--train-minutes", type=float, default=3.0, help="training budget per model not cached")
    parser.add_argument(
        "--shared-data",
        default=str(SHARED_DATA),
        help="the corpora folder (tinyshakespeare/, wikitext-2/), /work/shared/data on the development machines",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.model is None) != (args.data is None):
        parser.error("--model and --data go together")

    kernels(args.kernel_repeats)
    speed = decode(args.repeats, args.new_tokens, args.concurrency)
    runs = (
        {args.model: (Path(args.model), Path(args.data))}
        if args.model
        else {
            name: trained_model(Path(args.cache), name, args.train_minutes, Path(args.shared_data)) for name in MODELS
        }
    )
    ppl = {name: perplexity(run, data) for name, (run, data) in runs.items()}
    tok_s = speed["tok_s"]
    print(
        json.dumps(
            {
                "speedup": round(tok_s["int8"] / tok_s["fp32"], 3),
                "int4_speedup": round(tok_s["int4"] / tok_s["fp32"], 3),
                "int4_vs_int8": round(tok_s["int4"] / tok_s["int8"], 3),
                "speedup_vs_plain_fp32": round(tok_s["int8"] / tok_s["fp32_plain"], 3),
                "fp32_tok_s": tok_s["fp32"],
                "int8_tok_s": tok_s["int8"],
                "int4_tok_s": tok_s["int4"],
                "bf16_tok_s": tok_s["bf16"],
                "engine_tok_s": speed["engine"],
                "ppl": {name: r["ppl"] for name, r in ppl.items()},
                "ppl_delta_pct": {name: r["ppl_delta_pct"] for name, r in ppl.items()},
                "int4_within_5pct": all(r["ppl_delta_pct"]["int4"] <= 5 for r in ppl.values()),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
