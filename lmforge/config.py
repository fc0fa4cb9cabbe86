"""Model configuration: one dataclass, named presets, derived sizes computed in one place.

Every architecture lmforge runs is a point in this space:

- `seed`: the classic PyTorch `TransformerModel` (pytorch/examples word_language_model): token embedding
  scaled by sqrt(d_model), sinusoidal positions, post-norm encoder layers with a ReLU FFN under a causal
  mask, an untied linear decoder.
- GPT-2 family: pre-norm LayerNorm, GELU, learned positions, tied embeddings, biases.
- Llama family: pre-norm RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases.

The imported families (lmforge.interop.hf) differ from Llama only in the fields below, each one small, named piece
(as litgpt's Config does), never a family name the model branches on:

- Qwen2/2.5: `qkv_bias` (biases on q, k, v but not on the output projection).
- Qwen3, Gemma 3: `qk_norm="head"` (RMSNorm over each head of q and k before RoPE); OLMo 2: `qk_norm="proj"`
  (over the whole q and k projections); `head_size` wider or narrower than n_embd / n_head.
- Mistral, Phi-3: `sliding_window` on every layer; Gemma 2: on alternate layers, Gemma 3: five of every six
  (`window_layers`), whose RoPE turns at `rope_local_base`.
- Gemma 2/3: `norm_placement="sandwich"` (a norm before and after attention and MLP), `mlp="geglu_tanh"`,
  `embed_scale`, `attn_scale` (query_pre_attn_scalar^-1/2), `attn_softcap` and `logit_softcap` (c * tanh(x / c));
  OLMo 2: `norm_placement="output"` (norms on the sublayers' outputs only). Gemma stores norm weights as w - 1;
  the import adds the 1 back, so the model has one RMSNorm for everyone (the fused step, LoRA and int8 included).
- `rope_scaling` (Llama 3's "llama3", "linear", "dynamic", "yarn", Phi-3's "longrope") and `rope_dim` (partial
  rotary, Phi-4-mini): they only change the rotary tables, see lmforge.rope.rope_tables.

Layer choices are strings so the config stays a plain JSON document.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import read_json

# rope_scaling["type"] -> the keys it needs (lmforge.rope.rope_tables reads them; names as in Hugging Face's
# rope_parameters, with original_max_position_embeddings shortened to original_context).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_context"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_context"),
    "yarn": ("factor", "original_context"),
    "longrope": ("short_factor", "long_factor", "original_context"),
}
ROPE_SCALING_OPTIONAL = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 50257
    block_size: int = 1024  # longest context the model is trained (and, for learned positions, able) to see
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0  # grouped-query attention; 0 (or None in a file) means n_head, plain multi-head
    intermediate_size: int = 0  # FFN hidden width; 0 (or None in a file) derives it from the mlp type
    multiple_of: int = 256  # Llama rounds the SwiGLU width up to a multiple of this
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    # Where each block's norms sit, for a sublayer f (attention, MLP):
    #   pre: x + f(norm(x)) (GPT-2, Llama) | post: norm(x + f(x)) (the classic encoder layer)
    #   sandwich: x + norm'(f(norm(x))) (Gemma 2/3) | output: x + norm(f(x)) (OLMo 2)
    norm_placement: str = "pre"
    # gelu (exact, erf) | gelu_tanh (GPT-2's "gelu_new") | relu | swiglu: silu(gate) * up |
    # geglu_tanh: gelu_tanh(gate) * up (Gemma)
    mlp: str = "gelu"
    pos: str = "learned"  # learned | rope | sinusoidal
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # {"type": one of ROPE_SCALING_KEYS, its keys...}; None: plain RoPE
    rope_dim: int | None = None  # leading dims of each head that RoPE turns (partial rotary); None: all
    rope_local_base: float | None = None  # RoPE base of the sliding-window layers (Gemma 3); None: rope_base
    bias: bool = True
    qkv_bias: bool | None = None  # biases on q, k, v; None: as `bias` (Qwen2 has them while `bias` is False)
    head_size: int | None = None  # per-head width; None: n_embd // n_head
    qk_norm: str | None = None  # None | head: RMSNorm per head of q and k | proj: over the whole q, k projections
    attn_scale: float | None = None  # multiplies q . k; None: 1 / sqrt(head_size)
    attn_softcap: float | None = None  # attention scores -> c * tanh(scores / c) before the mask (Gemma 2)
    logit_softcap: float | None = None  # output logits -> c * tanh(logits / c) (Gemma 2)
    sliding_window: int | None = None  # a windowed layer's query sees its last `sliding_window` tokens (itself too)
    window_layers: list[int] | None = None  # which layers are windowed; None: all of them (when sliding_window)
    tie_embeddings: bool = True
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd), as the classic model and Gemma do
    final_norm: bool = True  # a norm after the last block (pre-norm models need one)
    dropout: float = 0.0
    init: str = "gpt2"  # gpt2: normal(0, 0.02) + scaled residual projections | seed: the example's uniform(-0.1, 0.1)
    quantization: str | None = None  # None | int8 | int4: weight-only quantized checkpoint (lmforge.infer.quantize)
    extra: dict = field(default_factory=dict)  # provenance (e.g. imported from), never read by the model

    def __post_init__(self) -> None:
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if not self.intermediate_size:
            if self.gated:
                self.intermediate_size = find_multiple(int(2 * 4 * self.n_embd / 3), self.multiple_of)
            else:
                self.intermediate_size = 4 * self.n_embd
        self._check()

    def _check(self) -> None:
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "norm_placement": ("pre", "post", "sandwich", "output"),
            "mlp": ("gelu", "gelu_tanh", "relu", "swiglu", "geglu_tanh"),
            "pos": ("learned", "rope", "sinusoidal"),
            "init": ("gpt2", "seed"),
            "quantization": (None, "int8", "int4"),
            "qk_norm": (None, "head", "proj"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise LmforgeError(f"config {key}={getattr(self, key)!r} is not one of {allowed}", param=key)
        if self.head_size is None and self.n_embd % self.n_head:
            raise LmforgeError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_size)", param="n_head"
            )
        if self.n_head % self.n_kv_head:
            raise LmforgeError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}", param="n_kv_head"
            )
        for key in ("vocab_size", "block_size", "n_layer", "head_size", "rope_dim", "sliding_window"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise LmforgeError(f"config {key} must be >= 1, got {value}", param=key)
        for key in ("attn_scale", "attn_softcap", "logit_softcap", "rope_local_base"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise LmforgeError(f"config {key} must be > 0 (or null), got {value}", param=key)
        if self.pos == "rope":
            if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
                raise LmforgeError(
                    f"rotary positions turn an even number of dims, at most the head size "
                    f"{self.head_dim}; got {self.rotary_dim}",
                    param="rope_dim",
                )
            self._check_rope_scaling()
        elif self.rope_scaling or self.rope_dim or self.rope_local_base:
            raise LmforgeError(
                f"rope_scaling, rope_dim and rope_local_base need pos='rope', not {self.pos!r}", param="pos"
            )
        if self.window_layers is not None:
            bad = [i for i in self.window_layers if not 0 <= i < self.n_layer]
            if self.sliding_window is None or bad:
                raise LmforgeError(
                    f"window_layers={self.window_layers} needs sliding_window and layer indices in "
                    f"0..{self.n_layer - 1}",
                    param="window_layers",
                )

    def _check_rope_scaling(self) -> None:
        spec = self.rope_scaling
        if spec is None:
            return
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in ROPE_SCALING_KEYS:
            raise LmforgeError(
                f"rope_scaling type {kind!r} is not one of {sorted(ROPE_SCALING_KEYS)}", param="rope_scaling"
            )
        missing = [k for k in ROPE_SCALING_KEYS[kind] if spec.get(k) is None]
        unknown = set(spec) - {"type", *ROPE_SCALING_KEYS[kind], *ROPE_SCALING_OPTIONAL}
        if missing or unknown:
            raise LmforgeError(
                f"rope_scaling {kind!r} needs {list(ROPE_SCALING_KEYS[kind])}; missing {missing}, "
                f"unknown {sorted(unknown)}",
                param="rope_scaling",
            )
        if kind == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(spec[key]) != self.rotary_dim // 2:
                    raise LmforgeError(
                        f"rope_scaling {key} has {len(spec[key])} values; the {self.rotary_dim} "
                        f"rotary dims need {self.rotary_dim // 2}",
                        param="rope_scaling",
                    )

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (the attention output); n_embd unless head_size says otherwise."""
        return self.n_head * self.head_dim

    @property
    def qkv_dim(self) -> int:
        """Width of the fused query/key/value projection."""
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim if self.rope_dim is not None else self.head_dim

    @property
    def gated(self) -> bool:
        """Whether the MLP's first layer holds [gate; up] rows (SwiGLU, GeGLU)."""
        return self.mlp in ("swiglu", "geglu_tanh")

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier token)."""
        if self.sliding_window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.sliding_window

    @property
    def all_windowed(self) -> bool:
        """Every layer has a sliding window: keys older than the window are never read again (lmforge.engine
        frees their blocks)."""
        return all(self.layer_window(i) is not None for i in range(self.n_layer))

    # ---- construction and (de)serialisation --------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(path, "model config"))


_GPT2 = dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True, init="gpt2")
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, init="gpt2")

PRESETS: dict[str, dict] = {
    # pytorch/examples word_language_model: `python main.py --model Transformer` defaults
    # (emsize 200, nhead 2, nhid 200, nlayers 2, dropout 0.2, bptt 35).
    "seed": dict(
        n_layer=2,
        n_head=2,
        n_embd=200,
        intermediate_size=200,
        block_size=35,
        vocab_size=33278,
        norm="layernorm",
        norm_placement="post",
        mlp="relu",
        pos="sinusoidal",
        bias=True,
        tie_embeddings=False,
        embed_scale=True,
        final_norm=False,
        dropout=0.2,
        init="seed",
    ),
    # GPT-2, https://huggingface.co/openai-community/gpt2/blob/main/config.json
    "gpt2": dict(_GPT2, mlp="gelu_tanh", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    # https://huggingface.co/openai-community/gpt2-medium/blob/main/config.json
    "gpt2-medium": dict(_GPT2, mlp="gelu_tanh", n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    # nanoGPT's CPU recipe for shakespeare_char (README "I only have a macbook").
    "gpt-nano": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    # nanoGPT config/train_shakespeare_char.py "baby GPT".
    "gpt-micro": dict(_GPT2, n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, dropout=0.2),
    # The demo's model: small enough to learn code in a few minutes on two CPU cores.
    "gpt-mini": dict(_GPT2, n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=4096),
    # A 14M GPT-2 for CPU serving benchmarks: 6 layers, 384 dims, 6 heads, 8192-token BPE.
    "gpt-14m": dict(_GPT2, n_layer=6, n_head=6, n_embd=384, block_size=512, vocab_size=8192),
    # Small Llama-style models for CPU work.
    "llama-nano": dict(
        _LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, vocab_size=65, multiple_of=32
    ),
    "llama-micro": dict(
        _LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, vocab_size=8192, multiple_of=64
    ),
    # llama2.c stories260K (doc/stories260K.md): dim 64, 5 layers, 8 heads, 4 KV heads, hidden 172.
    "stories260K": dict(
        _LLAMA,
        n_layer=5,
        n_head=8,
        n_kv_head=4,
        n_embd=64,
        intermediate_size=172,
        block_size=512,
        vocab_size=512,
        tie_embeddings=True,
    ),
    # llama2.c stories15M: dim 288, 6 layers, 6 heads, 32000-token Llama 2 vocabulary.
    "stories15M": dict(
        _LLAMA,
        n_layer=6,
        n_head=6,
        n_embd=288,
        intermediate_size=768,
        block_size=256,
        vocab_size=32000,
        tie_embeddings=True,
    ),
    # Reference shapes: https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json
    "tinyllama-1.1b": dict(
        _LLAMA,
        n_layer=22,
        n_head=32,
        n_kv_head=4,
        n_embd=2048,
        intermediate_size=5632,
        block_size=2048,
        vocab_size=32000,
    ),
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama2-7b": dict(
        _LLAMA, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, block_size=4096, vocab_size=32000
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama3-8b": dict(
        _LLAMA,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        n_embd=4096,
        intermediate_size=14336,
        block_size=8192,
        vocab_size=128256,
        rope_base=500000.0,
    ),
    # Shapes of imported families, for benchmarks with random weights (import the real ones: lmforge import).
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json: q/k/v biases, tied.
    "qwen2.5-0.5b": dict(
        _LLAMA,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        n_embd=896,
        intermediate_size=4864,
        block_size=32768,
        vocab_size=151936,
        rope_base=1000000.0,
        qkv_bias=True,
        tie_embeddings=True,
        norm_eps=1e-6,
    ),
    # https://huggingface.co/google/gemma-3-270m/blob/main/config.json: 256-wide heads, per-head q/k norms, sandwich
    # norms, GeGLU, scaled embeddings, five 512-token windows (RoPE base 10000) to one global layer.
    "gemma3-270m": dict(
        _LLAMA,
        mlp="geglu_tanh",
        n_layer=18,
        n_head=4,
        n_kv_head=1,
        n_embd=640,
        head_size=256,
        intermediate_size=2048,
        block_size=32768,
        vocab_size=262144,
        rope_base=1000000.0,
        rope_local_base=10000.0,
        norm_placement="sandwich",
        qk_norm="head",
        embed_scale=True,
        attn_scale=256**-0.5,
        sliding_window=512,
        window_layers=[i for i in range(18) if (i + 1) % 6],
        tie_embeddings=True,
        norm_eps=1e-6,
    ),
}
