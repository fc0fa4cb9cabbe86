"""The model folder: config.json + model.safetensors + tokenizer (+ train_state.pt for training runs).

A folder is written whole or not at all: everything goes into a temporary sibling folder that is then swapped
in by rename, so a crash mid-save leaves the previous checkpoint intact. Loading checks what it reads and
names the file and the fix when something is wrong (truncated, foreign or corrupted weights).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.fsutil import default_mode, follow_umask
from lmforge.model import Transformer
from lmforge.tokenizer import TOKENIZER_FILES, load_tokenizer

CONFIG_FILE, WEIGHTS_FILE, TRAIN_STATE_FILE = "config.json", "model.safetensors", "train_state.pt"


class CheckpointError(LmforgeError):
    """A model folder that cannot be loaded; the message names the file and what is wrong."""


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes, so a shuffled or altered tensor is caught at load time."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (safetensors stores each buffer once)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


def recover_folder(folder: Path) -> None:
    """Put the previous copy of `folder` back if a `write_folder` was killed between its two renames."""
    if folder.exists():
        return
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], folder)


def write_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_folder) and swap the result in for `folder`: readers see the old or the new contents.

    Directories cannot be renamed over each other, so the old folder moves aside first; a process killed between
    the two renames leaves it as `.NAME.old-PID`, which `recover_folder` (called by every reader) puts back. The
    folder being written is `.NAME.tmp-PID-*`: the PID tells `clean_stale_folders` whether its writer is alive.
    """
    folder = Path(folder)
    recover_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    default_mode(tmp, directory=True)
    try:
        write(tmp)
        follow_umask(tmp)
        for f in tmp.iterdir():
            if f.is_dir():  # a subfolder (a sharded checkpoint's files) syncs its own files as it writes them
                continue
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?|[a-z0-9_]{8})$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_folders(parent: str | os.PathLike, names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove what killed `write_folder`s left in `parent` (for the folders `names`, or all): their half-written
    `.NAME.tmp-PID-*` and, where NAME is back, `.NAME.old-PID` (a missing NAME gets it back, as `recover_folder`
    does). A folder whose writer is still alive is left alone; one from before names carried a PID
    (`.NAME.XXXXXXXX`) is taken for stale once it is an hour old. Returns what was removed."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    for path in sorted(parent.iterdir()):
        m = _TEMPORARY.match(path.name)
        if not m or not path.is_dir() or (names is not None and m["name"] not in names):
            continue
        if m["pid"] is not None and _alive(int(m["pid"])):
            continue
        if m["pid"] is None and time.time() - path.stat().st_mtime < 3600:
            continue
        if m["kind"] == "old" and not (parent / m["name"]).exists():
            recover_folder(parent / m["name"])
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_model_files(tmp: Path, model: torch.nn.Module, config: ModelConfig, tokenizer=None) -> None:
    """Write config, weights and tokenizer into `tmp` (a folder being built by write_folder)."""
    tensors = model_tensors(model)
    (tmp / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "lmforge_sha256": tensors_digest(tensors)})
    if tokenizer is not None:
        tokenizer.save(tmp)


def save_model(
    folder: str | os.PathLike,
    model: Transformer,
    tokenizer=None,
    train_state: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save a model folder atomically; `train_state` (optimizer, scheduler, RNG, step) goes to train_state.pt."""

    def write(tmp: Path) -> None:
        save_model_files(tmp, model, model.config, tokenizer)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(folder, write)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model folder, or a training run folder (whose best/ checkpoint, else last/, is taken)."""
    path = Path(path)
    recover_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if (path / CONFIG_FILE).exists():
        return path
    for sub in ("best", "last"):
        recover_folder(path / sub)
        if (path / sub / CONFIG_FILE).exists():
            return path / sub
    raise CheckpointError(
        f"{path} holds no {CONFIG_FILE}: not an lmforge model folder or training run "
        f"(make one with `lmforge train`, or import one with `lmforge import`)"
    )


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"weights file missing: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or "
            f"corrupt: re-save or re-download it"
        ) from None
    expected = metadata.get("lmforge_sha256")
    if expected and tensors_digest(tensors) != expected:
        raise CheckpointError(
            f"{path}: weights do not match the checksum recorded when they were saved; "
            f"the file was altered or corrupted after saving"
        )
    return tensors, metadata


def load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load tensors into model with every name and shape checked (tied weights may be absent)."""
    own = model.state_dict()
    kept = model_tensors(model)  # tied duplicates are not stored
    missing = [n for n in kept if n not in tensors]
    unexpected = [n for n in tensors if n not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}; is it a checkpoint of another architecture?"
        )
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(t.shape)}, the config in "
                f"{path.parent / CONFIG_FILE} expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=False)


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_tokenizer: bool = True,
    build: Callable[[ModelConfig], torch.nn.Module] | None = None,
):
    """Load (model, tokenizer) from a model folder or training run; the tokenizer is None when absent.

    `build(config)` makes the empty model the weights go into: a plain Transformer by default. Quantized weights
    need their quantized layers built first (lmforge.infer.quantize.build_model), which lmforge.loader.load
    passes; this layer knows nothing of quantization and refuses such a folder by default.
    """
    folder = resolve_model_dir(path)
    try:
        config = ModelConfig.from_file(folder / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None
    if build is None:
        if config.quantization:
            raise CheckpointError(
                f"{folder} holds {config.quantization}-quantized weights: load it with "
                f"lmforge.loader.load, which builds the quantized layers"
            )
        build = Transformer
    if not (folder / WEIGHTS_FILE).exists() and (folder / "sharded").is_dir():
        raise CheckpointError(
            f"{folder} is a sharded FSDP checkpoint (its weights are split across "
            f"{folder / 'sharded'}); resume it under torchrun with --fsdp, or make a normal model "
            f"folder from it with lmforge.train.distributed.consolidate"
        )
    tensors, _ = read_weights(folder / WEIGHTS_FILE)
    model = build(config)
    load_state(model, tensors, folder / WEIGHTS_FILE)
    model.eval().to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    tokenizer = None
    if with_tokenizer and any((folder / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(folder, config.vocab_size)
    return model, tokenizer


def load_train_state(path: str | os.PathLike) -> dict:
    recover_folder(Path(path))
    path = Path(path) / TRAIN_STATE_FILE
    if not path.exists():
        raise CheckpointError(
            f"no training state in {path.parent} ({TRAIN_STATE_FILE} missing): "
            f"it is a model folder, not a resumable training checkpoint"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a damaged pickle/zip
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
