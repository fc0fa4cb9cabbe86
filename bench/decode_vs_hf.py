"""Greedy decode speed: lmforge `generate` vs Hugging Face transformers `generate`, same random weights.

For each case (model preset, dtype, batch size) both libraries continue the same random prompts of 32 tokens by
128 greedy tokens; tok/s = batch * new tokens / wall time of the whole call (prefill included), median of a few
repeats, all run side by side in this one process, interleaved. "lmforge" is the model as `lmforge generate`
runs it (`prepare_for_decoding`: the fused C++ decode step of lmforge.infer.fused where supported, else linear
layers packed for oneDNN; `decode_path` says which); "packed" is the oneDNN-packed model alone, "plain" the same
model with PyTorch's default nn.Linear, one module call per operation (--paths leaves them out: each is a copy of
the weights). transformers runs the same weights in the family's own class (GPT2LMHeadModel, Qwen2ForCausalLM,
Gemma3ForCausalLM, ...), through lmforge's Hugging Face export mapping. Prints one JSON line per case:
{"model", "dtype", "batch", "lmforge_tok_s", "hf_tok_s", "ratio", "packed_tok_s", "plain_tok_s", ...}.

    python bench/decode_vs_hf.py            # gpt-14m and gpt2, fp32, batch 1 and 8
    python bench/decode_vs_hf.py --quick    # fewer tokens and repeats
    python bench/decode_vs_hf.py --models qwen2.5-0.5b gemma3-270m --paths lmforge hf   # the imported families
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lmforge.config import ModelConfig
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.generate import generate
from lmforge.infer.packed import pack_linears
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer


def to_hf(model: Transformer):
    """The same weights in the transformers class of the model's family, through lmforge's own Hugging Face export
    mapping (GPT-2 for the gpt-* presets, Llama for llama-*, Qwen2 / Gemma 3 for their shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmforge.interop.hf import convert_lmforge_to_hf, hf_config_from

    settings = hf_config_from(model.config, bos_id=0, eos_id=0)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    hf = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(convert_lmforge_to_hf(model), strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "attn.bias" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


PATHS = ("lmforge", "hf", "packed", "plain")


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) so load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def run_case(
    name: str, dtype: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, paths: tuple[str, ...] = PATHS
) -> dict:
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    model = Transformer(ModelConfig.from_name(name)).eval().to(torch_dtype)
    hf = to_hf(model).to(torch_dtype)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    params = SamplingParams(max_tokens=new_tokens, temperature=0)

    served = prepare_for_decoding(copy.deepcopy(model))  # what `lmforge generate` runs
    packed = pack_linears(copy.deepcopy(model)) if "packed" in paths else None

    def ours(net=served):
        return [c.tokens for c in generate(net, prompts.tolist(), params)]

    def theirs():
        with torch.inference_mode():
            out = hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        return out[:, prompt_len:].tolist()

    fns = {"ours": ours, "packed": lambda: ours(packed), "plain": lambda: ours(model), "hf": theirs}
    fns = {k: f for k, f in fns.items() if {"ours": "lmforge"}.get(k, k) in paths}
    for fn in fns.values():
        fn()  # warm up
    t, outs = interleaved(fns, repeats)
    agree = sum(a == b for a, b in zip(outs["ours"], outs["hf"])) / batch
    n = batch * new_tokens
    case = {
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "lmforge_tok_s": round(n / t["ours"], 1),
        "hf_tok_s": round(n / t["hf"], 1),
        "ratio": round(t["hf"] / t["ours"], 2),
        "decode_path": decode_path(served),
        "packed_tok_s": round(n / t["packed"], 1) if "packed" in t else None,
        "plain_tok_s": round(n / t["plain"], 1) if "plain" in t else None,
        "same_tokens_fraction": agree,
        "same_tokens_as_plain": (outs["plain"] == outs["ours"] == outs["packed"]) if len(t) == 4 else None,
        "params_m": round(model.num_params() / 1e6, 1),
        "threads": torch.get_num_threads(),
    }
    return case


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["gpt-14m", "gpt2"])
    ap.add_argument("--dtypes", nargs="*", default=["float32"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument(
        "--paths",
        nargs="*",
        default=list(PATHS),
        choices=PATHS,
        help="what to time (lmforge and hf at least): packed and plain each hold a copy of the weights",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new_tokens, args.repeats = 32, 1
    for name in args.models:
        for dtype in args.dtypes:
            for batch in args.batches:
                print(
                    json.dumps(
                        run_case(name, dtype, batch, args.prompt_len, args.new_tokens, args.repeats, tuple(args.paths))
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
