"""Model configuration: one dataclass, named presets, derived sizes computed in one place.

Every architecture lmforge runs is a point in this space:

- `seed`: the classic PyTorch `TransformerModel` (pytorch/examples word_language_model): token embedding
  scaled by sqrt(d_model), sinusoidal positions, post-norm encoder layers with a ReLU FFN under a causal
  mask, an untied linear decoder.
- GPT-2 family: pre-norm LayerNorm, GELU, learned positions, tied embeddings, biases.
- Llama family: pre-norm RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases.

Layer choices are strings so the config stays a plain JSON document.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.fsutil import read_json


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
    norm_placement: str = "pre"  # pre (GPT-2, Llama) | post (the classic encoder layer)
    mlp: str = "gelu"  # gelu (exact, erf) | gelu_tanh (GPT-2's "gelu_new") | relu | swiglu
    pos: str = "learned"  # learned | rope | sinusoidal
    rope_base: float = 10000.0
    bias: bool = True
    tie_embeddings: bool = True
    embed_scale: bool = False  # multiply token embeddings by sqrt(n_embd), as the classic model does
    final_norm: bool = True  # a norm after the last block (pre-norm models need one)
    dropout: float = 0.0
    init: str = "gpt2"  # gpt2: normal(0, 0.02) + scaled residual projections | seed: the example's uniform(-0.1, 0.1)
    quantization: str | None = None  # None | int8 | int4: weight-only quantized checkpoint (lmforge.infer.quantize)
    extra: dict = field(default_factory=dict)  # provenance (e.g. imported from), never read by the model

    def __post_init__(self) -> None:
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if not self.intermediate_size:
            if self.mlp == "swiglu":
                self.intermediate_size = find_multiple(int(2 * 4 * self.n_embd / 3), self.multiple_of)
            else:
                self.intermediate_size = 4 * self.n_embd
        self._check()

    def _check(self) -> None:
        choices = {"norm": ("layernorm", "rmsnorm"), "norm_placement": ("pre", "post"),
                   "mlp": ("gelu", "gelu_tanh", "relu", "swiglu"), "pos": ("learned", "rope", "sinusoidal"),
                   "init": ("gpt2", "seed"), "quantization": (None, "int8", "int4")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config {key}={getattr(self, key)!r} is not one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")
        for key in ("vocab_size", "block_size", "n_layer"):
            if getattr(self, key) < 1:
                raise ValueError(f"config {key} must be >= 1, got {getattr(self, key)}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def qkv_dim(self) -> int:
        """Width of the fused query/key/value projection."""
        return (self.n_head + 2 * self.n_kv_head) * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    # ---- construction and (de)serialisation --------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path, "model config"))


_GPT2 = dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True, init="gpt2")
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, init="gpt2")

PRESETS: dict[str, dict] = {
    # pytorch/examples word_language_model: `python main.py --model Transformer` defaults
    # (emsize 200, nhead 2, nhid 200, nlayers 2, dropout 0.2, bptt 35).
    "seed": dict(n_layer=2, n_head=2, n_embd=200, intermediate_size=200, block_size=35, vocab_size=33278,
                 norm="layernorm", norm_placement="post", mlp="relu", pos="sinusoidal", bias=True,
                 tie_embeddings=False, embed_scale=True, final_norm=False, dropout=0.2, init="seed"),
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
    "llama-nano": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=64, vocab_size=65,
                       multiple_of=32),
    "llama-micro": dict(_LLAMA, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, vocab_size=8192,
                        multiple_of=64),
    # llama2.c stories260K (doc/stories260K.md): dim 64, 5 layers, 8 heads, 4 KV heads, hidden 172.
    "stories260K": dict(_LLAMA, n_layer=5, n_head=8, n_kv_head=4, n_embd=64, intermediate_size=172,
                        block_size=512, vocab_size=512, tie_embeddings=True),
    # llama2.c stories15M: dim 288, 6 layers, 6 heads, 32000-token Llama 2 vocabulary.
    "stories15M": dict(_LLAMA, n_layer=6, n_head=6, n_embd=288, intermediate_size=768, block_size=256,
                       vocab_size=32000, tie_embeddings=True),
    # Reference shapes: https://huggingface.co/TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T/blob/main/config.json
    "tinyllama-1.1b": dict(_LLAMA, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048, intermediate_size=5632,
                           block_size=2048, vocab_size=32000),
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama2-7b": dict(_LLAMA, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, block_size=4096,
                      vocab_size=32000),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama3-8b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                      block_size=8192, vocab_size=128256, rope_base=500000.0),
}
