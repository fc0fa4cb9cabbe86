"""Corpora: text in, split into train / val (/ test) documents; nothing here tokenizes (lmforge.data does).

A corpus is one of:
- a text file: the first `1 - val_fraction` of its characters train, the rest validate (nanoGPT's
  `data[:int(n*0.9)]`);
- a folder of text files: whole files are held out for validation by a stable hash of their relative path, so a
  file stays on its side whatever else is added to the folder;
- a folder of given splits (`train.txt`, `valid.txt` or `val.txt`, optional `test.txt`, as WikiText-2): used as is;
- a built-in name: `python-stdlib` (the running interpreter's standard library sources, on every machine) or
  `tinyshakespeare` (downloaded once, checked against its sha256).

A corpus of files (a folder, `python-stdlib`) can also hold out whole files by name (`holdout_files`: paths or
glob patterns; `default` is `STDLIB_HOLDOUT` for `python-stdlib`). They become the `test` split, which neither
training nor the tokenizer ever sees: the files for a code-completion evaluation (docs/code-completion.md).

All text is read as UTF-8 with universal newlines, as Python's `open()` in text mode reads it.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import http.client
import os
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_path, sha256_file


class DataError(LmforgeError):
    """Bad data input: a missing or undecodable file, an empty corpus, a failed download, a missing split."""


# ------------------------------------------------------------------------------------------ reading


def _decode(raw: bytes, path: Path, errors: str) -> str:
    if errors not in ("strict", "replace"):
        raise DataError(f"errors={errors!r} is not supported; use 'strict' or 'replace'")
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} ({e.reason}); "
            "re-run with --errors replace to replace undecodable bytes with U+FFFD, or fix the file"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """Read a UTF-8 text file. `errors="replace"` turns undecodable bytes into U+FFFD instead of failing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    return _decode(path.read_bytes(), path, errors)


# ------------------------------------------------------------------------------------------ download


def download(url: str, dest: str | os.PathLike, sha256: str, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, streamed to a temporary file beside it and renamed only once its sha256 matches.

    On any failure (HTTP error, network error, checksum mismatch) nothing is left at or beside `dest`.
    """
    dest = Path(dest)
    try:
        with atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                while block := response.read(1 << 16):
                    digest.update(block)
                    f.write(block)
            if digest.hexdigest() != sha256:
                raise DataError(
                    f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; "
                    "the file changed upstream or the transfer was corrupted, so it was not kept"
                )
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"download of {url} failed ({reason}); check the network, or download it yourself and pass {{param}}",
            param="from_file",
        ) from None
    return dest


# ------------------------------------------------------------------------------------------ corpora

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTIN_CORPORA = ("python-stdlib", "tinyshakespeare")
# Not code anyone writes: third-party packages, test suites, `encodings/` (generated codec tables, which a small
# model trained on a sample would otherwise learn to recite) and `pydoc_data/` (one generated 750k-character dict
# of help texts, 7 % of the library, which would otherwise be a validation set's bulk or a sample's).
STDLIB_SKIP_DIRS = ("site-packages", "dist-packages", "test", "tests", "idlelib/idle_test", "encodings", "pydoc_data")
SPLITS = ("train", "val", "test")
# The python-stdlib files `holdout_files=["default"]` holds out: ordinary, self-contained modules of every kind of
# code (text processing, parsing, data structures, scheduling), present from Python 3.9 on; 112k characters in 3.11.
STDLIB_HOLDOUT = (
    "fnmatch.py",
    "getopt.py",
    "glob.py",
    "graphlib.py",
    "html/parser.py",
    "json/decoder.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "textwrap.py",
)
DEFAULT_HOLDOUT = "default"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lmforge"


@dataclass
class Document:
    """One unit of text: a file, or a piece of one. Documents are separated by the tokenizer's eos token."""

    name: str
    text: str


@dataclass
class Corpus:
    source: str
    splits: dict[str, list[Document]]  # "train", "val" and maybe "test"
    split_method: str  # "tail", "file-hash" or "given"
    holdout: list[str] = field(default_factory=list)  # names of the files held out as the "test" split


def _relative_files(root: Path, skip_dirs: Sequence[str] = ()) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted; hidden files and folders are skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and d not in skip_dirs and (rel_folder / d).as_posix() not in skip_dirs
        ]
        for name in files:
            if not name.startswith(".") and (Path(folder) / name).is_file():
                found.append((rel_folder / name).as_posix())
    return sorted(found)


def _read_documents(root: Path, names: Sequence[str], errors: str, max_chars: int | None) -> list[Document]:
    """Read files in order until `max_chars` is reached (the last one cut to fit); skip binary (NUL) files."""
    docs, total = [], 0
    for name in names:
        if max_chars is not None and total >= max_chars:
            break
        raw = (root / name).read_bytes()
        if b"\0" in raw:
            continue
        text = _decode(raw, root / name, errors)
        if max_chars is not None:
            text = text[: max_chars - total]
        docs.append(Document(name, text))
        total += len(text)
    return docs


def python_stdlib_files() -> tuple[Path, list[str]]:
    """The running interpreter's standard library `.py` files, without third-party packages and test suites.

    They come in a stable pseudo-random order (by a salted sha256 of their names), so that a `max_chars` cap takes
    a sample of the whole library rather than its alphabetically first packages (mostly `encodings/` tables). The
    salt keeps the order independent of the validation coin (`_held_out`, the unsalted hash): ordered by the same
    hash, the validation files would all come first and a capped corpus would validate on far more than
    `val_fraction` of it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [name for name in _relative_files(root, STDLIB_SKIP_DIRS) if name.endswith(".py")]
    return root, sorted(names, key=lambda name: hashlib.sha256(b"order:" + name.encode()).hexdigest())


def fetch_tinyshakespeare(
    cache_dir: str | os.PathLike, from_file: str | os.PathLike | None = None, timeout: float = 60.0
) -> Path:
    """Path of a verified tiny Shakespeare `input.txt`: `from_file` if given, else cached or downloaded."""
    if from_file is not None:
        from_file = Path(from_file)
        if not from_file.is_file():
            raise DataError(f"{{param}} {from_file} does not exist", param="from_file")
        actual = sha256_file(from_file)
        if actual != TINYSHAKESPEARE_SHA256:
            raise DataError(
                f"{{param}} {from_file} has sha256 {actual}, but tiny Shakespeare's input.txt has "
                f"{TINYSHAKESPEARE_SHA256}; point {{param}} at an unmodified copy of {TINYSHAKESPEARE_URL}",
                param="from_file",
            )
        return from_file
    cached = Path(cache_dir) / "tinyshakespeare" / "input.txt"
    if cached.is_file() and sha256_file(cached) == TINYSHAKESPEARE_SHA256:
        return cached
    return download(TINYSHAKESPEARE_URL, cached, TINYSHAKESPEARE_SHA256, timeout)


# ------------------------------------------------------------------------------------------ splits


def _held_out(name: str, val_fraction: float) -> bool:
    """A stable per-file coin: sha256 of the relative path read as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64 < val_fraction


def _tail_split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """The first `1 - val_fraction` of the characters train; the document straddling the cut is cut in two."""
    total = sum(len(d.text) for d in docs)
    cut = int(total * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)]
    train, val, seen = [], [], 0
    for doc in docs:
        if seen + len(doc.text) <= cut:
            train.append(doc)
        elif seen >= cut:
            val.append(doc)
        else:
            k = cut - seen
            train.append(Document(doc.name, doc.text[:k]))
            val.append(Document(doc.name, doc.text[k:]))
        seen += len(doc.text)
    return train, val


def _hash_split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document], str]:
    train = [d for d in docs if not _held_out(d.name, val_fraction)]
    val = [d for d in docs if _held_out(d.name, val_fraction)]
    if any(d.text for d in train) and any(d.text for d in val):
        return train, val, "file-hash"
    return (*_tail_split(docs, val_fraction), "tail")  # too few files for whole-file hold-out


def _given_split_files(folder: Path) -> dict[str, Path] | None:
    if not (folder / "train.txt").is_file():
        return None
    val = next((folder / n for n in ("valid.txt", "val.txt") if (folder / n).is_file()), None)
    if val is None:
        raise DataError(
            f"{folder} has train.txt but no valid.txt or val.txt; add a validation file, "
            "or rename train.txt to use the folder as plain text files"
        )
    files = {"train": folder / "train.txt", "val": val}
    if (folder / "test.txt").is_file():
        files["test"] = folder / "test.txt"
    return files


def match_holdout(names: Sequence[str], patterns: Sequence[str], source: str) -> list[str]:
    """The names of `names` that `patterns` hold out, sorted.

    A pattern is a relative path ("json/decoder.py") or an fnmatch glob on it ("json/*", "*parser.py"; `*` also
    crosses `/`); `default` stands for STDLIB_HOLDOUT when the source is python-stdlib. A pattern that matches
    nothing is an error, so a misspelt name never silently trains on the file it meant to hold out.
    """
    expanded: list[str] = []
    for pattern in patterns:
        if pattern == DEFAULT_HOLDOUT:
            if source != "python-stdlib":
                raise DataError(
                    f"holdout_files {DEFAULT_HOLDOUT!r} is the default held-out set of python-stdlib; "
                    f"for {source} name the files or glob patterns to hold out"
                )
            expanded.extend(STDLIB_HOLDOUT)
        else:
            expanded.append(pattern)
    known, held = set(names), set()
    for pattern in expanded:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern not in known else [pattern]
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else " (names are paths relative to the corpus root, such as json/decoder.py, or glob patterns)"
            )
            raise DataError(f"held-out file {pattern!r} matches no file of {source}{hint}")
        held.update(hits)
    if held >= known:
        raise DataError(f"holdout_files hold out all {len(known)} files of {source}, leaving nothing to train on")
    return sorted(held)


def load_corpus(
    source: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    errors: str = "strict",
    cache_dir: str | os.PathLike | None = None,
    from_file: str | os.PathLike | None = None,
    max_chars: int | None = None,
    holdout_files: Sequence[str] | None = None,
) -> Corpus:
    """Read `source` (file, folder, folder of given splits, or built-in name) and split it.

    `max_chars` keeps the first that many characters, in reading order (for given splits: of each split).
    `holdout_files` (folders and python-stdlib only) moves whole files to a "test" split before the rest is
    split into train / val; they are read whole, whatever `max_chars` says.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    if max_chars is not None and max_chars < 1:
        raise DataError(f"max_chars={max_chars} must be a positive number of characters, or None for no cap")
    name, path = str(source), Path(source)
    if from_file is not None and not (name == "tinyshakespeare" and not path.exists()):
        raise DataError(f"from_file is only for the built-in tinyshakespeare corpus, not for source {name!r}")

    def cap(text: str) -> str:
        return text if max_chars is None else text[:max_chars]

    def files_corpus(root: Path, names: list[str]) -> Corpus:
        held = match_holdout(names, holdout_files, name) if holdout_files else []
        held_set = set(held)
        docs = _read_documents(root, [n for n in names if n not in held_set], errors, max_chars)
        if not docs:
            raise DataError(f"folder {root} holds no text files (hidden and binary files are skipped)")
        train, val, method = _hash_split(docs, val_fraction)
        splits = {"train": train, "val": val}
        if held:
            splits["test"] = [d for d in _read_documents(root, held, errors, None) if d.text]
            if not splits["test"]:
                raise DataError(f"the held-out files of {name} ({', '.join(held)}) are empty or binary")
        return Corpus(name, splits, method, [d.name for d in splits.get("test", [])])

    one_text = path.is_file() or (name == "tinyshakespeare" and not path.exists())
    if holdout_files and (one_text or (path.is_dir() and _given_split_files(path) is not None)):
        raise DataError(
            f"holdout_files holds out whole files, so it needs a folder of files or python-stdlib; "
            f"{name} is a single text, or a folder of given splits (use its test.txt instead)"
        )

    if path.is_file():
        train, val = _tail_split([Document(path.name, cap(read_text(path, errors)))], val_fraction)
        return Corpus(name, {"train": train, "val": val}, "tail")
    if path.is_dir():
        given = _given_split_files(path)
        if given is not None:
            splits = {split: [Document(f.name, cap(read_text(f, errors)))] for split, f in given.items()}
            return Corpus(name, splits, "given")
        return files_corpus(path, _relative_files(path))
    if name == "python-stdlib":
        return files_corpus(*python_stdlib_files())
    if name == "tinyshakespeare":
        file = fetch_tinyshakespeare(default_cache_dir() if cache_dir is None else cache_dir, from_file)
        train, val = _tail_split([Document("input.txt", cap(read_text(file, errors)))], val_fraction)
        return Corpus(name, {"train": train, "val": val}, "tail")
    raise DataError(f"{name!r} is not an existing file or folder, nor a built-in corpus ({', '.join(BUILTIN_CORPORA)})")
