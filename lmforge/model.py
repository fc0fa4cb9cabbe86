"""One decoder-only Transformer for every lmforge preset, read top to bottom.

The same code runs the classic PyTorch word_language_model `TransformerModel` (post-norm, sinusoidal positions,
ReLU FFN), GPT-2 (pre-norm LayerNorm, learned positions, GELU, tied embeddings) and Llama (RMSNorm, rotary
positions, SwiGLU, grouped-query attention); `ModelConfig` says which parts to use.

References:
- Vaswani et al. 2017, "Attention Is All You Need" (the classic encoder layer, sinusoidal positions).
- Radford et al. 2019, GPT-2; github.com/karpathy/nanoGPT `model.py`.
- Touvron et al. 2023, Llama 2; Su et al. 2021, RoFormer (rotary embeddings); Ainslie et al. 2023 (GQA).

Shapes: B batch, T new tokens, S cached + new tokens, C n_embd, nh query heads, nkv key/value heads, hs head size.
Positions are explicit: `forward(tokens, positions, kv_cache)`. A cache is any object with
`update(layer, k, v) -> (k_all, v_all)`, `attention(T) -> (mask, is_causal)`, `positions(T)` and `advance(T)`;
`KVCache` below is the contiguous one, the serving engine brings a paged one. The model knows nothing about
sampling, files or HTTP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer of a batch of sequences.

    k, v: (n_layer, B, nkv, max_len, hs). Slot j of every row holds the token fed at step j. A row may begin
    with `pad[b]` left-padding slots (prompts of different lengths, aligned at their ends); no query attends to
    them and the row's positions start after them. `length` is the number of slots written so far.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32,
                 device="cpu", pad: torch.Tensor | None = None):
        if config.pos in ("learned", "rope") and max_len > config.block_size:
            raise ValueError(f"KV cache length {max_len} exceeds the model's context of {config.block_size} "
                             f"tokens; shorten the prompt or max new tokens")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.pad = pad.to(device) if pad is not None and bool(pad.any()) else None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens: (T,) without padding, (B, T) with it."""
        slots = torch.arange(self.length, self.length + T, device=self.k.device)
        if self.pad is None:
            return slots
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def attention(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """The attention mask for T new queries over all S = length + T slots, or is_causal when it suffices."""
        S = self.length + T
        if S > self.max_len:
            raise ValueError(f"KV cache is full: {S} tokens do not fit in {self.max_len} slots")
        if self.pad is None and T == 1:
            return None, False  # one new query sees every written slot
        if self.pad is None and self.length == 0:
            return None, True  # a plain causal prefill
        device = self.k.device
        q_slot = torch.arange(self.length, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = k_slot <= q_slot  # (T, S)
        if self.pad is not None:
            mask = mask[None] & (k_slot[None] >= self.pad[:, None, None])  # (B, T, S)
            mask = mask | (torch.arange(S, device=device)[None, None, :] == q_slot[None])  # pad rows see themselves
            mask = mask[:, None]  # (B, 1, T, S)
        return mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the next slots; return all S slots of this layer."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        self.length += T

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding rolls back rejected tokens)."""
        self.length = min(self.length, length)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The classic positional encoding: pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(...)."""
    div = torch.exp(torch.arange(0, dim, 2, device=positions.device).float() * (-math.log(10000.0) / dim))
    angles = positions.float()[..., None] * div  # (..., dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave sin, cos


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, hs/2) for rotary embeddings (half-split layout, as Hugging Face's Llama)."""
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
    angles = torch.outer(torch.arange(length).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of x (B, n, T, hs) by the angles in cos/sin (B or 1, 1, T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, config.qkv_dim, bias=config.bias)  # [q; k; v] rows
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def project(self, x, rope):
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of x (B, T, C), rotated when rope is given.

        Public so that interpretability tools (lmforge.apps.explain) see exactly the q, k that attention uses.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).split([C, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, layer, rope, cache, mask, is_causal):
        B, T, C = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.intermediate_size * (2 if config.mlp == "swiglu" else 1)  # swiglu: [gate; up] rows
        self.fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.drop = make_dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "gelu":
            h = F.gelu(h)  # exact (erf), as nanoGPT: half the cost of the tanh form on a CPU
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        else:
            h = F.relu(h)
        return self.proj(self.drop(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm1, self.attn = make_norm(config), Attention(config)
        self.norm2, self.mlp = make_norm(config), MLP(config)
        self.drop = make_dropout(config.dropout)

    def forward(self, x, layer, rope, cache, mask, is_causal):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), layer, rope, cache, mask, is_causal))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, layer, rope, cache, mask, is_causal)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # (block_size, hs/2) buffers, rope models only
    rope_sin: torch.Tensor
    fused_decoder: Any = None  # a one-call decode step, attached by lmforge.infer.fused.prepare_for_decoding

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = make_dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias and not config.tie_embeddings)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.pos == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        if c.init == "seed":  # the example's init_weights(); encoder layers keep PyTorch's own init
            for attn in (m for m in self.modules() if isinstance(m, Attention)):
                nn.init.xavier_uniform_(attn.qkv.weight)  # as nn.MultiheadAttention's in_proj
                nn.init.zeros_(attn.qkv.bias)
                nn.init.zeros_(attn.proj.bias)
            nn.init.uniform_(self.tok_emb.weight, -0.1, 0.1)
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
            nn.init.zeros_(self.lm_head.bias)
            return
        for name, p in self.named_parameters():  # GPT-2: N(0, 0.02), residual projections scaled by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * c.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)  # norm weights

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None) -> KVCache:
        p = next(self.parameters())
        dtype = p.dtype if p.is_floating_point() else torch.float32
        return KVCache(self.config, batch_size, max_len or self.config.block_size, dtype=dtype,
                       device=p.device, pad=pad)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Final hidden states (B, T, C) for tokens (B, T) at `positions` ((T,) or (B, T))."""
        B, T = tokens.shape
        c = self.config
        if kv_cache is None:
            if T > c.block_size and c.pos != "sinusoidal":
                raise ValueError(f"sequence of {T} tokens is longer than the model's context of {c.block_size}")
            positions = torch.arange(T, device=tokens.device) if positions is None else positions
            mask, is_causal = None, True
        else:
            positions = kv_cache.positions(T) if positions is None else positions
            mask, is_causal = kv_cache.attention(T)

        x = self.tok_emb(tokens)  # (B, T, C)
        if c.embed_scale:
            x = x * math.sqrt(c.n_embd)
        if self.pos_emb is not None:  # learned positions
            x = x + self.pos_emb(positions)
        elif c.pos == "sinusoidal":
            x = x + sinusoidal(positions, c.n_embd).to(x.dtype)
        x = self.drop(x)

        rope = None
        if c.pos == "rope":
            pos = positions if positions.dim() == 2 else positions[None]  # (B or 1, T)
            rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))

        for i, block in enumerate(self.blocks):
            x = block(x, i, rope, kv_cache, mask, is_causal)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T)."""
        return self.lm_head(self.hidden(tokens, positions, kv_cache))
