"""Text classification (sentiment analysis): a pretrained lmforge model with a linear head on its pooled states.

    text -> tokens (+ EOS) -> Transformer.hidden -> pool -> Linear(n_embd, n_labels) -> softmax

Pooling is `last` (the state at the last real token: a causal model has read the whole text there, as GPT-style
classifiers do), `mean` (the mean over the real tokens), `max` (their elementwise maximum) or `concat` (last, mean
and max side by side: ULMFiT's concat pooling, a head three times as wide). Batches are right-padded; attention is
causal, so padding after a text never changes its states, and pooling reads only its real positions: a text's
probabilities do not depend on what it is batched with.

The classifier is a model folder (config.json, model.safetensors, tokenizer) plus `head.safetensors` and
`classify.json` (labels, pooling, base, ...), written atomically and loadable on its own by `load_classifier`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lmforge.checkpoint import (
    CheckpointError,
    load_model,
    read_weights,
    resolve_model_dir,
    save_model_files,
    tensors_digest,
    write_folder,
)
from lmforge.fsutil import read_json
from lmforge.model import Transformer

CLASSIFY_FILE, HEAD_FILE = "classify.json", "head.safetensors"
POOLINGS = ("last", "mean", "max", "concat")


# ---------------------------------------------------------------------------------------------- the model


def pool(h: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, C) from right-padded states h (B, T, C) whose rows have `lengths` (B,) real tokens ((B, 3C) for
    `concat`: last, mean and max)."""
    if pooling == "concat":
        return torch.cat([pool(h, lengths, p) for p in ("last", "mean", "max")], -1)
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), lengths - 1]
    real = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths[:, None])[..., None]  # (B, T, 1)
    if pooling == "max":
        return h.masked_fill(~real, float("-inf")).amax(1)
    return (h * real.to(h.dtype)).sum(1) / lengths[:, None].to(h.dtype)


class Classifier(nn.Module):
    """A Transformer body, pooling and a linear head: logits (B, n_labels) for right-padded tokens (B, T)."""

    def __init__(self, body: Transformer, labels: Sequence[str], pooling: str = "last"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of: {', '.join(POOLINGS)}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be at least two distinct names, got {list(labels)}")
        self.body, self.labels, self.pooling = body, list(labels), pooling
        self.head = nn.Linear(body.config.n_embd * (3 if pooling == "concat" else 1), len(labels))
        nn.init.zeros_(self.head.weight)  # a zero head: every label equally likely until trained
        nn.init.zeros_(self.head.bias)

    def features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pool(self.body.hidden(tokens), lengths, self.pooling)  # (B, C)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens, lengths))


class Ensemble(nn.Module):
    """Classifiers over the same labels whose probabilities are averaged. Its `forward` gives the log of the mean
    probabilities, so softmax of its output is that mean and it is used wherever a Classifier is."""

    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        if not members or any(m.labels != members[0].labels for m in members):
            raise ValueError("an ensemble needs at least one classifier, all over the same labels")
        self.members = nn.ModuleList(members)
        self.labels, self.pooling = members[0].labels, members[0].pooling

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(tokens, lengths).float().softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()


class TextEncoder:
    """Texts -> token ids as the classifier reads them: the tokenizer's ids, then EOS when it has one."""

    def __init__(self, tokenizer, max_tokens: int):
        if tokenizer is None:
            raise ValueError("a classifier needs a tokenizer: the model folder has none")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.eos = getattr(tokenizer, "eos_id", None)

    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text) + ([self.eos] if self.eos is not None else [])
        return ids or [0]

    def fit(self, ids: list[int]) -> list[int]:
        """Keep the first max_tokens - 1 tokens and the last one (the EOS that `last` pooling reads)."""
        return ids if len(ids) <= self.max_tokens else ids[: self.max_tokens - 1] + ids[-1:]


def batch_tensors(seqs: Sequence[Sequence[int]], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists with 0 into (B, T) tokens and (B,) lengths."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens.to(device), lengths.to(device)


def length_batches(seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in length order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_ids(clf: Classifier, seqs: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
    """Probabilities (N, n_labels) for token id lists, in input order."""
    clf.eval()
    device = next(clf.parameters()).device
    probs = torch.empty(len(seqs), len(clf.labels))
    for idx in length_batches(seqs, batch_size):
        logits = clf(*batch_tensors([seqs[i] for i in idx], device))
        probs[idx] = logits.float().softmax(-1).cpu()
    return probs


def predict(clf: Classifier, encoder: TextEncoder, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Probabilities (N, n_labels) for texts (longer ones are cut to the classifier's context)."""
    return predict_ids(clf, [encoder.fit(encoder.ids(t)) for t in texts], batch_size)


# ---------------------------------------------------------------------------------------------- the folder


def _write_member(folder: Path, clf: Classifier, tokenizer, meta: dict) -> None:
    head = {k: v.detach().contiguous().cpu() for k, v in clf.head.state_dict().items()}
    save_model_files(folder, clf.body, clf.body.config, tokenizer)
    save_file(head, folder / HEAD_FILE, metadata={"format": "pt", "lmforge_sha256": tensors_digest(head)})
    (folder / CLASSIFY_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_classifier(
    folder: str | Path, clf: Classifier | Ensemble, tokenizer, info: dict, extra_files: dict[str, bytes] | None = None
) -> Path:
    """Write the classifier folder atomically: model files, head.safetensors and classify.json (labels, pooling
    and `info`: base, training summary, ...), and `extra_files`. An Ensemble's first member is the folder itself,
    the others are `member-1`, `member-2`, ... inside it, listed in classify.json's `members`."""
    members = list(clf.members) if isinstance(clf, Ensemble) else [clf]
    names = [f"member-{k}" for k in range(1, len(members))]
    meta = {"labels": clf.labels, "pooling": members[0].pooling, **info, **({"members": names} if names else {})}

    def write(tmp: Path) -> None:
        _write_member(tmp, members[0], tokenizer, meta)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        for name, member in zip(names, members[1:]):
            (tmp / name).mkdir()
            _write_member(tmp / name, member, tokenizer, {"labels": member.labels, "pooling": member.pooling})

    return write_folder(folder, write)


def _read_member(folder: Path, labels: list[str], pooling: str) -> tuple[Classifier, object]:
    body, tokenizer = load_model(folder)
    clf = Classifier(body, labels, pooling)
    head, _ = read_weights(folder / HEAD_FILE)
    try:
        clf.head.load_state_dict(head)
    except RuntimeError as e:
        raise CheckpointError(
            f"{folder / HEAD_FILE} does not fit {len(labels)} labels over {pooling} pooling of "
            f"width {body.config.n_embd}: {e}"
        ) from None
    return clf, tokenizer


def load_classifier(folder: str | Path, device: str = "cpu") -> tuple[Classifier | Ensemble, TextEncoder, dict]:
    """(classifier in eval mode, its text encoder, classify.json) from a folder made by save_classifier."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"classifier folder not found: {folder}")
    meta_path = folder / CLASSIFY_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{folder} holds no {CLASSIFY_FILE}: not a classifier folder (make one with "
            f"`lmforge classify train BASE --data FILE --out DIR`)"
        )
    meta = read_json(meta_path, "classifier description", CheckpointError)
    if "labels" not in meta or "pooling" not in meta:
        raise CheckpointError(f"{meta_path} is not a valid classifier description: it needs 'labels' and 'pooling'")
    labels, pooling = meta["labels"], meta["pooling"]
    clf, tokenizer = _read_member(folder, labels, pooling)
    max_tokens = meta.get("max_tokens", clf.body.config.block_size)
    if meta.get("members"):
        others = []
        for name in meta["members"]:
            info = read_json(folder / name / CLASSIFY_FILE, "classifier description", CheckpointError)
            others.append(_read_member(folder / name, labels, info.get("pooling", pooling))[0])
        clf = Ensemble([clf, *others])
    clf.to(device).eval()
    return clf, TextEncoder(tokenizer, max_tokens), meta


def new_classifier(
    base: str | Path, labels: Sequence[str], pooling: str, head_only: bool, dropout: float | None = None
) -> tuple[Classifier, TextEncoder]:
    """A classifier on a pretrained model folder (or training run): the body's weights, a zero head."""
    body, tokenizer = load_model(resolve_model_dir(base))
    if dropout is not None:  # the body's dropout modules read the config's rate when built: rebuild
        config = dataclasses.replace(body.config, dropout=dropout)
        fresh = Transformer(config)
        fresh.load_state_dict(body.state_dict())
        body = fresh
    clf = Classifier(body, labels, pooling)
    if head_only:
        clf.body.requires_grad_(False)
    return clf, TextEncoder(tokenizer, body.config.block_size)
