"""One decoder-only Transformer for every lmforge preset and imported family, read top to bottom.

The same code runs the classic PyTorch word_language_model `TransformerModel` (post-norm, sinusoidal positions,
ReLU FFN), GPT-2 (pre-norm LayerNorm, learned positions, GELU, tied embeddings), Llama (RMSNorm, rotary
positions, SwiGLU, grouped-query attention) and the families that differ from Llama in a few small pieces: Qwen
(q/k/v biases, per-head q/k norms), Mistral and Phi-3 (sliding windows, RoPE scaling, partial rotary), Gemma 2/3
(sandwich norms, GeGLU, scaled embeddings, soft-capping, local layers with their own RoPE base) and OLMo 2 (norms
on the sublayers' outputs, q/k norms over the whole projection). `ModelConfig` says which parts to use.

References:
- Vaswani et al. 2017, "Attention Is All You Need" (the classic encoder layer, sinusoidal positions).
- Radford et al. 2019, GPT-2; github.com/karpathy/nanoGPT `model.py`.
- Touvron et al. 2023, Llama 2; Su et al. 2021, RoFormer (rotary embeddings); Ainslie et al. 2023 (GQA).
- Beltagy et al. 2020, Longformer, and Jiang et al. 2023, Mistral 7B (sliding-window attention).
- Gemma Team 2024, Gemma 2 (soft-capping, sandwich norms, local/global layers); OLMo Team 2024, 2 OLMo 2 Furious.
- RoPE and its scalings: lmforge/rope.py.

Shapes: B batch, T new tokens, S cached + new tokens, C n_embd, nh query heads, nkv key/value heads, hs head size
(n_embd / nh unless the config's head_size says otherwise), A = nh * hs the attention width.
Positions are explicit: `forward(tokens, positions, kv_cache)`. A cache is any object with
`update(layer, k, v) -> (k_all, v_all)`, `attention(T[, window]) -> (mask, is_causal)`, `positions(T)` and
`advance(T)`; `KVCache` below is the contiguous one, the serving engine brings a paged one. The model knows
nothing about sampling, files or HTTP.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.rope import apply_rope, long_rope_rows, long_rope_switch, rope_tables


class KVCache:
    """Preallocated keys and values for every layer of a batch of sequences.

    k, v: (n_layer, B, nkv, max_len, hs). Slot j of every row holds the token fed at step j. A row may begin
    with `pad[b]` left-padding slots (prompts of different lengths, aligned at their ends); no query attends to
    them and the row's positions start after them. `length` is the number of slots written so far.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype=torch.float32,
        device="cpu",
        pad: torch.Tensor | None = None,
    ):
        if config.pos in ("learned", "rope") and max_len > config.block_size:
            raise ValueError(
                f"KV cache length {max_len} exceeds the model's context of {config.block_size} "
                f"tokens; shorten the prompt or max new tokens"
            )
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

    def attention(self, T: int, window: int | None = None) -> tuple[torch.Tensor | None, bool]:
        """The attention mask for T new queries over all S = length + T slots, or is_causal when it suffices.

        With a sliding window a query sees only the last `window` slots up to itself. The cache still keeps every
        slot: it is one tensor for all layers that the fused step and speculative rollback (`crop`) address by
        slot, and generation sizes it to the prompt plus the new tokens anyway; the paged engine is where memory
        follows the window (lmforge.engine)."""
        S = self.length + T
        if S > self.max_len:
            raise ValueError(f"KV cache is full: {S} tokens do not fit in {self.max_len} slots")
        windowed = window is not None and S > window
        if self.pad is None and T == 1 and not windowed:
            return None, False  # one new query sees every written slot
        if self.pad is None and self.length == 0 and not windowed:
            return None, True  # a plain causal prefill
        device = self.k.device
        q_slot = torch.arange(self.length, S, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = causal_mask(q_slot, k_slot, window)  # (T, S)
        if self.pad is not None:
            mask = mask[None] & (k_slot[None] >= self.pad[:, None, None])  # (B, T, S)
            mask = mask | (torch.arange(S, device=device)[None, None, :] == q_slot[None])  # pad rows see themselves
            mask = mask[:, None]  # (B, 1, T, S)
        return mask, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the next slots; return all S slots of this layer."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
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


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """True where a query at q_pos may see a key at k_pos (broadcast): k <= q, and q - k < window if given."""
    mask = k_pos <= q_pos
    return mask if window is None else mask & (k_pos > q_pos - window)


def make_norm(config: ModelConfig, width: int | None = None) -> nn.Module:
    width = config.n_embd if width is None else width
    if config.norm == "rmsnorm":
        return nn.RMSNorm(width, eps=config.norm_eps)
    return nn.LayerNorm(width, eps=config.norm_eps, bias=config.bias)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's attention scores and logits)."""
    return x if cap is None else torch.tanh(x / cap) * cap


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    """Multi-head or grouped-query attention of one layer: its window (None: every earlier token), its score scale
    and soft-cap, and optional RMSNorms on q and k (per head, or over the whole projection) before RoPE."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_dim, self.kv_dim = config.q_dim, config.kv_dim
        self.window = config.layer_window(layer)
        self.scale, self.softcap = config.attn_scale, config.attn_softcap  # scale None: 1 / sqrt(hs)
        self.qkv = nn.Linear(config.n_embd, config.qkv_dim, bias=config.has_qkv_bias)  # [q; k; v] rows
        self.proj = nn.Linear(config.q_dim, config.n_embd, bias=config.bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm is not None:
            per_head = config.qk_norm == "head"
            self.q_norm = make_norm(config, self.head_dim if per_head else self.q_dim)
            self.k_norm = make_norm(config, self.head_dim if per_head else self.kv_dim)
        self.dropout = config.dropout

    def project(self, x, rope):
        """Queries (B, nh, T, hs), keys and values (B, nkv, T, hs) of x (B, T, C), normed and rotated as this layer
        does.

        Public so that interpretability tools (lmforge.apps.explain) see exactly the q, k that attention uses.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, layer, rope, cache, mask, is_causal):
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hs)
        if self.softcap is None:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hs)
        else:  # scaled_dot_product_attention cannot soft-cap: the scores, written out
            y = F.dropout(self.weights(q, k, mask, is_causal), self.dropout, self.training) @ self._heads(v)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.q_dim))

    def _heads(self, kv):
        """Keys or values (B, nkv, S, hs) repeated for the query heads that share them: (B, nh, S, hs)."""
        return kv.repeat_interleave(self.n_head // self.n_kv_head, dim=1)

    def weights(self, q, k, mask=None, is_causal=True) -> torch.Tensor:
        """Attention probabilities (B, nh, T, S), float32 for float32 q: softmax(softcap(scale * q k^T)) under the
        mask (is_causal: the causal mask, with this layer's window)."""
        T, S = q.shape[2], k.shape[2]
        scale = self.scale if self.scale is not None else 1 / math.sqrt(self.head_dim)
        scores = softcap((q @ self._heads(k).transpose(-2, -1)) * scale, self.softcap)  # (B, nh, T, S)
        if is_causal:
            pos = torch.arange(S, device=q.device)
            mask = causal_mask(pos[S - T :, None], pos[None, :], self.window)  # queries are the last T slots
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.intermediate_size * (2 if config.gated else 1)  # swiglu, geglu: [gate; up] rows
        self.fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.drop = make_dropout(config.dropout)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "geglu_tanh":
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.kind == "gelu":
            h = F.gelu(h)  # exact (erf), as nanoGPT: half the cost of the tanh form on a CPU
        elif self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        else:
            h = F.relu(h)
        return self.proj(self.drop(h))


class Block(nn.Module):
    """Attention then MLP, each with a residual; `norm_placement` says where the norms sit. norm1/norm2 are the
    norms before attention/MLP (after the residual add for the classic post-norm layer); post_norm1/post_norm2
    the norms on their outputs (sandwich, output); an absent norm is an nn.Identity."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        placement = config.norm_placement
        self.post_residual = placement == "post"
        self.norm1 = make_norm(config) if placement != "output" else nn.Identity()
        self.attn = Attention(config, layer)
        self.post_norm1 = make_norm(config) if placement in ("sandwich", "output") else nn.Identity()
        self.norm2 = make_norm(config) if placement != "output" else nn.Identity()
        self.mlp = MLP(config)
        self.post_norm2 = make_norm(config) if placement in ("sandwich", "output") else nn.Identity()
        self.drop = make_dropout(config.dropout)

    def forward(self, x, layer, rope, cache, mask, is_causal):
        if self.post_residual:
            x = self.norm1(x + self.drop(self.attn(x, layer, rope, cache, mask, is_causal)))
            return self.norm2(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.post_norm1(self.attn(self.norm1(x), layer, rope, cache, mask, is_causal)))
        return x + self.drop(self.post_norm2(self.mlp(self.norm2(x))))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # (block_size, rotary_dim/2) buffers, rope models only
    rope_sin: torch.Tensor
    rope_local_cos: torch.Tensor  # the sliding-window layers' own tables (rope_local_base)
    rope_local_sin: torch.Tensor
    rope_long_cos: torch.Tensor  # LongRoPE's long factors
    rope_long_sin: torch.Tensor
    fused_decoder: Any = None  # a one-call decode step, attached by lmforge.infer.fused.prepare_for_decoding

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = make_dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias and not config.tie_embeddings)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if config.pos == "rope":
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            for which in ("local", "long"):  # the sliding-window layers' own base; LongRoPE's long factors
                if (config.rope_local_base is not None) if which == "local" else long_rope_switch(config):
                    cos, sin = rope_tables(config, config.block_size, which)
                    self.register_buffer(f"rope_{which}_cos", cos, persistent=False)
                    self.register_buffer(f"rope_{which}_sin", sin, persistent=False)
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
        return KVCache(
            self.config, batch_size, max_len or self.config.block_size, dtype=dtype, device=p.device, pad=pad
        )

    def uses_local_rope(self, layer: int) -> bool:
        """Whether `layer` turns by the local RoPE tables (a sliding-window layer of a model with rope_local_base)."""
        return self.config.rope_local_base is not None and self.config.layer_window(layer) is not None

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Final hidden states (B, T, C) for tokens (B, T) at `positions` ((T,) or (B, T))."""
        B, T = tokens.shape
        c = self.config
        windows = {c.layer_window(i) for i in range(c.n_layer)}
        if kv_cache is None:
            if T > c.block_size and c.pos != "sinusoidal":
                raise ValueError(f"sequence of {T} tokens is longer than the model's context of {c.block_size}")
            positions = torch.arange(T, device=tokens.device) if positions is None else positions
            pos = torch.arange(T, device=tokens.device)
            masks = {
                w: (None, True) if w is None or T <= w else (causal_mask(pos[:, None], pos[None, :], w), False)
                for w in windows
            }
        else:
            positions = kv_cache.positions(T) if positions is None else positions
            masks = {w: kv_cache.attention(T, w) if w is not None else kv_cache.attention(T) for w in windows}

        x = self.tok_emb(tokens)  # (B, T, C)
        if c.embed_scale:
            x = x * math.sqrt(c.n_embd)
        if self.pos_emb is not None:  # learned positions
            x = x + self.pos_emb(positions)
        elif c.pos == "sinusoidal":
            x = x + sinusoidal(positions, c.n_embd).to(x.dtype)
        x = self.drop(x)

        ropes = {}
        if c.pos == "rope":
            pos = positions if positions.dim() == 2 else positions[None]  # (B or 1, T)
            for local in {self.uses_local_rope(i) for i in range(c.n_layer)}:
                cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
                cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B|1, 1, T, r/2)
                long = None if local else long_rope_rows(c, pos, kv_cache)
                if long is not None:
                    pick = long[:, None, None, None]
                    cos = torch.where(pick, self.rope_long_cos[pos][:, None], cos)
                    sin = torch.where(pick, self.rope_long_sin[pos][:, None], sin)
                ropes[local] = (cos.to(x.dtype), sin.to(x.dtype))

        for i, block in enumerate(self.blocks):
            mask, is_causal = masks[c.layer_window(i)]
            x = block(x, i, ropes.get(self.uses_local_rope(i)), kv_cache, mask, is_causal)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab) of hidden states (..., C): the output head, soft-capped where the config says."""
        return softcap(self.lm_head(hidden), self.config.logit_softcap)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T)."""
        return self.logits(self.hidden(tokens, positions, kv_cache))
