"""Checkpoint interop: load whatever a path holds (lmforge folder, Hugging Face folder, llama2.c file), import it
into an lmforge model folder, or export an lmforge model to Hugging Face format or a GGUF file
(lmforge.interop.gguf).

`load_any` is what generate and serve call: it decides by what is on disk, never by a flag.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.checkpoint import CONFIG_FILE, CheckpointError, load_model, resolve_model_dir, save_model
from lmforge.interop.hf import KEPT_FILES, export_hf, import_hf
from lmforge.interop.llama2c import TOKENIZER_FILE as LLAMA2C_TOKENIZER_FILE
from lmforge.interop.llama2c import Llama2cTokenizer, read_llama2c_model
from lmforge.tokenizer import TOKENIZER_FILES, BPETokenizer, load_tokenizer

LLAMA2C_TOKENIZER_NAMES = ("tok512.bin", "tokenizer.bin")  # looked for beside a llama2.c model file
FOLDER_TOKENIZER_FILES = (LLAMA2C_TOKENIZER_FILE, *TOKENIZER_FILES)


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json names a Hugging Face "model_type" (lmforge's own config.json has none)."""
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def load_tokenizer_path(path: str | os.PathLike, vocab_size: int):
    """A tokenizer from a file or folder: a llama2.c .bin, a tokenizer.json, or an lmforge/HF folder."""
    path = Path(path)
    if path.is_dir():
        if (path / LLAMA2C_TOKENIZER_FILE).is_file():
            return Llama2cTokenizer.from_file(path / LLAMA2C_TOKENIZER_FILE, vocab_size)
        return load_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return BPETokenizer.from_file(path)
    return Llama2cTokenizer.from_file(path, vocab_size)


def _llama2c_tokenizer_beside(model_file: Path) -> Path:
    for name in LLAMA2C_TOKENIZER_NAMES:
        if (model_file.parent / name).is_file():
            return model_file.parent / name
    raise FileNotFoundError(f"no tokenizer for the llama2.c model {model_file}: none of "
                            f"{', '.join(LLAMA2C_TOKENIZER_NAMES)} is beside it; pass --tokenizer PATH "
                            f"(the llama2.c tokenizer .bin the model was trained with)")


def load_source(path: str | os.PathLike, tokenizer: str | None = None):
    """(model, tokenizer, extras) for whatever `path` is; extras are files to keep beside the model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file():
        if path.suffix != ".bin":
            raise ValueError(f"cannot load {path}: a model is an lmforge or Hugging Face folder, or a llama2.c "
                             f".bin file")
        model = read_llama2c_model(path)
        tok_path = Path(tokenizer) if tokenizer else _llama2c_tokenizer_beside(path)
        return model, load_tokenizer_path(tok_path, model.config.vocab_size), {}
    if is_hf_folder(path):
        model, tok, extras = import_hf(path)
    else:
        folder = resolve_model_dir(path)
        model, _ = load_model(folder, with_tokenizer=False)
        has_tokenizer = any((folder / name).is_file() for name in FOLDER_TOKENIZER_FILES)
        tok = load_tokenizer_path(folder, model.config.vocab_size) if has_tokenizer and not tokenizer else None
        extras = {name: (folder / name).read_bytes() for name in KEPT_FILES if (folder / name).is_file()}
    if tokenizer:
        tok = load_tokenizer_path(tokenizer, model.config.vocab_size)
    return model, tok, extras


def load_any(path: str | os.PathLike, tokenizer: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None):
    """(model, tokenizer) from an lmforge model folder or training run, a Hugging Face folder, or a llama2.c file.

    `tokenizer` overrides the tokenizer found with the model (a llama2.c .bin, a tokenizer.json or a folder);
    for a llama2.c model file without one, tok512.bin / tokenizer.bin beside it is used. The model is in
    eval mode on `device`, in `dtype` when given.
    """
    model, tok, _ = load_source(path, tokenizer)
    model = model.eval().to(device=device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model, tok


def import_command(source: str, out: str, tokenizer: str | None = None) -> None:
    """Import a Hugging Face folder or a llama2.c model file into an lmforge model folder.

    Args:
        source: a Hugging Face model folder (config.json + weights + tokenizer.json) or a llama2.c model .bin.
        out: the lmforge model folder to write (replaced atomically if it exists).
        tokenizer: the tokenizer to use instead of the one found with the model (for llama2.c: its tokenizer .bin).
    """
    model, tok, extras = load_source(source, tokenizer)
    save_model(out, model, tok, extra_files=extras)
    c = model.config
    print(f"imported {source} -> {out}: {c.n_layer} layers, {c.n_embd} dims, vocab {c.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M parameters, tokenizer {getattr(tok, 'kind', None)}")


def export_command(model: str, out: str, format: Literal["hf", "gguf"] = "hf",
                   gguf_type: Literal["f32", "f16", "q8_0"] | None = None) -> None:
    """Export a model (lmforge folder, or anything `import` reads) to a Hugging Face folder or a GGUF file.

    Args:
        model: the lmforge model folder or training run to export (a Hugging Face folder or llama2.c .bin works too).
        out: the folder to write for "hf", the .gguf file for "gguf" (replaced atomically if it exists).
        format: the output format; "hf" loads with transformers.AutoModelForCausalLM.from_pretrained, "gguf" with
            llama.cpp (Llama and GPT-2 architectures, tokenizer embedded).
        gguf_type: GGUF type of the weight matrices: f32, f16 (default) or q8_0; norms and biases stay f32.
    """
    if format not in ("hf", "gguf"):
        raise ValueError(f"unknown export format {format!r}; choose 'hf' or 'gguf'")
    if gguf_type is not None and format != "gguf":
        raise ValueError(f"--gguf-type {gguf_type} applies to --format gguf only")
    m, tok, extras = load_source(model)
    if format == "gguf":
        from lmforge.interop.gguf import export_gguf

        done = export_gguf(m, tok, out, gguf_type or "f16", extras=extras)
        for note in done.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"exported {model} -> {out} (GGUF {done.arch}, {gguf_type or 'f16'}, tokenizer {done.tokenizer_model}, "
              f"{len(done.tensor_types)} tensors)")
        return
    if tok is not None and tok.kind != "bpe":
        print(f"note: a {tok.kind} tokenizer has no tokenizer.json form; only the model is exported", file=sys.stderr)
    export_hf(m, tok, out, extra_files=extras)
    print(f"exported {model} -> {out} (Hugging Face format)")


__all__ = ["load_any", "load_source", "import_command", "export_command", "is_hf_folder", "CheckpointError"]
