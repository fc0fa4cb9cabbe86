"""GGUF metadata -> lmforge's ModelConfig: one `Arch` row per llama.cpp architecture (lmforge.interop.gguf_import
reads the tensors).

Each row holds the ModelConfig fields every model of the architecture has and its named pieces, as llama.cpp's
convert_hf_to_gguf.py model classes do: q/k rows permuted for adjacent-pair RoPE (llama), fused qkv (gpt2, phi3),
fused gate_up (phi3), a fixed local:global window pattern (gemma2: 2, gemma3: 6), a fixed local RoPE base
(gemma3: 10000), a fixed score scale (Gemma: head_dim^-1/2). The sizes come from `{arch}.block_count`,
`.embedding_length`, `.feed_forward_length`, `.attention.head_count(_kv)`, `.attention.key_length`,
`.rope.dimension_count`, `.rope.freq_base`, `.attention.layer_norm_(rms_)epsilon`, `.context_length`,
`.attention.sliding_window`, the soft-caps and `.rope.scaling.*`; the vocabulary size from token_embd's rows; a
tied head from a missing (or identical) `output` tensor. A RoPE per-frequency divisor tensor (Llama 3's rope_freqs,
Phi-3's rope_factors_short/long) becomes lmforge's "longrope" scaling, which divides the base frequencies the same
way. What is not implemented is refused with a GGUFImportError naming the key and its value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


class GGUFImportError(LmforgeError):
    """A GGUF file lmforge cannot run as llama.cpp would; the message names the key or tensor and its value."""


# ------------------------------------------------------------------------------------------ architectures


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture in lmforge's terms (as convert_hf_to_gguf.py's model classes, inverted)."""

    model_type: str  # the Hugging Face family it is (config.extra["model_type"]; export back goes there)
    fixed: dict  # ModelConfig fields every model of the architecture has
    interleaved_rope: bool = False  # q/k rows in adjacent-pair RoPE order (llama): permuted back to half-split
    fused_qkv: bool = False  # attn_qkv holds [q; k; v] rows (gpt2, phi3)
    fused_gate_up: bool = False  # ffn_up holds [gate; up] rows (phi3)
    window_pattern: int | None = None  # every n-th layer global, the others windowed (llama.cpp's gemma2/3)
    local_base: float | None = None  # RoPE base of the windowed layers, fixed by llama.cpp (gemma3)
    gemma_scale: bool = False  # scores scaled by head_dim^-1/2 (llama.cpp's fixed query_pre_attn_scalar)
    uses_window: bool = False  # whether llama.cpp applies `.attention.sliding_window` (else it is ignored)
    attn_softcap: bool = False  # whether it soft-caps scores by `.attn_logit_softcapping` (gemma2; not gemma3)


_ROPE = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False)
_GEMMA = dict(_ROPE, mlp="geglu_tanh", norm_placement="sandwich", embed_scale=True)
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", _ROPE, interleaved_rope=True),
    "qwen2": Arch("qwen2", dict(_ROPE, qkv_bias=True)),
    "qwen3": Arch("qwen3", dict(_ROPE, qk_norm="head")),
    "phi3": Arch("phi3", _ROPE, fused_qkv=True, fused_gate_up=True),
    "gemma2": Arch("gemma2", _GEMMA, window_pattern=2, gemma_scale=True, uses_window=True, attn_softcap=True),
    "gemma3": Arch(
        "gemma3_text",
        dict(_GEMMA, qk_norm="head"),
        window_pattern=6,
        local_base=10000.0,
        gemma_scale=True,
        uses_window=True,
    ),
    "olmo2": Arch("olmo2", dict(_ROPE, norm_placement="output", qk_norm="proj")),
    "gpt2": Arch("gpt2", dict(norm="layernorm", mlp="gelu_tanh", pos="learned", bias=True), fused_qkv=True),
}
ROPE_FACTORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")


# ------------------------------------------------------------------------------------------------ reading


class Metadata:
    """A GGUF file's key-value metadata, read by name with the architecture prefix filled in."""

    def __init__(self, reader, arch: str):
        self.fields, self.arch = reader.fields, arch

    def get(self, key: str, default=None):
        f = self.fields.get(key.replace("{arch}", self.arch))
        return default if f is None else f.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFImportError(
                f"the GGUF file has no {key.replace('{arch}', self.arch)!r}; it is needed for a {self.arch} model",
                param=key.replace("{arch}", self.arch),
            )
        return value

    def scalar(self, key: str, default=None):
        """A per-model number; a per-layer list must hold one value (lmforge's layers are alike)."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                name = key.replace("{arch}", self.arch)
                raise GGUFImportError(f"{name}={value}: layers of different shapes are not supported", param=name)
            value = value[0]
        return value


def config_from_gguf(meta: Metadata, tensors: dict, name: str) -> ModelConfig:
    """The ModelConfig of a GGUF file's metadata (and the few facts only its tensors hold)."""
    a = ARCHS[meta.arch]
    n_embd, n_head = meta.scalar("{arch}.embedding_length"), meta.scalar("{arch}.attention.head_count")
    if n_embd is None or n_head is None:
        meta.need("{arch}.embedding_length"), meta.need("{arch}.attention.head_count")
    head_dim = meta.scalar("{arch}.attention.key_length") or n_embd // n_head
    value_dim = meta.scalar("{arch}.attention.value_length") or head_dim
    if value_dim != head_dim:
        raise GGUFImportError(
            f"{meta.arch}.attention.value_length={value_dim} differs from key_length={head_dim}",
            param=f"{meta.arch}.attention.value_length",
        )
    emb = tensors["token_embd.weight"]
    output = tensors.get("output.weight")
    tied = output is None or (output.tensor_type == emb.tensor_type and np.array_equal(output.data, emb.data))
    eps_key = (
        "{arch}.attention.layer_norm_epsilon"
        if a.fixed["norm"] == "layernorm"
        else "{arch}.attention.layer_norm_rms_epsilon"
    )
    fields = dict(
        a.fixed,
        name=name,
        vocab_size=int(emb.shape[1]),
        block_size=meta.scalar("{arch}.context_length", 2048),
        n_layer=meta.need("{arch}.block_count"),
        n_head=n_head,
        n_kv_head=meta.scalar("{arch}.attention.head_count_kv") or n_head,
        n_embd=n_embd,
        intermediate_size=meta.scalar("{arch}.feed_forward_length"),
        norm_eps=float(meta.need(eps_key)),
        tie_embeddings=tied,
        head_size=head_dim if head_dim * n_head != n_embd else None,
        extra={"imported_from": "gguf", "model_type": a.model_type},
    )
    if a.fixed["pos"] == "rope":
        fields |= _rope_fields(meta, tensors, head_dim, fields["block_size"])
    fields |= _attention_fields(meta, a, fields["n_layer"], head_dim)
    return ModelConfig(**fields)


def _rope_fields(meta: Metadata, tensors: dict, head_dim: int, context: int) -> dict:
    rotary = meta.scalar("{arch}.rope.dimension_count") or head_dim
    fields = {
        "rope_base": float(meta.scalar("{arch}.rope.freq_base", 10000.0)),
        "rope_dim": rotary if rotary != head_dim else None,
    }
    kind = meta.get("{arch}.rope.scaling.type", "none")
    original = meta.get("{arch}.rope.scaling.original_context_length")
    factor = meta.get("{arch}.rope.scaling.factor")
    factors = {n: tensors[n].data for n in ROPE_FACTORS if n in tensors}
    if factors:  # per-frequency divisors of the base frequencies: lmforge's longrope does exactly that
        short = factors.get("rope_factors_short.weight", factors.get("rope_freqs.weight"))
        long = factors.get("rope_factors_long.weight", short)
        attn = meta.get("{arch}.rope.scaling.attn_factor")
        fields["rope_scaling"] = {
            "type": "longrope",
            "short_factor": np.asarray(short, np.float64).tolist(),
            "long_factor": np.asarray(long, np.float64).tolist(),
            "original_context": int(original or context),
            "attention_factor": float(attn) if attn else 1.0,
        }
    elif kind == "linear" and factor:
        fields["rope_scaling"] = {"type": "linear", "factor": float(factor)}
    elif kind == "yarn" and factor:
        fields["rope_scaling"] = {"type": "yarn", "factor": float(factor), "original_context": int(original or context)}
    elif kind not in ("none", "linear", "yarn") or (kind != "none" and not factor):
        key = f"{meta.arch}.rope.scaling.type"
        raise GGUFImportError(
            f"{key}={kind!r} (factor {factor}) is not supported; lmforge reads 'none', 'linear', "
            f"'yarn' and the rope_freqs / rope_factors tensors",
            param=key,
        )
    return fields


def _attention_fields(meta: Metadata, a: Arch, n_layer: int, head_dim: int) -> dict:
    fields: dict = {}
    window = meta.scalar("{arch}.attention.sliding_window")
    if window and a.uses_window:
        fields["sliding_window"] = int(window)
        if a.window_pattern:
            windowed = [i for i in range(n_layer) if (i + 1) % a.window_pattern]
            fields["window_layers"] = windowed if len(windowed) < n_layer else None
    if a.local_base is not None:
        fields["rope_local_base"] = a.local_base
    if a.gemma_scale:
        fields["attn_scale"] = head_dim**-0.5
    keys = {"{arch}.final_logit_softcapping": "logit_softcap"}
    if a.attn_softcap:
        keys["{arch}.attn_logit_softcapping"] = "attn_softcap"
    for key, ours in keys.items():
        value = meta.get(key)
        if value:
            fields[ours] = float(value)
    return fields


__all__ = ["ARCHS", "Arch", "GGUFImportError", "Metadata", "ROPE_FACTORS", "config_from_gguf"]
