"""Hugging Face model folders <-> lmforge models, for every family in lmforge.interop.hf_families.

A Hugging Face folder holds config.json (with "model_type"), weights (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin), tokenizer.json, tokenizer_config.json (which carries the
chat template) and generation_config.json (its eos_token_id may list several tokens that end a turn). Import reads
them from local disk; export writes a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

What differs between families (config keys, weight names, fused projections, Gemma's norm offset) lives in one
converter class per family (hf_families.py); this module reads and writes the folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import CheckpointError, load_state, model_tensors, write_folder
from lmforge.config import ModelConfig
from lmforge.fsutil import read_json
from lmforge.interop.hf_families import FAMILIES, UnsupportedModelError, family_for, family_of
from lmforge.model import Transformer

# Copied into the lmforge folder on import: the chat template (tokenizer_config.json's "chat_template", or
# chat_template.jinja, which transformers 5 writes and which wins) and generation_config.json's stop tokens.
KEPT_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")

__all__ = [
    "UnsupportedModelError",
    "FAMILIES",
    "config_from_hf",
    "hf_family",
    "hf_config_from",
    "import_hf",
    "export_hf",
    "eos_ids",
    "load_hf_state_dict",
    "convert_hf_to_lmforge",
    "convert_lmforge_to_hf",
]


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (a dict); UnsupportedModelError names what cannot be run.

    `name` (e.g. the folder's name) becomes the config's name; by default the model_type.
    """
    model_type = hf_config.get("model_type")
    return family_of(model_type).config(hf_config, name or model_type)


def hf_family(config: ModelConfig) -> str:
    """The Hugging Face model_type that represents our config exactly, else UnsupportedModelError saying why."""
    return family_for(config).model_type


def hf_config_from(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
) -> dict:
    """The Hugging Face config.json dict for our config, in the family it was imported from (or GPT-2, Llama)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return family_for(config).hf_config(config) | {
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def eos_ids(generation_config: bytes | str | None, fallback: int | None = None) -> list[int]:
    """The tokens that end a turn: generation_config.json's eos_token_id (an id or a list of them), else
    `fallback` (the tokenizer's EOS). Llama 3 instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>."""
    ids = None
    if generation_config:
        try:
            ids = json.loads(generation_config).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ids = None
    ids = [ids] if isinstance(ids, int) else [i for i in ids if isinstance(i, int)] if isinstance(ids, list) else []
    if fallback is not None and fallback not in ids:
        ids = [fallback, *ids]
    return ids


# --------------------------------------------------------------------------------------------- weights


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    folder = Path(folder)
    single, index, pt = (
        folder / "model.safetensors",
        folder / "model.safetensors.index.json",
        folder / "pytorch_model.bin",
    )
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index, "safetensors index", CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a safetensors index: it needs a 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif pt.is_file():
        try:
            return dict(torch.load(pt, map_location="cpu", weights_only=True))
        except Exception as e:  # a damaged zip/pickle raises many kinds
            raise CheckpointError(f"{pt} cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
    else:
        raise CheckpointError(
            f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weights shard {f} (listed in {index.name}) is missing")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it may be truncated") from None
    return tensors


def _strip(name: str) -> str:
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def convert_hf_to_lmforge(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (transpose, concatenate, offset: the family's converter) Hugging Face tensors into our names.

    A tensor that is neither used nor a known derived buffer raises CheckpointError (so an unsupported feature is
    not silently dropped); missing ones are reported by lmforge.checkpoint.load_state.
    """
    family = family_of(config.extra.get("model_type", "llama" if config.pos == "rope" else "gpt2"))
    sd = {_strip(k): v for k, v in state_dict.items()}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise CheckpointError(
                f"Hugging Face weights lack {name!r} (needed for a {family.model_type} model with "
                f"{config.n_layer} layers); is config.json from the same model?"
            )
        used.add(name)
        return sd[name]

    out = family.to_ours(take, config)
    head, emb = sd.get("lm_head.weight"), out["tok_emb.weight"]
    if config.tie_embeddings and head is not None and not torch.equal(head, emb):
        raise CheckpointError(
            "config.json says tie_word_embeddings=true but lm_head.weight differs from the token "
            "embedding; the config does not describe these weights"
        )
    left = sorted(k for k in sd if k not in used and k != "lm_head.weight" and not k.endswith(family.derived))
    if left:
        raise CheckpointError(
            f"Hugging Face weights hold tensors lmforge would ignore: {left[:5]}"
            f"{'...' if len(left) > 5 else ''}; the config may not describe these weights"
        )
    return {k: v.contiguous() for k, v in out.items()}


def convert_lmforge_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, laid out as transformers stores them (tied head omitted)."""
    c = model.config
    out = family_for(c).to_hf(model_tensors(model), c)
    return {k: v.detach().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ import/export


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    d = read_json(path, "Hugging Face model config", CheckpointError)
    if "model_type" not in d:
        raise CheckpointError(f"{path} has no 'model_type': not a Hugging Face model config")
    return d


def import_hf(folder: str | os.PathLike):
    """Load a Hugging Face folder from local disk.

    Returns (model, tokenizer, extras): the lmforge Transformer (float32, eval mode), a BPETokenizer from
    tokenizer.json (None when absent), and {file name: bytes} of tokenizer_config.json / generation_config.json
    to keep beside the model (pass as `extra_files` to lmforge.checkpoint.save_model). A generation_config.json
    is written from config.json's eos_token_id when the folder has none, so the stop tokens travel with the model.
    """
    folder = Path(folder)
    try:
        hf_config = read_hf_config(folder)
        config = config_from_hf(hf_config, name=folder.resolve().name)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} lacks a needed setting: {e!r}") from None
    tensors = convert_hf_to_lmforge(load_hf_state_dict(folder), config)
    model = Transformer(config)
    load_state(model, {k: v.float() for k, v in tensors.items()}, folder / "config.json")
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from lmforge.tokenizer import BPETokenizer

        tokenizer = BPETokenizer.from_file(folder / "tokenizer.json")
    extras = {name: (folder / name).read_bytes() for name in KEPT_FILES if (folder / name).is_file()}
    if "generation_config.json" not in extras and hf_config.get("eos_token_id") is not None:
        extras["generation_config.json"] = json.dumps({"eos_token_id": hf_config["eos_token_id"]}).encode()
    return model.eval(), tokenizer, extras


def export_hf(
    model: Transformer,
    tokenizer=None,
    out_dir: str | os.PathLike = "hf_model",
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors, generation_config.json, and for a
    BPE tokenizer tokenizer.json + tokenizer_config.json), atomically. `extra_files` (e.g. the
    tokenizer_config.json / generation_config.json kept at import) are written as given, replacing generated ones.

    Other tokenizer kinds (char, word, llama2.c) have no tokenizer.json form and are not written.
    """
    dtype = next(model.parameters()).dtype
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    ends = eos_ids((extra_files or {}).get("generation_config.json"), eos)
    config = hf_config_from(model.config, dtype, bos, ends[0] if len(ends) == 1 else ends or None)
    tensors = convert_lmforge_to_hf(model)
    generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if getattr(tokenizer, "kind", None) == "bpe":
            tokenizer.save(tmp)
            special = {
                f"{n}_token": tokenizer.tok.id_to_token(i) for n, i in (("bos", bos), ("eos", eos)) if i is not None
            }
            tok_config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": model.config.block_size,
                **special,
            }
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(out_dir, write)
