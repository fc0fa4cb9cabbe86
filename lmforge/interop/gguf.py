"""GGUF export: an lmforge model and its tokenizer as one llama.cpp GGUF file, for every family llama.cpp has.
(The way back, a GGUF file into lmforge, is lmforge.interop.gguf_import, which inverts each step below.)

The file is written with llama.cpp's own `gguf` Python package (GGUFWriter, its tensor names and keys, its Q8_0
quantizer), so names, metadata keys and block layouts are llama.cpp's by construction.

Architectures (`ARCHS`, as convert_hf_to_gguf.py's classes): GPT-2 -> gpt2; Llama 3.x, SmolLM2, Mistral -> llama;
Qwen2/2.5 -> qwen2 (q/k/v biases); Qwen3 -> qwen3 and OLMo 2 -> olmo2 (q/k norms); Phi-3/4-mini -> phi3 (fused
qkv and gate_up, LongRoPE's factors as tensors); Gemma 2/3 -> gemma2, gemma3 (four norms a layer, already
holding w + 1 as llama.cpp's do; soft-caps and windows as keys). What llama.cpp would compute differently is
refused with the setting named (`gguf_problems`): dynamic NTK scaling, a sliding window where its architecture
has none, Gemma windows, local bases or score scales other than the ones it fixes.

Weights (ours -> llama.cpp):
- llama: our fused `attn.qkv` rows [q; k; v] split into attn_q, attn_k, attn_v; our fused gated `mlp.fc` rows
  [gate; up] into ffn_gate, ffn_up. llama.cpp's "llama" architecture rotates *adjacent* pairs (x[2i], x[2i+1])
  of each head (Meta's and llama2.c's layout), while lmforge rotates pairs (x[i], x[i + hs/2]) (Hugging Face's
  half-split layout). So q and k rows are permuted per head exactly as convert_hf_to_gguf.py's `permute` does for
  Hugging Face weights: half-split row j goes to 2j, row hs/2 + j to 2j + 1. A tied head is left out (llama.cpp
  falls back to token_embd). The other rotary architectures rotate halves as lmforge does: no permutation.
- GPT-2: llama.cpp's "gpt2" architecture keeps q/k/v fused as attn_qkv in our row order; linear weights are
  (out, in) on both sides. The tied head is written as `output` too, as convert_hf_to_gguf.py does. llama.cpp
  computes GELU with the tanh approximation; a model trained with exact (erf) GELU exports with a note.
- Llama 3's RoPE bands are the rope_freqs tensor (divisors of the base frequencies), LongRoPE's factors
  rope_factors_short / rope_factors_long; linear and YaRN scaling are keys.

Tensor types: "f32", "f16", "q8_0" or "q4_0" for 2-D weights; 1-D tensors (norms, biases) stay float32, as
llama.cpp's converter keeps them. Q8_0 and Q4_0 pack rows in blocks of 32; a weight whose row length is not a
multiple of 32 (e.g. stories260K's 172-wide ffn_down) is written as f16 instead, as llama-quantize falls back.

Quantized models (lmforge.infer.quantize) export too, by default as their own type. An int4 model's 4-bit weights
are Q4_0's blocks already (lmforge's int4 *is* Q4_0: the same scale, values and nibble order, kept in two tensors):
they are written unchanged, so a q4_0 export is lossless, and its rows survive the q/k split and RoPE permutation
because every row is whole blocks. int8 weights (one scale per row) are dequantized exactly and re-blocked into
Q8_0 (one scale per 32), which may move a value by a rounding step. Other requested types dequantize every
quantized weight exactly first. The embeddings, which lmforge keeps float in a quantized model, are written f16
(f32 if asked), not quantized, so that llama.cpp looks up the rows lmforge does.

Tokenizers (all metadata llama.cpp's tokenizer needs):
- llama2.c / SentencePiece-style (`Llama2cTokenizer`): tokenizer.ggml.model "llama": pieces with spaces written as
  U+2581, scores, token types (unknown, control, byte, normal), unk/bos/eos ids, add_bos, add_space_prefix.
  The pieces, scores and types are what llama.cpp's own convert-llama2c-to-ggml writes.
- byte-level BPE (`BPETokenizer`, a tokenizer.json): tokenizer.ggml.model "gpt2": tokens in id order, merges,
  token types (special added tokens control), the pre-tokenizer type ("gpt-2" for GPT-2's ByteLevel regex,
  "llama-bpe" for Llama 3's split), bos/eos ids, and the chat template (chat_template.jinja or
  tokenizer_config.json's) if any.
- char/word tokenizers (or none) have no GGUF form: tokenizer.ggml.model "none" (llama.cpp runs on token ids).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.checkpoint import model_tensors
from lmforge.fsutil import atomic_path
from lmforge.interop.hf import UnsupportedModelError, hf_family
from lmforge.model import Transformer
from lmforge.tokenizer import BPETokenizer, Llama2cTokenizer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]
OWN_TYPE = {None: "f16", "int8": "q8_0", "int4": "q4_0"}  # a model's quantization -> its default GGUF type
Q4_0_BLOCK_BYTES = 18  # float16 d, then 16 bytes of nibbles
BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece, as llama.cpp reads it
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, which llama.cpp's "llama" tokenizer expects in pieces
# Llama 3's pre-tokenizer regex (tokenizer.json Split pattern) -> llama.cpp's "llama-bpe" pre-tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/2.5/3's (single digits): transformers' tokenization_qwen2.PRETOKENIZE_REGEX -> llama.cpp's "qwen2".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}  # tokenizer.json Split regex -> llama.cpp pre-tokenizer


@dataclass
class GGUFExport:
    """What `export_gguf` wrote: the file, its architecture and tokenizer model, and each tensor's type."""

    path: Path
    arch: str
    tokenizer_model: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _gguf():
    import gguf  # llama.cpp's package; imported when used so that `lmforge --help` stays fast

    return gguf


# --------------------------------------------------------------------------------------------- weights


def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q or k rows (n_heads * hs, C) per head from half-split to adjacent-pair RoPE order.

    convert_hf_to_gguf.py's `permute`: within a head, row j -> 2j and row hs/2 + j -> 2j + 1. The inverse of
    lmforge.interop.llama2c.interleaved_to_half_split.
    """
    out, C = w.shape
    hs = out // n_heads
    return w.reshape(n_heads, 2, hs // 2, C).transpose(1, 2).reshape(out, C)


# llama.cpp's architecture for each Hugging Face family lmforge exports (convert_hf_to_gguf.py's classes). Only
# "llama" rotates adjacent pairs (q and k rows permuted); the others rotate halves, as lmforge does ("NEOX").
ARCHS = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "olmo2": "olmo2",
}
# llama.cpp architectures whose sliding windows it applies (its phi3 reads the key but attends over the whole
# context: checked against llama-cpp-python 0.3.36, tests/test_families.py).
SWA_ARCHS = ("gemma2", "gemma3")


def gguf_problems(config, arch: str) -> list[str]:
    """What llama.cpp's `arch` would compute differently from this model (it has no key for it)."""
    c, problems = config, []
    scaling = (c.rope_scaling or {}).get("type")
    if scaling == "dynamic":
        problems.append("rope_scaling 'dynamic' (llama.cpp has no dynamic NTK scaling)")
    if c.sliding_window is not None and arch not in SWA_ARCHS:
        problems.append(f"sliding_window={c.sliding_window} (llama.cpp's {arch} attends over the whole context)")
    if arch in ("gemma2", "gemma3"):
        pattern = 2 if arch == "gemma2" else 6  # llama.cpp's fixed local:global pattern
        fixed = [i for i in range(c.n_layer) if (i + 1) % pattern]
        if c.sliding_window is not None and (c.window_layers or list(range(c.n_layer))) != fixed:
            problems.append(f"window_layers={c.window_layers} (llama.cpp's {arch} windows layers {fixed})")
        if c.attn_scale is not None and abs(c.attn_scale - c.head_dim**-0.5) > 1e-7 * c.attn_scale:
            problems.append(
                f"attn_scale={c.attn_scale:.6g} (llama.cpp's {arch} scales scores by "
                f"head_dim^-1/2 = {c.head_dim**-0.5:.6g}: query_pre_attn_scalar must be head_dim)"
            )
    if arch == "gemma3" and c.rope_local_base not in (None, 10000.0):
        problems.append(f"rope_local_base={c.rope_local_base} (llama.cpp's gemma3 local layers turn at 10000)")
    return problems


def gguf_arch(model: Transformer) -> str:
    """llama.cpp's architecture name for the model; UnsupportedModelError names what llama.cpp cannot reproduce."""
    family = hf_family(dataclasses.replace(model.config, quantization=None))  # quantized export too
    if family not in ARCHS:
        raise UnsupportedModelError(f"llama.cpp has no architecture for lmforge's {family!r} export")
    arch = ARCHS[family]
    problems = gguf_problems(model.config, arch)
    if problems:
        raise UnsupportedModelError(
            f"GGUF export as llama.cpp's {arch!r} would change this model: {'; '.join(problems)}"
        )
    return arch


def rope_factor_tensors(config) -> dict[str, torch.Tensor]:
    """Per-frequency divisors llama.cpp applies to the base frequencies: Llama 3's bands (rope_freqs) as
    convert_hf_to_gguf.py writes them, and LongRoPE's short and long factors (rope_factors_short/long)."""
    from lmforge.rope import rope_frequencies

    scaling = config.rope_scaling or {}
    if scaling.get("type") == "llama3":
        base, _ = rope_frequencies(config, config.rope_base, None)
        scaled, _ = rope_frequencies(config, config.rope_base, scaling)
        return {"rope_freqs": base / scaled}
    if scaling.get("type") == "longrope":
        return {
            f"rope_factors_{k}": torch.tensor(scaling[f"{k}_factor"], dtype=torch.float32) for k in ("short", "long")
        }
    return {}


def q4_0_rows(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """lmforge int4 (packed (out, in/2) uint8, scales (out, in/32) float16) -> GGUF Q4_0 rows (out, in/32 * 18)
    uint8: each block's float16 d, then its 16 bytes of nibbles, as llama.cpp lays them out."""
    out = packed.shape[0]
    d = scales.contiguous().view(torch.uint8).reshape(out, -1, 2)
    return torch.cat([d, packed.reshape(out, -1, 16)], dim=-1).reshape(out, -1)


def int4_from_q4_0_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 rows (out, blocks * 18) uint8 -> lmforge int4 (packed (out, blocks * 16), scales (out, blocks))."""
    blocks = rows.reshape(rows.shape[0], -1, Q4_0_BLOCK_BYTES)
    scales = blocks[..., :2].contiguous().view(torch.float16).reshape(rows.shape[0], -1)
    return blocks[..., 2:].reshape(rows.shape[0], -1).contiguous(), scales


def _weights(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict for export, float32, except a quantized model's weights (lmforge.infer.quantize's layouts,
    known by their `scales`): 4-bit ones (uint8) as Q4_0 rows, int8 ones (one scale per row) dequantized."""
    sd = {k: v.detach().cpu() for k, v in model_tensors(model).items()}
    for key in [k for k in sd if k.endswith(".scales")]:
        scales, name = sd.pop(key), key[: -len("scales")] + "weight"
        weight = sd[name]
        sd[name] = (
            q4_0_rows(weight, scales) if weight.dtype == torch.uint8 else weight.float() * scales.float()[:, None]
        )
    return {k: v if v.dtype == torch.uint8 else v.float() for k, v in sd.items()}


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, in llama.cpp's layout ((out, in) for matrices): float32, or
    Q4_0 rows (uint8) for an int4 model's 4-bit weights."""
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    c = model.config
    arch = gguf_arch(model)
    sd = _weights(model)
    out: dict[str, torch.Tensor] = {}

    def put(tensor, key, suffix="weight", bid=None):
        out[f"{names[tensor].format(bid=bid)}.{suffix}"] = key if isinstance(key, torch.Tensor) else sd[key]

    put(T.TOKEN_EMBD, "tok_emb.weight")
    if arch == "gpt2":
        put(T.POS_EMBD, "pos_emb.weight")
    put(T.OUTPUT_NORM, "norm_f.weight")
    if arch == "gpt2":
        put(T.OUTPUT_NORM, "norm_f.bias", "bias")
        # tied: convert_hf_to_gguf.py writes it out for GPT-2; a quantized head is a copy of its own
        put(T.OUTPUT, "lm_head.weight" if "lm_head.weight" in sd else "tok_emb.weight")
    elif "lm_head.weight" in sd:  # untied, or tied and quantized (the head got its own copy)
        put(T.OUTPUT, "lm_head.weight")
    out |= {f"{k}.weight": v for k, v in rope_factor_tensors(c).items()}
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        if arch == "gpt2":
            parts = {
                T.ATTN_NORM: "norm1",
                T.ATTN_QKV: "attn.qkv",
                T.ATTN_OUT: "attn.proj",
                T.FFN_NORM: "norm2",
                T.FFN_UP: "mlp.fc",
                T.FFN_DOWN: "mlp.proj",
            }
            for tensor, ours in parts.items():
                put(tensor, f"{p}{ours}.weight", bid=i)
                put(tensor, f"{p}{ours}.bias", "bias", bid=i)
            continue
        norms = {
            T.ATTN_NORM: "norm1",
            T.ATTN_POST_NORM: "post_norm1",
            T.FFN_NORM: "norm2",
            T.FFN_POST_NORM: "post_norm2",
            T.ATTN_Q_NORM: "attn.q_norm",
            T.ATTN_K_NORM: "attn.k_norm",
        }
        for tensor, ours in norms.items():  # the ones this model has (Gemma's already hold w + 1, as llama.cpp's)
            if f"{p}{ours}.weight" in sd:
                put(tensor, f"{p}{ours}.weight", bid=i)
        for part in ("weight", "bias"):
            key = f"{p}attn.qkv.{part}"
            if key not in sd:
                continue
            if arch == "phi3":  # llama.cpp's Phi-3 keeps [q; k; v] fused
                put(T.ATTN_QKV, key, part, bid=i)
                continue
            q, k, v = sd[key].split([c.q_dim, c.kv_dim, c.kv_dim])
            if arch == "llama":  # adjacent-pair RoPE: q and k rows permuted per head
                q, k = half_split_to_interleaved(q, c.n_head), half_split_to_interleaved(k, c.n_kv_head)
            put(T.ATTN_Q, q, part, bid=i), put(T.ATTN_K, k, part, bid=i), put(T.ATTN_V, v, part, bid=i)
        put(T.ATTN_OUT, p + "attn.proj.weight", bid=i)
        if arch == "phi3":  # and [gate; up] fused in ffn_up
            put(T.FFN_UP, p + "mlp.fc.weight", bid=i)
        else:
            gate, up = sd[p + "mlp.fc.weight"].chunk(2)
            put(T.FFN_GATE, gate, bid=i), put(T.FFN_UP, up, bid=i)
        put(T.FFN_DOWN, p + "mlp.proj.weight", bid=i)
    return {k: v.contiguous() for k, v in out.items()}


def encode_tensor(array: np.ndarray, ftype: str):
    """(data, raw_dtype, type name) for GGUFWriter.add_tensor: 1-D stays f32; q8_0 and q4_0 fall back to f16 on
    rows not a multiple of 32. A uint8 array is Q4_0 rows: written as they are for q4_0, else dequantized first."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if array.dtype == np.uint8:
        if ftype == "q4_0":
            return np.ascontiguousarray(array), Q.Q4_0, "q4_0"
        array = gguf.quants.dequantize(array, Q.Q4_0)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or ftype == "f32":
        return array, None, "f32"
    kind = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}.get(ftype)
    if kind is not None and array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        return gguf.quants.quantize(array, kind), kind, ftype
    return array.astype(np.float16), None, "f16"


# ------------------------------------------------------------------------------------------ metadata


def add_hparams(writer, model: Transformer, arch: str, name: str) -> None:
    """The architecture hyperparameters llama.cpp reads for `arch` (convert_hf_to_gguf.py's set_gguf_parameters)."""
    gguf = _gguf()
    c = model.config
    writer.add_name(name)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
        return
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.rotary_dim)
    writer.add_rope_freq_base(c.rope_base)
    if c.head_size is not None:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    scaling = c.rope_scaling or {}
    kind = scaling.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_context"])
    elif kind == "longrope":
        ratio = scaling.get("factor") or c.block_size / scaling["original_context"]
        factor = scaling.get("attention_factor") or (
            1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(scaling["original_context"]))
        )
        writer.add_rope_scaling_attn_factors(factor)
        writer.add_rope_scaling_orig_ctx_len(scaling["original_context"])
    if c.sliding_window is not None:
        writer.add_sliding_window(c.sliding_window)
    if c.attn_softcap is not None:
        writer.add_attn_logit_softcapping(c.attn_softcap)
    if c.logit_softcap is not None:
        writer.add_final_logit_softcapping(c.logit_softcap)


def _padded(tokens: list[str], types: list[int], vocab_size: int, what: str) -> tuple[list[str], list[int]]:
    """Fill a vocabulary up to the model's embedding rows with unused "[PAD{i}]" tokens (convert_hf_to_gguf.py)."""
    gguf = _gguf()
    if len(tokens) > vocab_size:
        raise UnsupportedModelError(
            f"the {what} tokenizer has {len(tokens)} tokens but the model only "
            f"{vocab_size} embedding rows; they do not belong together"
        )
    extra = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in extra], types + [int(gguf.TokenType.UNUSED)] * len(extra)


def add_llama2c_tokenizer(writer, tok: Llama2cTokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.model "llama": llama2.c's vocabulary as convert-llama2c-to-ggml writes it."""
    gguf = _gguf()
    TT = gguf.TokenType
    tokens, types = [], []
    for i, piece in enumerate(tok.pieces):
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsupportedModelError(
                f"llama2.c token {i} ({piece!r}) is not valid UTF-8; GGUF stores pieces as text"
            ) from None
        if i == 0:
            text, kind = "<unk>", TT.UNKNOWN
        elif i == tok.bos_id:
            text, kind = "<s>", TT.CONTROL
        elif i == tok.eos_id:
            text, kind = "</s>", TT.CONTROL
        elif not text:
            kind = TT.CONTROL
        elif BYTE_PIECE.fullmatch(piece):
            kind = TT.BYTE
        else:
            kind = TT.NORMAL
        tokens.append(text.replace(" ", SPIECE_SPACE))
        types.append(int(kind))
    tokens, types = _padded(tokens, types, vocab_size, "llama2.c")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(tok.scores + [-1000.0] * (vocab_size - tok.vocab_size))
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(True)  # llama2.c's encoder starts every prompt with BOS
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)  # and its " " dummy prefix


def bpe_pre_tokenizer(spec: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json "pre_tokenizer", or UnsupportedModelError."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"  # GPT-2's regex (lmforge's own trained BPE, GPT-2's tokenizer.json)
    if spec and spec.get("type") == "Sequence":
        steps = spec.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        split = SPLITS.get(steps[0].get("pattern", {}).get("Regex")) if steps else None
        if kinds == ["Split", "ByteLevel"] and split and not steps[1].get("use_regex", True):
            return split
    raise UnsupportedModelError(
        f"the tokenizer.json pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp "
        f"equivalent lmforge knows (it maps GPT-2's ByteLevel regex to 'gpt-2', "
        f"Llama 3's split to 'llama-bpe' and Qwen2's to 'qwen2')"
    )


def add_bpe_tokenizer(writer, tok: BPETokenizer, vocab_size: int, chat_template: str | None = None) -> None:
    """tokenizer.ggml.model "gpt2": byte-level BPE tokens, merges, types and pre-tokenizer from tokenizer.json."""
    gguf = _gguf()
    spec = json.loads(tok.tok.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        what = f"{model.get('type')} model" + (
            " with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else ""
        )
        raise UnsupportedModelError(
            f"tokenizer.json holds a {what}; GGUF export takes byte-level BPE (GPT-2 style) or a llama2.c tokenizer"
        )
    pre = bpe_pre_tokenizer(spec.get("pre_tokenizer"))
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    n = max(by_id) + 1 if by_id else 0
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise UnsupportedModelError(f"tokenizer.json has no token with id {missing[0]}; GGUF needs ids 0..{n - 1}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    TT = gguf.TokenType
    types = [
        int(TT.NORMAL if i not in added else TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        for i in range(n)
    ]
    tokens, types = _padded([by_id[i] for i in range(n)], types, vocab_size, "BPE")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos = tok.bos_id if tok.bos_id is not None else tok.eos_id  # GPT-2 uses <|endoftext|> for both
    if bos is not None:
        writer.add_bos_token_id(bos)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(False)  # lmforge's BPE encode adds no special tokens
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)


def chat_template_of(extras: dict[str, bytes] | None) -> str | None:
    """The chat template kept with the model: chat_template.jinja (which wins, as in transformers), else the
    chat_template string of tokenizer_config.json, if either is there."""
    jinja = (extras or {}).get("chat_template.jinja")
    if jinja:
        try:
            return jinja.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raw = (extras or {}).get("tokenizer_config.json")
    if not raw:
        return None
    try:
        template = json.loads(raw).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return template if isinstance(template, str) else None


# -------------------------------------------------------------------------------------------- export


def export_gguf(
    model: Transformer,
    tokenizer,
    path: str | os.PathLike,
    ftype: str | None = None,
    extras: dict[str, bytes] | None = None,
    name: str | None = None,
) -> GGUFExport:
    """Write `model` (Llama or GPT-2 architecture) and `tokenizer` to the GGUF file `path`, atomically.

    `ftype` is the type of 2-D weights: "f32", "f16", "q8_0" or "q4_0"; None is the model's own (f16 for a float
    model, q8_0 for int8, q4_0 for int4). `extras` are files kept with the model (a tokenizer_config.json's chat
    template is embedded). Raises UnsupportedModelError for another architecture or a tokenizer that does not fit,
    ValueError for an unknown type.
    """
    gguf = _gguf()
    ftype = OWN_TYPE.get(model.config.quantization, "f16") if ftype is None else ftype
    if ftype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF tensor type {ftype!r}; choose one of {', '.join(GGUF_TYPES)}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"GGUF output {path} is a folder; give a file path such as {path / 'model.gguf'}")
    arch = gguf_arch(model)
    c = model.config
    result = GGUFExport(path, arch, "none")
    if arch == "gpt2" and c.mlp == "gelu":
        result.notes.append(
            "the model uses exact (erf) GELU; llama.cpp's gpt2 computes the tanh approximation, "
            "so its outputs differ slightly"
        )
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        add_hparams(writer, model, arch, name or c.name)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            }[ftype]
        )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if isinstance(tokenizer, Llama2cTokenizer):
            add_llama2c_tokenizer(writer, tokenizer, c.vocab_size)
            result.tokenizer_model = "llama"
        elif isinstance(tokenizer, BPETokenizer):
            add_bpe_tokenizer(writer, tokenizer, c.vocab_size, chat_template_of(extras))
            result.tokenizer_model = "gpt2"
        else:
            writer.add_tokenizer_model("none")
            kind = getattr(tokenizer, "kind", None)
            result.notes.append(
                f"a {kind} tokenizer has no GGUF form; the file holds no vocabulary (llama.cpp runs it on token ids)"
                if kind
                else "no tokenizer found; the file holds no vocabulary"
            )
        embeddings = {
            f"{gguf.TENSOR_NAMES[e]}.weight" for e in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.POS_EMBD)
        }
        for tensor_name, t in gguf_tensors(model).items():
            own = (
                ftype
                if not (model.config.quantization and tensor_name in embeddings)
                else ("f32" if ftype == "f32" else "f16")
            )  # a quantized model's embeddings are float in lmforge
            data, raw_dtype, kind = encode_tensor(t.numpy(), own)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
            result.tensor_types[tensor_name] = kind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if model.config.quantization == "int8" and ftype == "q8_0":
        result.notes.append(
            "int8 weights (one scale per row) were re-blocked into Q8_0 (one scale per 32 values): "
            "a value may move by one rounding step"
        )
    fell_back = [
        n for n, k in result.tensor_types.items() if ftype in ("q8_0", "q4_0") and k == "f16" and n not in embeddings
    ]
    if fell_back:
        result.notes.append(
            f"{len(fell_back)} weights have rows not a multiple of 32 and are f16, not {ftype}: "
            f"{', '.join(fell_back[:4])}{'...' if len(fell_back) > 4 else ''}"
        )
    return result
