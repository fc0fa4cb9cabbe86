"""One loader: any model path -> the model ready to run, with its tokenizer and chat template.

What a path holds is decided by what is on disk, never by a flag:

- an lmforge model folder (config.json without "model_type", model.safetensors, a tokenizer file), or a training
  run folder (its best/ checkpoint, else last/): lmforge.checkpoint
- a Hugging Face folder (config.json with a "model_type"): converted as it is read, lmforge.interop.hf
- a model file, by its suffix (`FILE_READERS`): a llama2.c .bin, with the tokenizer llama2.c keeps beside it; a
  llama.cpp .gguf, with its embedded tokenizer and chat template (lmforge.interop.gguf_import)
- a preset name (lmforge.config.PRESETS) that is no path: random weights (seed 0), for benchmarks

Then, each step optional, in this order:

    read (float weights, CPU) -> merge a LoRA adapter (before anything rounds the weights) -> device and dtype
        -> int8 or int4 quantization -> decode preparation (the fused C++ step, else oneDNN-packed linear layers)

Every verb that runs a model loads it here: generate, chat, serve, eval, bench, explain, translate, finetune (its
base), and, with prepare=False to keep the weights as stored, quantize, import and export.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import CONFIG_FILE, load_model, load_state, resolve_model_dir
from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LmforgeError
from lmforge.fsutil import read_json
from lmforge.infer.fused import prepare_for_decoding
from lmforge.infer.quantize import build_model, check_mode, quantize_model, state_for
from lmforge.interop.hf import KEPT_FILES, import_hf
from lmforge.interop.llama2c import read_llama2c_model, tokenizer_beside
from lmforge.interop.peft import read_adapter, resolve_adapter_dir
from lmforge.lora import merge_adapter
from lmforge.model import Transformer
from lmforge.templates import JINJA_FILE, TEMPLATE_FILE, ChatTemplate, read_chat_template
from lmforge.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A loaded model and what travels with it."""

    model: Transformer
    tokenizer: Tokenizer | None  # None: the model came without one and none was given
    template_folder: Path | None = None  # where the chat template (tokenizer_config.json) is read; None: no folder
    extras: dict[str, bytes] = field(default_factory=dict)  # files to keep beside the model when it is saved again
    notes: list[str] = field(default_factory=list)  # what the reader did to the weights (GGUF: each tensor type)

    @property
    def eos_id(self) -> int | None:
        """The token that ends an output (the tokenizer's), or None."""
        return getattr(self.tokenizer, "eos_id", None)

    def chat_template(self) -> ChatTemplate:
        """The model's chat template (from its folder, else the one a model file embeds: `extras`), else the
        default for its tokenizer."""
        embedded = self.extras.get(JINJA_FILE) if self.template_folder is None else None
        if embedded:
            return ChatTemplate(embedded.decode("utf-8"), self.tokenizer)
        return ChatTemplate.for_model(self.template_folder, self.tokenizer)


def load(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    adapter: str | os.PathLike | None = None,
    prepare: bool = True,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Loaded:
    """Load whatever `path` holds (see the module docstring), in eval mode on `device`.

    Args:
        path: a model folder, training run, Hugging Face folder, model file or preset name.
        dtype: "float32", "bfloat16", "float16" (or a torch dtype); None keeps the stored one.
        quantize: "int8" (weight-only, per output channel) or "int4" (GGUF Q4_0's blocks) quantizes float weights
            on load; a model that is already quantized is left as it is.
        adapter: a LoRA adapter folder (PEFT's format or lmforge's earlier one, or the fine-tuning run holding
            one) merged into the weights; its chat template, when it has one, replaces the model's.
        prepare: make decoding fast (lmforge.infer.fused.prepare_for_decoding); False keeps the plain modules
            for code that saves, converts or trains the weights.
        tokenizer: a tokenizer file or folder to use instead of the one found with the model.
        device: where the model goes.
    """
    torch_dtype = _torch_dtype(dtype)
    if quantize is not None:
        check_mode(quantize)
    loaded = read(path, tokenizer)
    if adapter is not None:
        log.debug("merging the LoRA adapter %s", adapter)
        merge_adapter(loaded.model, read_adapter(adapter, loaded.model.config))
        folder = resolve_adapter_dir(adapter)
        if read_chat_template(folder) is not None:  # the template the adapter was trained with
            loaded.template_folder = folder
            loaded.extras[TEMPLATE_FILE] = (folder / TEMPLATE_FILE).read_bytes()
            loaded.extras.pop(JINJA_FILE, None)  # the base's chat_template.jinja would win over it
    model = loaded.model.to(device=device, dtype=torch_dtype).eval()
    if quantize is not None and model.config.quantization is None:
        log.debug("quantizing %s to %s", path, quantize)
        quantize_model(model, quantize)
    if prepare:
        prepare_for_decoding(model)  # in place
    return loaded


def read(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Loaded:
    """The model as stored (CPU, eval mode), its tokenizer (`tokenizer` overrides it), template folder and extras."""
    name = str(path)
    path = Path(path)
    if not path.exists():
        if name in PRESETS:
            log.debug("%s: a preset name, random weights", name)
            return _random_preset(name, tokenizer)
        raise FileNotFoundError(
            f"model not found: {path} (a model folder, training run, Hugging Face folder, "
            f"{', '.join(FILE_READERS)} file, or one of the presets {', '.join(PRESETS)})"
        )
    if path.is_file():
        reader = FILE_READERS.get(path.suffix)
        if reader is None:
            raise LmforgeError(
                f"cannot load {path}: a model is an lmforge or Hugging Face folder, or a "
                f"{' / '.join(FILE_READERS)} file",
                param="model",
            )
        log.debug("%s: a %s model file", path, path.suffix)
        return reader(path, tokenizer)
    hf = is_hf_folder(path)
    log.debug("%s: %s folder", path, "a Hugging Face" if hf else "an lmforge model or run")
    loaded = _read_hf(path) if hf else _read_lmforge(path, tokenizer is None)
    if tokenizer is not None:
        loaded.tokenizer = load_tokenizer(tokenizer, loaded.model.config.vocab_size)
    return loaded


def is_hf_folder(path: Path) -> bool:
    """A folder whose config.json names a Hugging Face "model_type" (lmforge's own config.json has none)."""
    try:
        return path.is_dir() and "model_type" in read_json(path / CONFIG_FILE, "model config")
    except (OSError, ValueError):  # no config.json, or not a JSON object: not a Hugging Face folder
        return False


# ------------------------------------------------------------------------------------------------ readers


def _read_lmforge(path: Path, with_tokenizer: bool) -> Loaded:
    folder = resolve_model_dir(path)
    model, tok = load_model(folder, with_tokenizer=with_tokenizer, build=build_model)
    return Loaded(model, tok, folder, _kept_files(folder))


def _read_hf(folder: Path) -> Loaded:
    model, tok, extras = import_hf(folder)
    return Loaded(model, tok, folder, extras)


def _read_llama2c(path: Path, tokenizer: str | os.PathLike | None) -> Loaded:
    model = read_llama2c_model(path)
    tok = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_beside(path), model.config.vocab_size)
    return Loaded(model, tok)


def _read_gguf(path: Path, tokenizer: str | os.PathLike | None) -> Loaded:
    from lmforge.interop.gguf_import import read_gguf  # the gguf package loads only for .gguf files

    done = read_gguf(path)
    model = build_model(done.config)  # quantized modules for an int8 / int4 file
    load_state(model, state_for(model, done.tensors), path)
    tok = load_tokenizer(tokenizer, done.config.vocab_size) if tokenizer is not None else done.tokenizer
    notes = [done.summary(), *done.notes]
    for note in notes:
        log.info("%s: %s", path, note)
    return Loaded(model.eval(), tok, None, done.extras, notes)


# Model files by suffix: reader(path, tokenizer override) -> Loaded.
FILE_READERS: dict[str, Callable[[Path, str | os.PathLike | None], Loaded]] = {
    ".bin": _read_llama2c,
    ".gguf": _read_gguf,
}


def _random_preset(name: str, tokenizer: str | os.PathLike | None) -> Loaded:
    with torch.random.fork_rng(devices=[]):  # the same weights every time, without touching the caller's RNG
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name(name)).eval()
    return Loaded(model, load_tokenizer(tokenizer, model.config.vocab_size) if tokenizer is not None else None)


def _kept_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in KEPT_FILES if (folder / name).is_file()}


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LmforgeError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
    return DTYPES[dtype]


__all__ = ["DTYPES", "FILE_READERS", "Loaded", "is_hf_folder", "load", "read"]
