"""Data: corpora in, token memmaps out, batches for training and evaluation.

The flow is nanoGPT's `data/<name>/prepare.py` made general: read a corpus, split it into train / val
(/ test), train a tokenizer on the training text, encode every split and write each as one flat array of token
ids (`train.bin`, `val.bin`, ...) that `np.memmap` reads without loading it, plus the tokenizer and `meta.json`.
Training then samples random windows from the memmap (`random_batch`, as nanoGPT), or walks it in parallel
streams (`sequential_batches`, as PyTorch's `word_language_model`); evaluation scores each token once
(`eval_windows`).

The corpora themselves (files, folders, given splits, built-ins, held-out files) are lmforge.corpus's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lmforge.corpus import SPLITS, DataError, Document, load_corpus
from lmforge.fsutil import atomic_path, atomic_write_text, read_json
from lmforge.tokenizer import KINDS, Tokenizer, TokenizerError, load_tokenizer, train_tokenizer

# ------------------------------------------------------------------------------------------ prepare

CHUNK_CHARS = 1 << 18  # long texts are encoded in pieces of about this size, in parallel for BPE
BATCH_CHARS = 1 << 24  # characters handed to one encode_batch call


def _chunks(text: str) -> list[str]:
    """Cut `text` after a newline that is followed by a non-space character.

    Pre-tokenizers (GPT-2's regex, whitespace splitting) never join tokens across such a point, so encoding the
    pieces gives the same ids as encoding the whole, while letting `encode_batch` spread them over threads.
    """
    pieces, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = text.find("\n", start + CHUNK_CHARS)
        while cut != -1 and cut + 1 < len(text) and text[cut + 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1 or cut + 1 >= len(text):
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def encode_documents(tok: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """All documents as one flat id array, each followed by eos when the tokenizer has one.

    The word tokenizer already ends every line with `<eos>`, so it gets no extra separator.
    """
    dtype = token_dtype(tok.vocab_size)
    separator = None if tok.eos_id is None or tok.kind == "word" else np.array([tok.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    pending: list[tuple[str, bool]] = []  # (chunk, ends a document)

    def flush() -> None:
        for ids, ends_doc in zip(tok.encode_batch([c for c, _ in pending]), (e for _, e in pending)):
            parts.append(ids.astype(dtype))
            if ends_doc and separator is not None:
                parts.append(separator)
        pending.clear()

    pending_chars = 0
    for doc in docs:
        if not doc.text:
            continue
        chunks = _chunks(doc.text)
        for i, chunk in enumerate(chunks):
            pending.append((chunk, i == len(chunks) - 1))
            pending_chars += len(chunk)
            if pending_chars >= BATCH_CHARS:
                flush()
                pending_chars = 0
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    errors: str = "strict",
    cache_dir: str | os.PathLike | None = None,
    from_file: str | os.PathLike | None = None,
    max_chars: int | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    holdout_files: Sequence[str] | None = None,
) -> dict:
    """Turn a corpus into `train.bin`, `val.bin` (and `test.bin`), the tokenizer files and `meta.json`.

    Args:
        source: a text file, a folder, a folder of given splits, or "python-stdlib" / "tinyshakespeare".
        out_dir: the data folder to write; existing files there are replaced.
        tokenizer: "char", "word" or "bpe", trained on the training split (a char vocabulary is the
            character set of the whole corpus, as in nanoGPT, because it has no `<unk>` to fall back on).
        vocab_size: word vocabulary cap / BPE vocabulary size.
        val_fraction: share of the corpus held out for validation (ignored for given splits).
        errors: "strict" fails on invalid UTF-8, "replace" substitutes U+FFFD.
        cache_dir: where downloads are kept (default ~/.cache/lmforge).
        from_file: a local copy of the tinyshakespeare corpus, checked against its sha256.
        max_chars: cap on the characters read, for quick runs.
        tokenizer_from: a folder with a saved tokenizer to reuse instead of training one.
        holdout_files: files of a folder or python-stdlib (relative paths, glob patterns, or `default`) held
            out whole as the `test` split; the tokenizer is trained without them (a char vocabulary too).

    Returns:
        The metadata written to `meta.json`.

    Everything is read, trained and encoded before `out_dir` is touched, so bad input leaves an earlier data
    folder as it was. `meta.json` is removed first and written last: a folder with it is complete.
    """
    if tokenizer_from is None and tokenizer not in KINDS:  # fail before reading or downloading anything
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(KINDS)}")
    corpus = load_corpus(
        source,
        val_fraction=val_fraction,
        errors=errors,
        cache_dir=cache_dir,
        from_file=from_file,
        max_chars=max_chars,
        holdout_files=holdout_files,
    )
    if not any(d.text for docs in corpus.splits.values() for d in docs):
        raise DataError(f"corpus {corpus.source} is empty: there is no text to prepare")

    if tokenizer_from is not None:
        if vocab_size is not None:
            raise DataError("vocab_size applies when training a tokenizer; leave it unset with tokenizer_from")
        tok = load_tokenizer(tokenizer_from)
    else:
        training = corpus.splits["train"]
        if tokenizer == "char":  # held-out files stay unseen: a character only they use cannot be encoded
            training = [
                d for split, docs in corpus.splits.items() if not (corpus.holdout and split == "test") for d in docs
            ]
        tok = train_tokenizer(tokenizer, (d.text for d in training if d.text), vocab_size)

    arrays = {}
    for split, docs in corpus.splits.items():
        try:
            arrays[split] = encode_documents(tok, docs)
        except TokenizerError as e:
            raise DataError(f"cannot encode the {split} split of {corpus.source}: {e}") from e
        if split in ("train", "val") and len(arrays[split]) == 0:
            raise DataError(
                f"the {split} split of {corpus.source} has no tokens; give the corpus more text or change val_fraction"
            )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split in SPLITS:
        if split in arrays:
            with atomic_path(out_dir / f"{split}.bin") as tmp:
                arrays[split].tofile(tmp)
        else:
            (out_dir / f"{split}.bin").unlink(missing_ok=True)  # stale from an earlier prepare
    tok.save(out_dir)
    meta = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": arrays["train"].dtype.name,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "splits": {split: int(len(a)) for split, a in arrays.items()},
        "documents": {split: sum(1 for d in docs if d.text) for split, docs in corpus.splits.items()},
        "source": corpus.source,
        "split_method": corpus.split_method,
        "val_fraction": None if corpus.split_method == "given" else val_fraction,
        "max_chars": max_chars,
        "errors": errors,
        "holdout_files": corpus.holdout or None,  # the files of the test split, which nothing trained on
        "holdout_patterns": list(holdout_files) if holdout_files else None,
    }
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


# ------------------------------------------------------------------------------------------ loading


def load_meta(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; `lmforge prepare` makes it (a prepare that stopped midway has none)")
    return read_json(path, "data description", DataError, "re-run `lmforge prepare`")


def load_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """The token ids of `split` ("train", "val" or "test"), memory-mapped read-only."""
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if split not in meta["splits"] or not path.is_file():
        raise DataError(
            f"{path} does not exist (this data folder has splits {', '.join(meta['splits'])}); "
            "`lmforge prepare` makes it"
        )
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != meta["splits"][split]:
        raise DataError(
            f"{path} holds {len(data)} tokens but meta.json says {meta['splits'][split]}; re-run `lmforge prepare`"
        )
    return data


# ------------------------------------------------------------------------------------------ batches


def random_batch(
    data: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows, as nanoGPT's `get_batch`: x = data[i:i+T], y = data[i+1:i+T+1].

    Returns int64 tensors of shape (B, T). One fancy-indexed read of the memmap fetches all rows.
    """
    if len(data) <= block_size:
        raise DataError(
            f"a split of {len(data)} tokens cannot fill a window of block_size+1 = {block_size + 1}; "
            "use a smaller block_size or more data"
        )
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    rows = torch.from_numpy(np.asarray(data[ix.numpy()[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T), (B, T)


def sequential_batches(
    data: np.ndarray, batch_size: int, block_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """PyTorch `word_language_model`'s `batchify` + `get_batch`, in (B, T) layout.

    The data is trimmed to a multiple of `batch_size` and cut into `batch_size` contiguous streams
    (row b = data[b*n:(b+1)*n]); windows of `block_size` walk all streams together, the last one shorter,
    so an RNN's hidden state can carry over from one window to the next.
    """
    n = len(data) // batch_size
    if n < 2:
        raise DataError(
            f"{len(data)} tokens make streams of {n} tokens for batch_size={batch_size}; need at least 2 each"
        )
    streams = data[: n * batch_size].reshape(batch_size, n)  # (B, n), still a memmap view
    for i in range(0, n - 1, block_size):
        seq_len = min(block_size, n - 1 - i)
        window = torch.from_numpy(np.asarray(streams[:, i : i + seq_len + 1], dtype=np.int64))
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, seq_len), (B, seq_len)


def eval_windows(
    data: np.ndarray, block_size: int, stride: int | None = None, batch_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows over `data` that score every target token (data[1:]) exactly once.

    stride=None: non-overlapping windows. stride < block_size: sliding windows, each scoring only its last
    targets, so every scored token sees at least `block_size - stride` tokens of context. The last window is
    moved back to end at the last token, so all windows are full length and stack into batches.

    Yields (x, y, mask), each (B, T): inputs, targets, and True where a target is scored. The mean loss is
    `(cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum()` over all batches.
    """
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise DataError(f"stride={stride} must be between 1 and block_size={block_size}")
    n_targets = len(data) - 1
    if n_targets < 1:
        raise DataError(f"a split of {len(data)} tokens has nothing to score; it needs at least 2")
    T = min(block_size, n_targets)
    starts, first_scored = [], []
    scored, begin = 0, 0  # targets data[1..scored] are already scored
    while scored < n_targets:
        start = min(begin, n_targets - T)
        starts.append(start)
        first_scored.append(scored - start)  # window position t predicts data[start+1+t]
        scored = start + T
        begin += stride
    positions = np.arange(T + 1)
    for k in range(0, len(starts), batch_size):
        s = np.array(starts[k : k + batch_size])
        rows = torch.from_numpy(np.asarray(data[s[:, None] + positions], dtype=np.int64))  # (B, T+1)
        mask = torch.arange(T)[None, :] >= torch.tensor(first_scored[k : k + batch_size])[:, None]
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), mask


def prepare_command(
    source: str,
    out: str | None = None,
    tokenizer: Literal["char", "word", "bpe"] = "char",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    errors: Literal["strict", "replace"] = "strict",
    cache_dir: str | None = None,
    from_file: str | None = None,
    max_chars: int | None = None,
    tokenizer_from: str | None = None,
    holdout_files: list[str] | None = None,
) -> int:
    """Tokenize a corpus into train/validation token files (numpy memmaps) plus meta.json and the tokenizer.

    Args:
        source: a text file, a folder of files, a folder of given splits (train.txt, valid.txt, test.txt), or a
            built-in corpus: python-stdlib (this interpreter's standard library source) or tinyshakespeare
            (downloaded once, sha256-checked).
        out: the data folder to write (default: data/NAME, NAME being the source's name).
        tokenizer: char, word or bpe (byte-level BPE trained on the training split).
        vocab_size: BPE vocabulary size, or the word vocabulary cap.
        val_fraction: share held out for validation (a file's tail, or whole files of a folder).
        errors: strict fails on invalid UTF-8 naming the file and byte offset; replace substitutes U+FFFD.
        cache_dir: where downloaded corpora are kept (default ~/.cache/lmforge).
        from_file: a local copy of tinyshakespeare to use instead of downloading (checked against its sha256).
        max_chars: read at most this many characters (quick experiments).
        tokenizer_from: reuse the tokenizer saved in this folder (a model or data folder) instead of training.
        holdout_files: whole files held out as the test split, unseen by training and the tokenizer: paths
            relative to the folder (json/decoder.py), glob patterns ('json/*'), or default (python-stdlib's
            default set: fnmatch.py getopt.py glob.py graphlib.py html/parser.py json/decoder.py queue.py
            sched.py shlex.py textwrap.py). For code completion: see docs/code-completion.md.
    """
    out = out or str(Path("data") / Path(source).stem)
    meta = prepare(
        source,
        out,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        errors=errors,
        cache_dir=cache_dir,
        from_file=from_file,
        max_chars=max_chars,
        tokenizer_from=tokenizer_from,
        holdout_files=holdout_files,
    )
    splits = ", ".join(f"{name} {n:,} tokens" for name, n in meta["splits"].items())
    print(
        f"prepared {meta['source']} -> {out}: {meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']:,}; "
        f"{splits} ({meta['dtype']})"
    )
    if meta["holdout_files"]:
        print(f"held out as the test split ({len(meta['holdout_files'])} files): {' '.join(meta['holdout_files'])}")
    return 0
