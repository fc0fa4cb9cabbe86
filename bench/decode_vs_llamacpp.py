"""Batch-1 greedy decode and prompt prefill: lmforge vs llama.cpp (llama-cpp-python) on the same weights.

Two shapes with random weights (seed 0, rounded to float16 so that every file holds the same values):
- llama-100m: Llama-shaped, 12 layers x 768, 12 heads, SwiGLU 2048, vocab 32000, untied head (134M parameters,
  85M of them in the layers);
- qwen-0.5b: Qwen2.5-0.5B's dimensions (24 layers x 896, 14 query / 2 key-value heads, SwiGLU 4864, vocab 151936,
  tied embeddings, RoPE base 1e6: 494M parameters) in lmforge's Llama architecture: no q/k/v biases until the
  Qwen family lands in lmforge.config (their cost is nil next to the weights').

lmforge exports each model as an F16 GGUF (lmforge.interop.gguf) and llama.cpp quantizes its own files from it with
its own quantizer (`llama_cpp.llama_model_quantize`, pure: every matrix, the token embedding included, in the
type). Precision pairs: fp32/F32, bf16/BF16, int8/Q8_0, int4/Q4_0. lmforge's side is the model as `lmforge
generate` runs it (`prepare_for_decoding`: the fused C++ decode step; prompts through oneDNN's GEMM); its int4 is
Q4_0 itself, so the int4 pair holds the same bytes in every matrix (llama.cpp's token embedding aside, which
lmforge keeps float32 since a lookup reads one row).

Per case, in this one process, the two libraries interleaved (lmforge, llama.cpp, lmforge, ...), 2 threads each:
- decode: a 32-token prompt, then 128 greedy tokens (127 single-token steps); tok/s = 128 / wall time of it all;
- prefill: a 512-token prompt in one batch, logits of its last token; tok/s = 512 / wall time;
the median of --repeats runs each. llama.cpp's loop is the library's own eval / argmax of the last logits.
Alongside, what bounds each side: the bytes of weights a decode step reads and the GB/s that implies, one fused
step's time against a token's share of the whole loop (`lmforge_step_ms`), and prefill's GFLOP/s against the
CPU's GEMM rate measured at the start (torch through oneDNN, float32 and bfloat16, 512 x 896 x 4864).

Prints a JSON line for the machine, one per case with shape, precision, lmforge_decode_tok_s,
llamacpp_decode_tok_s, decode_ratio, lmforge_prefill_tok_s, llamacpp_prefill_tok_s, prefill_ratio (and the
bounds), then a summary line with min_decode_ratio and min_prefill_ratio.

    flock /tmp/lmforge-bench.lock python bench/decode_vs_llamacpp.py
    python bench/decode_vs_llamacpp.py --shapes llama-100m --precisions int4 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.generate import generate, prefill
from lmforge.infer.packed import gemm
from lmforge.infer.quantize import quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, block_size=1024)
SHAPES = {
    "llama-100m": dict(
        _LLAMA, n_layer=12, n_head=12, n_embd=768, intermediate_size=2048, vocab_size=32000, tie_embeddings=False
    ),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (less the q/k/v biases)
    "qwen-0.5b": dict(
        _LLAMA,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        n_embd=896,
        intermediate_size=4864,
        vocab_size=151936,
        tie_embeddings=True,
        rope_base=1000000.0,
        norm_eps=1e-6,
    ),
}
PRECISIONS = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # lmforge -> llama.cpp
PROMPT, NEW_TOKENS, PREFILL = 32, 128, 512


@contextlib.contextmanager
def quiet():
    """Silence llama.cpp's C-level logging (it writes to the process's stdout and stderr directly)."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1), os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def build(shape: str) -> Transformer:
    """The shape with random weights, rounded to float16 (the F16 GGUF then holds exactly lmforge's values)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name=shape, **SHAPES[shape])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def llama_cpp_files(model: Transformer, shape: str, cache: Path) -> dict[str, Path]:
    """F16 GGUF exported by lmforge, and llama.cpp's own F32 / BF16 / Q8_0 / Q4_0 quantizations of it."""
    import llama_cpp

    from lmforge.interop.gguf import export_gguf

    cache.mkdir(parents=True, exist_ok=True)
    f16 = cache / f"{shape}-F16.gguf"
    if not f16.exists():
        export_gguf(model, None, f16, "f16")
    files = {}
    for kind in PRECISIONS.values():
        out = cache / f"{shape}-{kind}.gguf"
        if not out.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if kind == "F32" else f"LLAMA_FTYPE_MOSTLY_{kind}")
            params.nthread, params.pure = 2, True
            tmp = out.with_suffix(".tmp")
            with quiet():
                rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {kind} failed with {rc}")
            tmp.rename(out)
        files[kind] = out
    return files


def lmforge_variant(model: Transformer, precision: str) -> Transformer:
    import copy

    net = copy.deepcopy(model)
    if precision == "bf16":
        net = net.to(torch.bfloat16)
    elif precision in ("int8", "int4"):
        quantize_model(net, precision)
    return prepare_for_decoding(net)


def decode_weight_bytes(net: Transformer) -> int:
    """Bytes of weights one decode step reads: every linear layer's weights, scales and biases (the head included;
    an embedding lookup reads one row and is left out)."""
    return sum(
        t.numel() * t.element_size()
        for m in net.modules()
        if hasattr(m, "in_features")
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
    )


def prefill_flops(c: ModelConfig, n: int) -> float:
    """Multiply-adds x 2 of a prompt of n tokens: the layers' matrices on every token, attention's two products
    over the causal triangle, the head on the last token."""
    per_token = c.n_layer * (c.n_embd * c.qkv_dim + c.n_embd * c.n_embd + 3 * c.n_embd * c.intermediate_size)
    attention = c.n_layer * 2 * c.n_embd * n * (n + 1) / 2
    return 2 * (per_token * n + attention + c.n_embd * c.vocab_size)


def gemm_rate() -> dict[str, float]:
    """GFLOP/s of torch's GEMM through oneDNN (lmforge.infer.packed.gemm) on 512 x 896 x 4864, best of 10."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(PREFILL, 896).to(dtype), torch.randn(4864, 896).to(dtype)
        best = min(_timed(lambda: gemm(x, w)) for _ in range(12))
        out[str(dtype).split(".")[1]] = round(2 * PREFILL * 896 * 4864 / best / 1e9, 1)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(shape: str, precision: str, model: Transformer, gguf_file: Path, repeats: int) -> dict:
    import llama_cpp

    net = lmforge_variant(model, precision)
    with quiet():
        llm = llama_cpp.Llama(
            str(gguf_file),
            n_ctx=PREFILL + 8,
            n_batch=PREFILL,
            n_ubatch=PREFILL,
            n_threads=2,
            n_threads_batch=2,
            verbose=False,
        )
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, model.config.vocab_size, (PREFILL,), generator=g).tolist()
    short = long[:PROMPT]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

    def ours_decode():
        return generate(net, [short], params)[0].tokens

    def ours_prefill():
        with torch.inference_mode():
            prefill(net, [long], PREFILL + 1)

    def theirs_decode():
        llm.reset()
        llm.eval(short)
        tokens = []
        for step in range(NEW_TOKENS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if step + 1 < NEW_TOKENS:
                llm.eval([tokens[-1]])
        return tokens

    def theirs_prefill():
        llm.reset()
        llm.eval(long)

    fns = {
        "ours_decode": ours_decode,
        "theirs_decode": theirs_decode,
        "ours_prefill": ours_prefill,
        "theirs_prefill": theirs_prefill,
    }
    ours_decode(), theirs_decode(), ours_prefill(), theirs_prefill()  # warm-up: allocators, caches, kernels
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):  # interleaved: a load change on the shared machine hits both sides alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in times.items()}
    step_ms = fused_step_ms(net, short) if decode_path(net) == "fused" else None
    weight_bytes = decode_weight_bytes(net)
    flops = prefill_flops(model.config, PREFILL)
    case = {
        "shape": shape,
        "precision": precision,
        "llamacpp_type": gguf_file.stem.split("-")[-1],
        "lmforge_decode_tok_s": round(NEW_TOKENS / t["ours_decode"], 1),
        "llamacpp_decode_tok_s": round(NEW_TOKENS / t["theirs_decode"], 1),
        "decode_ratio": round(t["theirs_decode"] / t["ours_decode"], 3),
        "lmforge_prefill_tok_s": round(PREFILL / t["ours_prefill"], 1),
        "llamacpp_prefill_tok_s": round(PREFILL / t["theirs_prefill"], 1),
        "prefill_ratio": round(t["theirs_prefill"] / t["ours_prefill"], 3),
        "decode_path": decode_path(net),
        "lmforge_weight_mb_per_token": round(weight_bytes / 1e6, 1),
        "lmforge_decode_gb_s": round(weight_bytes * NEW_TOKENS / t["ours_decode"] / 1e9, 1),
        "llamacpp_file_mb": round(os.path.getsize(gguf_file) / 1e6, 1),
        "lmforge_step_ms": step_ms,
        "lmforge_ms_per_token": round(1e3 * t["ours_decode"] / NEW_TOKENS, 2),
        "lmforge_prefill_gflop_s": round(flops / t["ours_prefill"] / 1e9, 1),
        "llamacpp_prefill_gflop_s": round(flops / t["theirs_prefill"] / 1e9, 1),
        "same_greedy_tokens": sum(a == b for a, b in zip(outs["ours_decode"], outs["theirs_decode"])),
        "repeats": repeats,
    }
    llm.close()  # its context and weights now, before the next case's
    gc.collect()
    return case


def fused_step_ms(net: Transformer, prompt: list[int]) -> float:
    """Median ms of one fused decode step (batch 1, about 100 tokens in the cache): the kernel's share of a token."""
    with torch.inference_mode():
        _, cache = prefill(net, [prompt], PROMPT + 80)
        token = torch.tensor([1])
        times = []
        for _ in range(64):
            t0 = time.perf_counter()
            net.fused_decoder(token, cache)
            times.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(times), 3)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case and side (median)")
    ap.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "lmforge" / "bench-llamacpp"),
        help="where the GGUF files are kept between runs",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    print(
        json.dumps(
            {
                "cpu": cpu,
                "capability": torch.backends.cpu.get_cpu_capability(),
                "threads": 2,
                "torch": torch.__version__,
                "gemm_gflop_s": gemm_rate(),
            }
        ),
        flush=True,
    )
    cases = []
    for shape in args.shapes:
        model = build(shape)
        files = llama_cpp_files(model, shape, Path(args.cache))
        for precision in args.precisions:
            case = run_case(shape, precision, model, files[PRECISIONS[precision]], args.repeats)
            cases.append(case)
            print(json.dumps(case), flush=True)
        del model
        gc.collect()
    print(
        json.dumps(
            {
                "summary": True,
                "cases": len(cases),
                "min_decode_ratio": min(c["decode_ratio"] for c in cases),
                "min_prefill_ratio": min(c["prefill_ratio"] for c in cases),
                "decode_ratio": {f"{c['shape']}/{c['precision']}": c["decode_ratio"] for c in cases},
                "prefill_ratio": {f"{c['shape']}/{c['precision']}": c["prefill_ratio"] for c in cases},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
