"""Files: atomic writes (a file is either its old self or its complete new self, never half written), JSON
documents read with an error that names the file, and sha256 digests of files."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_mode(path: Path, directory: bool = False) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (mode 0600/0700) the mode a plain open/mkdir would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def follow_umask(folder: Path) -> None:
    """Give every file and folder under `folder` the mode a plain open/mkdir would. Some writers replace the
    file they are given with their own temporary one, mode 0600: safetensors' save_file does."""
    for path in folder.rglob("*"):
        if not path.is_symlink():
            default_mode(path, directory=path.is_dir())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    On an exception the temporary file is removed and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    default_mode(tmp)
    try:
        yield tmp
        default_mode(tmp)  # again: the writer may have replaced the file (safetensors' save_file does, 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(
    path: str | os.PathLike, what: str, error: type[Exception] = LmforgeError, fix: str | None = None
) -> dict[str, Any]:
    """The JSON object in `path`, a `what` ("model config", "adapter config", ...).

    A missing file raises FileNotFoundError; a file that is not UTF-8 JSON holding an object raises `error`
    (the caller's own error class) naming `what`, the file and the problem, followed by `fix` when given.
    """
    path = Path(path)
    hint = f"; {fix}" if fix else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON ({e}){hint}") from None
    if not isinstance(value, dict):
        raise error(f"{what} {path} must hold a JSON object, got {type(value).__name__}{hint}")
    return value


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def published_digest_mismatch(path: Path, published: dict[str, str]) -> str | None:
    """Why `path` is not the published file of its name (a message for the caller's error), or None when its name
    is not in `published` (name -> sha256) or its digest matches.

    A same-size copy with the right header but shuffled or altered elements loads and runs, writing garbage; the
    digest is the only check that catches it.
    """
    expected = published.get(path.name)
    if expected is None:
        return None
    actual = sha256_file(path)
    if actual == expected:
        return None
    return (
        f"{path}: sha256 {actual} differs from the published {path.name} ({expected}); the file was altered "
        f"or its elements may have been shuffled (a same-size copy with the right header but wrong weights "
        f"runs and writes garbage). Use the original file, or pass verify=False to load it anyway"
    )
