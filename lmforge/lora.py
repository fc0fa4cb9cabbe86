"""LoRA: low-rank adapters on a frozen model's linear layers, saved as their own small file.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen weight W (out, in) gets a trainable
update scale * B @ A with A (r, in), B (out, r) and scale = alpha / r, so

    y = x W^T + b + scale * dropout(x) A^T B^T.

A starts random (Kaiming uniform, as the paper's reference code) and B at zero, so an adapted model starts out
exactly the base model. Only A and B train: r * (in + out) numbers per adapted layer instead of in * out.

Targets are module names relative to a block ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj") or "lm_head"; the
fused qkv and SwiGLU fc layers are adapted as one matrix each. An adapter folder holds

    adapter_model.safetensors   the A and B tensors, named "<module path>.lora_A" / ".lora_B"
    adapter_config.json         rank, alpha, dropout, targets, and the base it was trained on (path + digest)

and is applied for inference by merging (`lmforge.loader.load(..., adapter=...)`): W += scale * B @ A, after which
the model is a plain Transformer again (quantization and oneDNN packing then apply as to any model). A base whose
weights differ from the digest recorded at training time is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import CheckpointError, model_tensors, tensors_digest, write_folder
from lmforge.fsutil import read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
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


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: list[str] | None = None) -> list[str]:
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
            raise ValueError(f"LoRA target {path} is a {type(linear).__name__}, not a float nn.Linear "
                             f"(quantized or packed models cannot be adapted; load the float model)")
        if path == "lm_head" and linear.weight is model.tok_emb.weight:
            linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        setattr(parent, name, LoRALinear(linear, rank, alpha, dropout))
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors: {"<path>.lora_A": A, "<path>.lora_B": B} for every LoRALinear."""
    out = {}
    for path, layer in lora_layers(model).items():
        out[f"{path}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        out[f"{path}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    return out


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


def save_adapter(folder: str | os.PathLike, model: nn.Module, *, base: str, digest: str,
                 extra_files: dict[str, bytes] | None = None) -> Path:
    """Write an adapter folder atomically: the LoRA tensors, adapter_config.json and any extra files."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    targets = sorted({p.split(".", 2)[-1] if p.startswith("blocks.") else p for p in layers})
    config = {"method": "lora", "base": str(base), "base_digest": digest, "rank": first.rank,
              "alpha": first.alpha, "dropout": getattr(first.dropout, "p", 0.0), "targets": targets}
    tensors = lora_tensors(model)

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt", "lmforge_sha256": tensors_digest(tensors)})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(folder, write)


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """An adapter folder, or a fine-tuning run folder holding one in adapter/."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    for folder in (path, path / "adapter"):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise CheckpointError(f"{path} holds no {ADAPTER_CONFIG}: not a LoRA adapter folder (make one with "
                          f"`lmforge finetune BASE --method lora --out DIR`)")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of an adapter folder, checked for completeness and integrity."""
    folder = resolve_adapter_dir(path)
    config = read_json(folder / ADAPTER_CONFIG, "adapter config", CheckpointError)
    missing = [k for k in ("rank", "alpha", "targets", "base_digest") if k not in config]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} lacks {', '.join(missing)}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"adapter weights missing: {weights}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); it may be truncated") from None
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True) -> list[str]:
    """Wrap `model`'s target layers in LoRALinear and load the adapter at `path` into them; return the paths.

    The model must be the base the adapter was trained on: its weight digest is compared with the one recorded.
    """
    config, tensors = read_adapter(path)
    if check_base and base_digest(model) != config["base_digest"]:
        raise CheckpointError(f"adapter {path} was trained on a different base model ({config.get('base')}); "
                              f"its weights do not match the digest recorded in {ADAPTER_CONFIG}: load it on "
                              f"that base")
    paths = add_lora(model, int(config["rank"]), float(config["alpha"]), 0.0, list(config["targets"]))
    layers = lora_layers(model)
    expected = {f"{p}.lora_{m}" for p in paths for m in "AB"}
    if set(tensors) != expected:
        raise CheckpointError(f"adapter {path}: tensors {sorted(set(tensors) ^ expected)[:4]} do not match its "
                              f"config (targets {config['targets']}, {len(model.blocks)} layers)")
    with torch.no_grad():
        for p in paths:
            for m in "AB":
                param = getattr(layers[p], f"lora_{m}")
                t = tensors[f"{p}.lora_{m}"]
                if t.shape != param.shape:
                    raise CheckpointError(f"adapter {path}: {p}.lora_{m} has shape {tuple(t.shape)}, the model "
                                          f"expects {tuple(param.shape)}")
                param.copy_(t)
    return paths


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter onto its base model and merge it into the weights (the inference path); returns model."""
    load_adapter(model, path)
    merge_lora(model)
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
