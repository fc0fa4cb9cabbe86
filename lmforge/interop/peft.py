"""LoRA adapter folders in PEFT's format (read and written), and lmforge's earlier format (read).

PEFT (github.com/huggingface/peft) keeps a LoRA adapter as

    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "task_type", ...}
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r)

where <module> is the path of an adapted linear layer in the Hugging Face model (GPT-2:
transformer.h.0.attn.c_attn; Llama: model.layers.0.self_attn.q_proj) and the update is
(lora_alpha / r) * B @ A (lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern override r and
lora_alpha per module). lmforge writes its adapters this way under the names of the model it exports
(lmforge.interop.hf), so `PeftModel.from_pretrained` loads them onto the exported base; a model that has no Hugging
Face form keeps lmforge's own module paths (blocks.0.attn.qkv). The base model's weight digest goes in the
safetensors metadata (`lmforge_base_sha256`), where PEFT does not look, and is checked when lmforge loads it.

Where a Hugging Face model keeps separate layers that lmforge fuses (Llama's q/k/v_proj in attn.qkv, gate/up_proj
in mlp.fc), writing gives each part the shared A and its rows of B, and reading stacks the parts into one layer of
their summed rank, B block-diagonal with each part's scale folded in: exactly the same update, whichever modules a
PEFT adapter targets (q_proj and v_proj alone leave k's rows zero).

lmforge's earlier folders (adapter_config.json with "method": "lora", tensors "<module>.lora_A" / ".lora_B") are
still read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmforge.checkpoint import CheckpointError, write_folder
from lmforge.config import ModelConfig
from lmforge.fsutil import read_json
from lmforge.interop.hf import UnsupportedModelError, hf_family
from lmforge.lora import BLOCK_TARGETS, Adapter, LoRAWeights, adapter_of, lora_layers

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper around the model: PeftModel.base_model (LoraModel).model
DIGEST_KEY = "lmforge_base_sha256"
# PEFT settings whose update is not a plain LoRA product of lora_A/lora_B: refused rather than silently dropped.
UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "bias",
    "modules_to_save",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
)


# ------------------------------------------------------------------------------------------ module names


def module_map(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Each adaptable layer of an lmforge model (full path) -> the modules that hold its output rows in the
    Hugging Face model it exports to, in order, with their row counts; its own paths when it has no such form."""
    c = config
    q_dim = c.qkv_dim - 2 * c.kv_dim
    fc_rows = c.intermediate_size * (2 if "glu" in c.mlp else 1)
    try:
        family = hf_family(c)
    except UnsupportedModelError:
        family = None
    out: dict[str, list[tuple[str, int]]] = {}
    for i in range(c.n_layer):
        ours = {t: f"blocks.{i}.{t}" for t in BLOCK_TARGETS}
        if family == "gpt2":
            h = f"transformer.h.{i}."
            parts = {
                "attn.qkv": [(h + "attn.c_attn", c.qkv_dim)],
                "attn.proj": [(h + "attn.c_proj", c.n_embd)],
                "mlp.fc": [(h + "mlp.c_fc", fc_rows)],
                "mlp.proj": [(h + "mlp.c_proj", c.n_embd)],
            }
        elif family is not None:  # the Llama-shaped families (Phi-3 fuses q/k/v and gate/up as lmforge does)
            h = f"model.layers.{i}."
            fused = family == "phi3"
            parts = {
                "attn.qkv": [(h + "self_attn.qkv_proj", c.qkv_dim)]
                if fused
                else [
                    (h + "self_attn.q_proj", q_dim),
                    (h + "self_attn.k_proj", c.kv_dim),
                    (h + "self_attn.v_proj", c.kv_dim),
                ],
                "attn.proj": [(h + "self_attn.o_proj", c.n_embd)],
                "mlp.fc": [(h + "mlp.gate_up_proj", fc_rows)]
                if fused
                else [(h + "mlp.gate_proj", c.intermediate_size), (h + "mlp.up_proj", c.intermediate_size)],
                "mlp.proj": [(h + "mlp.down_proj", c.n_embd)],
            }
        else:
            parts = {
                "attn.qkv": [(ours["attn.qkv"], c.qkv_dim)],
                "attn.proj": [(ours["attn.proj"], c.n_embd)],
                "mlp.fc": [(ours["mlp.fc"], fc_rows)],
                "mlp.proj": [(ours["mlp.proj"], c.n_embd)],
            }
        out.update({ours[t]: parts[t] for t in BLOCK_TARGETS})
    out["lm_head"] = [("lm_head", c.vocab_size)]
    return out


def _suffix(module: str) -> str:
    """The target_modules entry for a module: its name without the layer prefix (attn.c_attn, q_proj, lm_head)."""
    for prefix in (
        r"transformer\.h\.\d+\.",
        r"model\.layers\.\d+\.self_attn\.",
        r"model\.layers\.\d+\.mlp\.",
        r"blocks\.\d+\.",
    ):
        if re.match(prefix, module):
            return re.sub(prefix, "", module, count=1)
    return module


# ------------------------------------------------------------------------------------------ writing


def save_adapter(
    folder: str | os.PathLike, model, *, base: str, digest: str | None, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write the LoRA layers of `model` (lmforge.lora.add_lora) as a PEFT adapter folder, atomically."""
    adapter = adapter_of(model)
    dropout = next((float(getattr(m.dropout, "p", 0.0)) for m in lora_layers(model).values()), 0.0)
    names = module_map(model.config)
    ranks = Counter(w.rank for w in adapter.layers.values())
    alphas = Counter(w.scale * w.rank for w in adapter.layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    tensors, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    for path, w in adapter.layers.items():
        row = 0
        for module, rows in names[path]:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = w.A.float().clone()  # each part its own copy of A
            tensors[f"{PREFIX}{module}.lora_B.weight"] = w.B[row : row + rows].float().contiguous()
            row += rows
            targets.add(_suffix(module))
            if w.rank != r:
                rank_pattern[module] = w.rank
            if w.scale * w.rank != alpha:
                alpha_pattern[module] = w.scale * w.rank
    try:
        family = hf_family(model.config)
    except UnsupportedModelError:
        family = None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(targets),
        "fan_in_fan_out": family == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    metadata = {"format": "pt", **({DIGEST_KEY: digest} if digest is not None else {})}

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata=metadata)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(folder, write)


# ------------------------------------------------------------------------------------------ reading


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """An adapter folder, or a fine-tuning run folder holding one in adapter/."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    for folder in (path, path / "adapter"):
        if (folder / ADAPTER_CONFIG).is_file():
            return folder
    raise CheckpointError(
        f"{path} holds no {ADAPTER_CONFIG}: not a LoRA adapter folder (make one with "
        f"`lmforge finetune BASE --method lora --out DIR`, or with peft)"
    )


def _read_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not weights.is_file():
        raise CheckpointError(f"adapter weights missing: {weights}")
    try:
        with safe_open(weights, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}); it may be truncated") from None


def read_adapter(path: str | os.PathLike, config: ModelConfig) -> Adapter:
    """The adapter at `path` (a PEFT folder, lmforge's earlier format, or a fine-tuning run holding either), its
    layers named by lmforge's module paths for a model of `config`."""
    folder = resolve_adapter_dir(path)
    settings = read_json(folder / ADAPTER_CONFIG, "adapter config", CheckpointError)
    tensors, metadata = _read_tensors(folder / ADAPTER_WEIGHTS)
    if settings.get("method") == "lora":
        return _read_lmforge(folder, settings, tensors)
    if settings.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG} is a {settings.get('peft_type')!r} adapter; lmforge reads "
            f'LoRA adapters (peft_type "LORA")'
        )
    for key in UNSUPPORTED:
        if settings.get(key) not in (None, False, "none", [], {}):
            raise CheckpointError(
                f"{folder / ADAPTER_CONFIG} sets {key}={settings[key]!r}: lmforge applies plain LoRA updates only"
            )
    parts = _peft_parts(folder, settings, tensors, config)
    return Adapter(_fuse(parts, config), settings.get("base_model_name_or_path"), metadata.get(DIGEST_KEY), str(folder))


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path that ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _peft_parts(folder: Path, settings: dict, tensors: dict, config: ModelConfig) -> dict[str, list]:
    """lmforge path -> [(row offset, rows, A, B, scale)] of the PEFT modules that hold its parts."""
    where: dict[str, tuple[str, int, int]] = {}  # module (either naming) -> (our path, row offset, rows)
    for path, modules in module_map(config).items():
        row = 0
        for module, rows in modules:
            where[module] = (path, row, rows)
            row += rows
        if len(modules) == 1:
            where[path] = (path, 0, modules[0][1])  # lmforge's own names, as written for a model without HF form
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])(?:\.\w+)?\.weight", name)
        if m is None:
            raise CheckpointError(
                f"{folder / ADAPTER_WEIGHTS} holds {name!r}, which is not a LoRA layer's A or B "
                f"(embedding LoRA and saved modules are not supported)"
            )
        found.setdefault(m.group(1), {})[m.group(2)] = t
    parts: dict[str, list] = {}
    alpha, rslora = settings.get("lora_alpha", 8), bool(settings.get("use_rslora"))
    for module, ab in sorted(found.items()):
        if module not in where:
            raise CheckpointError(
                f"adapter {folder} adapts {module}, which a {config.n_layer}-layer "
                f"{config.extra.get('model_type', config.name)} model does not have (or lmforge "
                f"cannot adapt: its linear layers only)"
            )
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"adapter {folder}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        path, row, rows = where[module]
        A, B = ab["A"].float(), ab["B"].float()
        rank = A.shape[0]
        a = _pattern(settings.get("alpha_pattern") or {}, module, alpha)
        scale = a / (math.sqrt(rank) if rslora else rank)
        if B.shape[0] != rows or B.shape[1] != rank:
            raise CheckpointError(
                f"adapter {folder}: {module}.lora_B has shape {tuple(B.shape)}, the model's layer "
                f"needs ({rows}, {rank})"
            )
        parts.setdefault(path, []).append((row, rows, A, B, scale))
    if not parts:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} holds no LoRA tensors")
    return parts


def _fuse(parts: dict[str, list], config: ModelConfig) -> dict[str, LoRAWeights]:
    """One LoRAWeights per lmforge layer: a single part as it is, several stacked (summed rank, block B)."""
    out_rows = {path: sum(rows for _, rows in modules) for path, modules in module_map(config).items()}
    layers = {}
    for path, ps in parts.items():
        if len(ps) == 1 and ps[0][1] == out_rows[path]:
            _, _, A, B, scale = ps[0]
            layers[path] = LoRAWeights(A, B, scale)
            continue
        A = torch.cat([p[2] for p in ps])  # (sum r, in)
        B = torch.zeros(out_rows[path], A.shape[0])
        col = 0
        for row, rows, a, b, scale in ps:
            B[row : row + rows, col : col + a.shape[0]] = b * scale
            col += a.shape[0]
        layers[path] = LoRAWeights(A, B, 1.0)
    return layers


def _read_lmforge(folder: Path, settings: dict, tensors: dict) -> Adapter:
    """lmforge's earlier format: rank, alpha and targets in adapter_config.json, tensors "<path>.lora_A/B"."""
    missing = [k for k in ("rank", "alpha", "targets", "base_digest") if k not in settings]
    if missing:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} lacks {', '.join(missing)}")
    scale = float(settings["alpha"]) / int(settings["rank"])
    paths = sorted({k.rsplit(".", 1)[0] for k in tensors})
    bad = [k for k in tensors if not re.search(r"\.lora_[AB]$", k)]
    if bad or any(f"{p}.lora_{m}" not in tensors for p in paths for m in "AB"):
        raise CheckpointError(f"adapter {folder}: tensors {(bad or paths)[:4]} are not pairs of <module>.lora_A/B")
    layers = {p: LoRAWeights(tensors[f"{p}.lora_A"].float(), tensors[f"{p}.lora_B"].float(), scale) for p in paths}
    return Adapter(layers, settings.get("base"), settings["base_digest"], str(folder))
