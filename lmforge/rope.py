"""Rotary position embeddings: the tables of cos and sin a model turns its queries and keys by, for plain RoPE and
each scaling an imported family uses, computed as transformers' modeling_rope_utils.py computes them (float32).

References:
- Su et al. 2021, RoFormer (rotary embeddings; Hugging Face's half-split layout: pairs (x[i], x[i + r/2])).
- Chen et al. 2023, "Extending Context Window ... via Positional Interpolation" (linear).
- bloc97 / emozilla 2023, "Dynamically Scaled RoPE" (dynamic NTK).
- Peng et al. 2023, YaRN (NTK-by-parts with an attention factor); Meta's Llama 3.1 frequency bands ("llama3").
- Ding et al. 2024, LongRoPE (Phi-3's short and long per-frequency factors).

A table is (positions, rotary_dim / 2); rotary_dim < head size is partial rotary (Phi-4-mini). The scalings that
depend only on the frequency change the table's values; LongRoPE switches tables with a sequence's length and
dynamic NTK changes with the position itself (see rope_tables).
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ModelConfig


def rope_frequencies(config: ModelConfig, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim / 2,) and the factor cos and sin are multiplied by, for the scalings that do
    not depend on the position (none, linear, llama3, yarn). Float32 throughout, as transformers computes them."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    kind = scaling["type"] if scaling else None
    if kind == "linear":  # positions interpolated: every frequency divided by the factor
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":  # low frequencies divided by the factor, high ones kept, a smooth band between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_context"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < context / high) * ~(wavelen > context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # NTK-by-parts: interpolate the low frequencies, keep the high ones, ramp between
        factor, context = scaling["factor"], scaling["original_context"]

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, float(attention_factor)
    return inv_freq, 1.0


def rope_tables(config: ModelConfig, length: int, which: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, rotary_dim / 2) for positions 0..length-1 (half-split layout, as Hugging Face's).

    which: "global" (every layer, or the full-attention ones), "local" (the sliding-window layers when they have
    their own base: Gemma 3's plain RoPE at rope_local_base), or "long" (LongRoPE's long factors). LongRoPE turns
    a sequence by its short factors while it fits the original context and by its long factors, at every position,
    once it is longer (as transformers does: `Transformer.hidden` picks the table by each row's last position).
    Dynamic NTK depends on the position itself: position p >= original_context turns by frequencies whose base
    grows with p + 1, which is what transformers computes when it decodes token by token (a single call over more
    than original_context tokens there uses the last position's base for all of them; a KV cache that keeps each
    token's rotated key cannot follow that).
    """
    base = config.rope_local_base if which == "local" else config.rope_base
    scaling = None if which == "local" else config.rope_scaling
    kind = scaling["type"] if scaling else None
    positions = torch.arange(length).float()
    if kind == "longrope":
        dim, context = config.rotary_dim, scaling["original_context"]
        ratio = scaling.get("factor") or config.block_size / context
        factor = scaling.get("attention_factor") or (
            1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(context))
        )
        ext = torch.tensor(scaling["long_factor" if which == "long" else "short_factor"], dtype=torch.float32)
        inv_freq = 1.0 / (ext * base ** (torch.arange(0, dim, 2).float() / dim))
    elif kind == "dynamic":
        dim, context, grow = config.rotary_dim, scaling["original_context"], scaling["factor"]
        exponents = torch.arange(0, dim, 2).float() / dim
        seq_len = (positions + 1).clamp(min=context)  # the sequence length each position is computed at
        bases = base * ((grow * seq_len / context) - (grow - 1)) ** (dim / (dim - 2))  # base itself up to context
        late = (torch.arange(length) >= context)[:, None]
        inv_freq, factor = torch.where(late, 1.0 / (bases[:, None] ** exponents), 1.0 / (base**exponents)), 1.0
        angles = positions[:, None] * inv_freq  # (length, rotary_dim / 2), each position its own frequencies
        return angles.cos(), angles.sin()
    else:
        inv_freq, factor = rope_frequencies(config, base, scaling)
    angles = torch.outer(positions, inv_freq)  # (length, rotary_dim / 2)
    return angles.cos() * factor, angles.sin() * factor


def long_rope_switch(config: ModelConfig) -> int | None:
    """LongRoPE's original context C: a sequence turns by the short factors while its last position is below C and
    by the long ones, at every position, from then on; its keys cached before must then be computed again, as
    transformers' Phi-3 generation does (lmforge.infer.generate, lmforge.engine). None for every other model."""
    scaling = config.rope_scaling
    return scaling["original_context"] if scaling and scaling["type"] == "longrope" else None


def long_rope_rows(config: ModelConfig, positions: torch.Tensor, cache=None) -> torch.Tensor | None:
    """Which rows (B or 1,) of positions (B or 1, T) turn by LongRoPE's long factors: the cache's `long_rope` flags
    when it has them (the engine knows each sequence's whole length while it feeds a prompt in chunks), else the
    rows whose last position is past the original context. None for every other model."""
    switch = long_rope_switch(config)
    if switch is None:
        return None
    flags = getattr(cache, "long_rope", None)
    return flags if flags is not None else positions.max(dim=-1).values >= switch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + r/2]) of the first r = 2 * cos.shape[-1] dims of x (B, n, T, hs) by the angles in
    cos/sin (B or 1, 1, T, r/2); dims from r on pass unchanged (partial rotary)."""
    r = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
