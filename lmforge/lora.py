"""LoRA: low-rank adapters on a frozen model's linear layers, saved as their own small file.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight W (out, in) gets a trainable
update scale * B @ A with A (r, in), B (out, r) and scale = alpha / r, so

    y = x W^T + b + scale * dropout(x) A^T B^T.

A starts random (Kaiming uniform, as the paper's reference code) and B at zero, so an adapted model starts out
exactly the base model. Only A and B train: r * (in + out) numbers per adapted layer instead of in * out.

Targets are module names relative to a block ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj") or "lm_head"; the
fused qkv and SwiGLU fc layers are adapted as one matrix each.

An adapter outside a model is an `Adapter`: per adapted layer (its full module path) the matrices A, B and the
scale, whatever rank each layer has. lmforge.interop.peft reads and writes adapter folders (PEFT's format, and
lmforge's earlier one); `merge_adapter` folds an adapter into a model's weights (W += scale * B @ A, after which
the model is a plain Transformer again: quantization and oneDNN packing then apply as to any model), and
lmforge.infer.multi_lora serves many adapters beside one unmerged base.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.checkpoint import CheckpointError, model_tensors, tensors_digest

BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
TARGETS = (*BLOCK_TARGETS, "lm_head")
DEFAULT_TARGETS = list(BLOCK_TARGETS)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        p = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=p.dtype, device=p.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=p.dtype, device=p.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the base weight, scale * B @ A (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module paths ("blocks.0.attn.qkv", "lm_head") of the targets; an unknown name is an error."""
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target module(s) {bad or targets}: choose from {', '.join(TARGETS)}")
    paths = [f"blocks.{i}.{t}" for i in range(len(model.blocks)) for t in targets if t in BLOCK_TARGETS]
    return paths + (["lm_head"] if "lm_head" in targets else [])


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, name = path.split(".")
    module = model
    for p in parents:
        module = getattr(module, p)
    return module, name


def add_lora(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: list[str] | None = None
) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linears in LoRALinear, in place; return their paths.

    An adapted lm_head tied to the token embedding is untied first (the embedding stays frozen and unchanged).
    """
    if rank < 1:
        raise ValueError(f"lora_rank={rank} must be >= 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout={dropout} must be in [0, 1)")
    paths = target_paths(model, targets or DEFAULT_TARGETS)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent, name = _parent(model, path)
        linear = getattr(parent, name)
        if type(linear) is not nn.Linear:
            raise ValueError(
                f"LoRA target {path} is a {type(linear).__name__}, not a float nn.Linear "
                f"(quantized or packed models cannot be adapted; load the float model)"
            )
        if path == "lm_head" and linear.weight is model.tok_emb.weight:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        setattr(parent, name, LoRALinear(linear, rank, alpha, dropout))
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into its base weight (W += scale * B @ A) and put the plain nn.Linear back."""
    for path, layer in lora_layers(model).items():
        layer.base.weight += layer.delta().to(layer.base.weight.dtype)
        parent, name = _parent(model, path)
        setattr(parent, name, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    untie_config(model)
    return model


def untie_config(model: nn.Module) -> None:
    """After an adapted lm_head was merged, the head is no longer the token embedding: record that in the config
    (so the saved model loads untied) and give the head the zero bias an untied head has when config.bias."""
    c = getattr(model, "config", None)
    if c is None or not c.tie_embeddings or model.lm_head.weight is model.tok_emb.weight:
        return
    model.config = dataclasses.replace(c, tie_embeddings=False)
    if c.bias and model.lm_head.bias is None:
        w = model.lm_head.weight
        model.lm_head.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


def base_digest(model: nn.Module) -> str:
    """The digest of the base model's weights (the same one lmforge records in model.safetensors)."""
    return tensors_digest(model_tensors(model))


@dataclass
class LoRAWeights:
    """One adapted layer: y += scale * (x A^T) B^T, A (r, in), B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """scale * B @ A (out, in), in float32 at least."""
        dtype = torch.promote_types(self.A.dtype, torch.float32)
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scale


@dataclass
class Adapter:
    """An adapter apart from any model: its layers by full module path ("blocks.0.attn.qkv", "lm_head")."""

    layers: dict[str, LoRAWeights]
    base: str | None = None  # the base it was trained on, as its folder recorded it
    base_digest: str | None = None  # that base's weight digest (lmforge-trained adapters), checked on load
    source: str = ""  # the folder it was read from, for messages

    def check(self, model: nn.Module, check_base: bool = True) -> None:
        """CheckpointError unless every layer fits `model` (and, when recorded, the base's digest matches)."""
        if check_base and self.base_digest is not None and base_digest(model) != self.base_digest:
            raise CheckpointError(
                f"adapter {self.source} was trained on a different base model ({self.base}); "
                f"its weights do not match the digest the adapter recorded: load it on that base"
            )
        modules = dict(model.named_modules())
        for path, w in self.layers.items():
            linear = modules.get(path)
            if linear is None or not hasattr(linear, "in_features"):
                raise CheckpointError(
                    f"adapter {self.source} adapts {path}, which this model (a "
                    f"{len(model.blocks)}-layer {model.config.name}) does not have"
                )
            if w.A.shape != (w.rank, linear.in_features) or w.B.shape != (linear.out_features, w.rank):
                raise CheckpointError(
                    f"adapter {self.source}: {path} has A {tuple(w.A.shape)}, B {tuple(w.B.shape)}; "
                    f"the model's layer is {linear.out_features} x {linear.in_features}"
                )


def adapter_of(model: nn.Module) -> Adapter:
    """The LoRALinear layers of a model being trained, as an Adapter (tensors copied to the CPU)."""
    layers = {
        path: LoRAWeights(m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone(), m.scale)
        for path, m in lora_layers(model).items()
    }
    if not layers:
        raise ValueError("the model has no LoRA layers")
    return Adapter(layers)


def attach_adapter(model: nn.Module, adapter: Adapter, *, check_base: bool = True) -> list[str]:
    """Wrap the adapter's layers of `model` in LoRALinear holding its weights (unmerged); return their paths."""
    adapter.check(model, check_base)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, w in adapter.layers.items():
        parent, name = _parent(model, path)
        linear = getattr(parent, name)
        if type(linear) is not nn.Linear:
            raise CheckpointError(f"{path} is a {type(linear).__name__}, not a float nn.Linear: load the float model")
        if path == "lm_head" and linear.weight is model.tok_emb.weight:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        layer = LoRALinear(linear, w.rank, w.scale * w.rank)
        with torch.no_grad():
            layer.lora_A.copy_(w.A)
            layer.lora_B.copy_(w.B)
        setattr(parent, name, layer)
    return list(adapter.layers)


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: Adapter, *, check_base: bool = True) -> nn.Module:
    """Fold the adapter into `model`'s weights (W += scale * B @ A) in place: the inference path; returns model."""
    adapter.check(model, check_base)
    for path, w in adapter.layers.items():
        parent, name = _parent(model, path)
        linear = getattr(parent, name)
        if type(linear) is not nn.Linear:
            raise CheckpointError(
                f"{path} is a {type(linear).__name__}, not a float nn.Linear: merge the adapter "
                f"into the float model, then quantize"
            )
        if path == "lm_head" and linear.weight is model.tok_emb.weight:
            linear.weight = nn.Parameter(linear.weight.detach().clone())
        linear.weight += w.delta().to(linear.weight.dtype)
    untie_config(model)
    return model.eval()


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
