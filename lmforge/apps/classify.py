"""Text classification (sentiment analysis): a pretrained lmforge model with a linear head on its pooled states.

    text -> tokens (+ EOS) -> Transformer.hidden -> pool -> Linear(n_embd, n_labels) -> softmax

Pooling is `last` (the state at the last real token: a causal model has read the whole text there, as GPT-style
classifiers do), `mean` (the mean over the real tokens), `max` (their elementwise maximum) or `concat` (last, mean
and max side by side: ULMFiT's concat pooling, a head three times as wide). Batches are right-padded; attention is
causal, so padding after a text never changes its states, and pooling reads only its real positions: a text's
probabilities do not depend on what it is batched with.

Training is cross-entropy on labelled sentences (`text<TAB>label` lines, label an index or a label name), either
of the whole model or of the head only (`head_only`: the body is frozen, its pooled features are computed once).
Full fine-tuning starts from the head fitted on frozen features (linear probing, then fine-tuning: Kumar et al.
2022, "Fine-Tuning can Distort Pretrained Features"), with a smaller learning rate for the body than the head,
and optionally layer-wise (discriminative) learning rates: each layer down from the top gets `layer_decay` times
the rate of the one above (ULMFiT; ELECTRA's layer-wise decay), and label smoothing. The epoch with the best
validation accuracy is kept.

`ensemble` > 1 trains that many classifiers from the same base, with seeds seed, seed+1, ... (their batch orders
and dropout differ), and averages their probabilities; `select` keeps the members (greedily added, best
first) whose average scores best on the validation split (on a small split that choice is noisy). `cross_fit`
instead deals the training and validation examples into `ensemble` folds: each member trains on all but its own
fold and picks its epoch there, every member is kept, and the out-of-fold accuracy (each example scored by the
member that never trained on it) is an honest validation figure over all of them. An ensemble is saved as one
classifier folder (the first member) with the others in `member-N` subfolders, and loads as an `Ensemble`, used
like a `Classifier`.

The classifier is a model folder (config.json, model.safetensors, tokenizer) plus `head.safetensors` and
`classify.json` (labels, pooling, base, ...), written atomically and loadable on its own by `load_classifier`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.apps.classifier import (
    Classifier,
    Ensemble,
    TextEncoder,
    batch_tensors,
    length_batches,
    load_classifier,
    new_classifier,
    predict,
    predict_ids,
    save_classifier,
)
from lmforge.checkpoint import clean_stale_folders
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.settings import check_choices, to_yaml
from lmforge.textfile import text_lines
from lmforge.train.loop import Loop, claim_run_folder, stop_on_signals

SETTINGS_FILE = "classify.yaml"
DEFAULT_LABELS = ("negative", "positive")


class ClassifyDataError(LmforgeError):
    """A labelled data file that cannot be used; the message names the file and line."""


class ClassifyError(LmforgeError):
    """A classification setting out of range or missing; the message names it."""


@dataclass
class Labelled:
    text: str
    label: int


# ---------------------------------------------------------------------------------------------- data


def read_labelled(path: str | Path, labels: Sequence[str] = DEFAULT_LABELS) -> list[Labelled]:
    """Read `text<TAB>label` lines (label: an index 0..n-1 or one of `labels`); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ClassifyDataError(f"labelled data file {path} does not exist or is not a file")
    allowed = {str(i): i for i in range(len(labels))} | {name: i for i, name in enumerate(labels)}
    spelled = ", ".join(list(map(str, range(len(labels)))) + list(labels))
    out = []
    for lineno, line in text_lines(path, ClassifyDataError):
        if "\t" not in line:
            raise ClassifyDataError(f"{path}:{lineno}: no label: expected 'text<TAB>label', got {line[:60]!r}")
        text, label = line.rsplit("\t", 1)
        if label.strip() not in allowed:
            raise ClassifyDataError(f"{path}:{lineno}: label {label.strip()!r} is not one of {spelled}")
        if not text.strip():
            raise ClassifyDataError(f"{path}:{lineno}: the text before the label is empty")
        out.append(Labelled(text.strip(), allowed[label.strip()]))
    if not out:
        raise ClassifyDataError(f"{path} holds no labelled lines ('text<TAB>label')")
    return out


def split_labelled(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A fixed, seeded split: (kept, held_out), held_out taking round(fraction * n) examples."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction {fraction} must be in [0, 1)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = round(fraction * len(examples))
    return [examples[i] for i in order[n:]], [examples[i] for i in order[:n]]


# ---------------------------------------------------------------------------------------------- metrics


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / max(1, len(y_true))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> float:
    """The unweighted mean over labels of F1 = 2TP / (2TP + FP + FN) (0 for a label never true nor predicted)."""
    scores = []
    for k in range(n_labels):
        tp = sum(t == k and p == k for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != k and p == k for t, p in zip(y_true, y_pred))
        fn = sum(t == k and p != k for t, p in zip(y_true, y_pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / n_labels


# ---------------------------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class ClassifyConfig:
    """How a classifier is trained."""

    pooling: Literal["last", "mean", "max", "concat"] = "last"
    """last (the state at the last token), mean (the mean over the text's tokens), max (their elementwise
    maximum) or concat (last, mean and max side by side)."""
    head_only: bool = False
    """Train only the linear head, on the frozen model's features."""
    epochs: int = 8
    """Epochs of full fine-tuning (early stopped by patience on the validation split)."""
    head_epochs: int = 100
    """Epochs of the head on frozen features (all of head_only, and the warm start of full fine-tuning)."""
    batch_size: int = 32
    """Sentences per step."""
    lr: float = 1e-4
    """Learning rate of the model body (its top layer with layer_decay); the head gets 10x."""
    head_lr: float = 1e-2
    """Learning rate of the head on frozen features."""
    layer_decay: float = 1.0
    """Each layer below the top learns at this times the rate of the one above (1: all at lr)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (0: none)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    patience: int | None = 3
    """Stop after this many epochs without a better validation accuracy (unset: never)."""
    max_minutes: float | None = None
    """Wall-clock budget of fine-tuning (per ensemble member)."""
    seed: int = 0
    """Seeds the splits, the head and the batch order."""
    ensemble: int = 1
    """Classifiers trained (seeds seed, seed+1, ...) whose probabilities are averaged; with select, those whose
    average does best on the validation split are kept."""
    select: bool = True
    """Keep only the ensemble's members whose average does best on validation (greedy)."""
    cross_fit: bool = False
    """The ensemble's members each hold out their own fold of the training and validation data (every labelled
    example trains most members); all are kept."""

    def check(self) -> None:
        check_choices(self, ClassifyError)
        for name in ("epochs", "head_epochs", "batch_size", "ensemble", "lr", "head_lr", "patience", "max_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ClassifyError(f"{{param}}={value} must be > 0", param=name)
        if not 0 <= self.label_smoothing < 1:
            raise ClassifyError(f"{{param}}={self.label_smoothing} must be in [0, 1)", param="label_smoothing")


@dataclass
class ClassifyTrainConfig(ClassifyConfig):
    """Every setting of `lmforge classify train`: the data and folders, then how it trains (ClassifyConfig)."""

    base: str
    """The pretrained model folder (or training run) the classifier starts from."""
    _: KW_ONLY
    data: list[str]
    """Labelled files, one 'text<TAB>label' per line (label: 0..n-1 or a label name)."""
    out: str
    """The classifier folder to write."""
    labels: list[str] | None = None
    """Label names, in index order. Unset: negative positive."""
    test_fraction: float = 0.2
    """Share of the data held out (seeded) for the final accuracy and macro-F1."""
    val_fraction: float = 0.1
    """Share of the rest held out for choosing the best epoch."""
    dropout: float | None = None
    """Dropout inside the model while fine-tuning. Unset: the model's own."""
    num_threads: int | None = None
    """torch.set_num_threads for the run. Unset: PyTorch's default."""
    overwrite: bool = False
    """Replace the classifier folder `out` if it exists."""

    def check(self) -> None:
        super().check()
        for name in ("test_fraction", "val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ClassifyError(f"{{param}}={getattr(self, name)} must be in [0, 1)", param=name)


def fit_head(
    clf: Classifier,
    feats: torch.Tensor,
    y: torch.Tensor,
    cfg: ClassifyConfig,
    val: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Train the head alone on fixed features (N, C): full-batch AdamW, the best validation epoch kept."""
    opt = torch.optim.AdamW(clf.head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    loop, best_state = Loop(max_iters=cfg.head_epochs, mode="max"), None
    while loop.running():
        loss = F.cross_entropy(clf.head(feats), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loop.step_done()
        if val is not None:
            with torch.no_grad():
                acc = (clf.head(val[0]).argmax(-1) == val[1]).float().mean().item()
            if loop.observe(acc):
                best_state = copy.deepcopy(clf.head.state_dict())
    if best_state is not None:
        clf.head.load_state_dict(best_state)


@torch.no_grad()
def all_features(clf: Classifier, seqs: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
    clf.eval()
    device = next(clf.parameters()).device
    feats = torch.empty(len(seqs), clf.head.in_features)
    for idx in length_batches(seqs, batch_size):
        feats[idx] = clf.features(*batch_tensors([seqs[i] for i in idx], device)).float().cpu()
    return feats


def body_param_groups(body: Transformer, lr: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups for a body's trainable parameters: the final norm and top block at `lr`, each block below
    at `layer_decay` times the rate of the one above, the embeddings below the first block."""
    n = body.config.n_layer
    depth: dict[int, list] = {}
    for name, p in body.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("blocks."):
            d = int(name.split(".")[1])
        elif name.startswith(("tok_emb", "pos_emb")):
            d = -1
        else:  # the final norm (and an untied LM head, unused here)
            d = n - 1
        depth.setdefault(d, []).append(p)
    return [{"params": ps, "lr": lr * layer_decay ** (n - 1 - d)} for d, ps in sorted(depth.items())]


def train_classifier(
    clf: Classifier,
    encoder: TextEncoder,
    train: list[Labelled],
    val: list[Labelled] | None,
    cfg: ClassifyConfig,
    log=print,
    stop=None,
) -> dict:
    """Fit `clf` on `train` (in place), keeping the weights with the best accuracy on `val`; a summary. `stop`, an
    Event, ends fine-tuning after the current epoch when set."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    seqs = [encoder.fit(encoder.ids(e.text)) for e in train]
    y = torch.tensor([e.label for e in train])
    vseqs = [encoder.fit(encoder.ids(e.text)) for e in val] if val else []
    vy = torch.tensor([e.label for e in val]) if val else None

    def val_acc() -> float | None:
        return accuracy(vy.tolist(), predict_ids(clf, vseqs).argmax(-1).tolist()) if val else None

    # 1. the head on frozen features (all of head_only; the warm start of full fine-tuning)
    loop = Loop(max_iters=cfg.epochs, max_minutes=cfg.max_minutes, patience=cfg.patience, mode="max", stop=stop)
    feats = all_features(clf, seqs)
    fit_head(clf, feats, y, cfg, (all_features(clf, vseqs), vy) if val else None)
    history = [{"epoch": 0, "val_acc": val_acc()}]
    log(json.dumps({"stage": "head", **history[-1]}))
    if cfg.head_only:
        return {"history": history, "best_val_acc": history[-1]["val_acc"], "minutes": round(loop.elapsed() / 60, 3)}

    # 2. the whole model, body at lr (each layer down from the top at layer_decay times more), head at lr * 10
    device = next(clf.parameters()).device
    groups = body_param_groups(clf.body, cfg.lr, cfg.layer_decay) + [
        {"params": list(clf.head.parameters()), "lr": cfg.lr * 10}
    ]
    bases = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total, step = steps_per_epoch * cfg.epochs, 0
    best_state = copy.deepcopy(clf.state_dict())
    if val:
        loop.observe(history[0]["val_acc"])
    while loop.running():  # one epoch a step
        clf.train()
        batches = length_batches(seqs, cfg.batch_size)
        rng.shuffle(batches)
        loss_sum = 0.0
        for idx in batches:
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * scale
            tokens, lengths = batch_tensors([seqs[i] for i in idx], device)
            loss = F.cross_entropy(clf(tokens, lengths), y[idx].to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item() * len(idx)
            step += 1
        loop.step_done()
        history.append({"epoch": loop.it, "loss": round(loss_sum / len(seqs), 4), "val_acc": val_acc()})
        log(json.dumps({"stage": "full", **history[-1]}))
        if val is None or loop.observe(history[-1]["val_acc"]):  # without a split, the last epoch is kept
            best_state = copy.deepcopy(clf.state_dict())
    clf.load_state_dict(best_state)
    clf.eval()
    return {
        "history": history,
        "best_val_acc": loop.best if val else None,
        "stop_reason": loop.stop_reason,
        "minutes": round(loop.elapsed() / 60, 3),
    }


def cross_folds(examples: list, k: int, seed: int) -> list[tuple[list, list]]:
    """k (fit, held_out) pairs: the examples shuffled (seeded) and dealt into k folds, each held out once."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    folds = [[examples[i] for i in order[j::k]] for j in range(k)]
    return [([e for i, f in enumerate(folds) if i != j for e in f], folds[j]) for j in range(k)]


def train_ensemble(
    clf: Classifier,
    encoder: TextEncoder,
    train: list[Labelled],
    val: list[Labelled] | None,
    cfg: ClassifyConfig,
    log=print,
    stop=None,
) -> tuple[Classifier | Ensemble, dict]:
    """Train cfg.ensemble copies of the untrained `clf` (seeds cfg.seed, cfg.seed + 1, ...) and average them: all of
    them, or (cfg.select, with `val`) those a greedy pass keeps, starting from the best member and adding each next
    best while the average's validation accuracy does not drop. (The classifier, or an Ensemble; a summary.)

    cfg.cross_fit pools train and val and cuts them into cfg.ensemble seeded folds: member k trains on the others
    and chooses its epoch on fold k, so every labelled example trains most members, and each is scored once by a
    member that never trained on it. All members are kept; the summary's `best_val_acc` is that out-of-fold
    accuracy, an honest estimate over all the examples."""
    if cfg.ensemble <= 1:
        return clf, train_classifier(clf, encoder, train, val, cfg, log, stop)
    t0 = time.perf_counter()
    start = copy.deepcopy(clf.state_dict())
    if cfg.cross_fit:
        splits = cross_folds(list(train) + list(val or []), cfg.ensemble, cfg.seed)
    else:
        splits = [(train, val)] * cfg.ensemble
    members, summaries = [], []
    for k, (fit, held) in enumerate(splits):
        member = clf if k == 0 else copy.deepcopy(clf)
        member.load_state_dict(start)
        summaries.append(
            train_classifier(member, encoder, fit, held, dataclasses.replace(cfg, seed=cfg.seed + k), log, stop)
        )
        members.append(member)
        log(json.dumps({"stage": "member", "member": k, "val_acc": summaries[-1]["best_val_acc"]}))
    kept, best = list(range(len(members))), None
    if cfg.cross_fit:  # each fold scored by the member that held it out
        right = sum(
            accuracy([e.label for e in held], predict(m, encoder, [e.text for e in held]).argmax(-1).tolist())
            * len(held)
            for m, (_, held) in zip(members, splits)
        )
        best = right / sum(len(held) for _, held in splits)
    elif val and cfg.select:
        vseqs, vy = [encoder.fit(encoder.ids(e.text)) for e in val], [e.label for e in val]
        probs = [predict_ids(m, vseqs) for m in members]

        def score(idx: list[int]) -> float:
            return accuracy(vy, torch.stack([probs[i] for i in idx]).mean(0).argmax(-1).tolist())

        order = sorted(kept, key=lambda i: -summaries[i]["best_val_acc"])
        kept = [order[0]]
        for i in order[1:]:
            if score(kept + [i]) >= score(kept):
                kept.append(i)
    model = Ensemble([members[i] for i in kept]) if len(kept) > 1 else members[kept[0]]
    if val and not cfg.cross_fit:
        best = accuracy([e.label for e in val], predict(model, encoder, [e.text for e in val]).argmax(-1).tolist())
    return model, {
        "members": [
            {"seed": cfg.seed + i, "best_val_acc": m["best_val_acc"], "minutes": m["minutes"], "history": m["history"]}
            for i, m in enumerate(summaries)
        ],
        "kept": kept,
        "best_val_acc": best,
        "out_of_fold": cfg.cross_fit,
        "minutes": round((time.perf_counter() - t0) / 60, 3),
    }


# ---------------------------------------------------------------------------------------------- the command


def report(clf: Classifier, encoder: TextEncoder, examples: list[Labelled]) -> dict:
    """Accuracy and macro-F1 of the classifier on labelled examples."""
    pred = predict(clf, encoder, [e.text for e in examples]).argmax(-1).tolist()
    truth = [e.label for e in examples]
    return {
        "n": len(examples),
        "accuracy": round(accuracy(truth, pred), 4),
        "macro_f1": round(macro_f1(truth, pred, len(clf.labels)), 4),
    }


def train_command(config: ClassifyTrainConfig) -> int:
    """Fine-tune a pretrained model with a linear head into a text classifier (sentiment analysis).

    Reads `text<TAB>label` lines, holds out --test-fraction of them (seeded) and prints accuracy and macro-F1
    there. Ctrl-C stops after the current epoch and saves the best classifier so far.
    """
    config.check()
    out = Path(config.out)
    claim_run_folder(out, (), overwrite=config.overwrite, can_resume=False)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    names = tuple(config.labels) if config.labels else DEFAULT_LABELS
    examples = [e for f in config.data for e in read_labelled(f, names)]
    rest, test = split_labelled(examples, config.test_fraction, config.seed)
    train, val = split_labelled(rest, config.val_fraction, config.seed + 1)
    if not train:
        raise ClassifyError(
            f"no training examples left after holding out test ({len(test)}) and val "
            f"({len(val)}): lower {{param}} or give more data",
            param="test_fraction",
        )
    clf, encoder = new_classifier(config.base, names, config.pooling, config.head_only, config.dropout)
    with stop_on_signals("fine-tuning") as stop:
        clf, summary = train_ensemble(clf, encoder, train, val or None, config, stop=stop)
    scores = report(clf, encoder, test) if test else None
    clean_stale_folders(out.parent, (out.name,))  # what a killed save left half-written
    save_classifier(
        out,
        clf,
        encoder.tokenizer,
        {
            "base": str(config.base),
            "max_tokens": encoder.max_tokens,
            "data": [str(f) for f in config.data],
            "split": {"train": len(train), "val": len(val), "test": len(test), "seed": config.seed},
            "config": dataclasses.asdict(config),
            "training": summary,
            "test": scores,
        },
        {
            SETTINGS_FILE: to_yaml(
                config,
                exclude=("overwrite",),
                header="lmforge classify train: the settings of "
                "this classifier (`lmforge classify train --config` reads them)",
            ).encode()
        },
    )
    print(
        json.dumps(
            {
                "out": str(out),
                "split": {"train": len(train), "val": len(val), "test": len(test)},
                "test": scores,
                "minutes": summary["minutes"],
            }
        )
    )
    if stop.is_set():
        print(f"interrupted: {out} holds the best classifier so far", file=sys.stderr)
        return 128 + (stop.signum or 2)
    return 0


def predict_command(model: str, text: list[str] | None = None, data: list[str] | None = None) -> int:
    """Print each text's label and the probabilities of every label.

    Args:
        model: the classifier folder (made by `lmforge classify train`).
        text: the texts to classify.
        data: labelled or plain files whose texts to classify instead ('text<TAB>label' lines).
    """
    clf, encoder, _ = load_classifier(model)
    texts = list(text or []) or [e.text for f in (data or []) for e in read_labelled(f, clf.labels)]
    if not texts:
        raise ClassifyError('classify predict needs {param} "..." (or --data FILE)', param="text")
    probs = predict(clf, encoder, texts)
    for t, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        shown = " ".join(f"{name}={q:.4f}" for name, q in zip(clf.labels, p))
        print(f"{clf.labels[best]}\t{shown}\t{t}")
    return 0


def eval_command(model: str, data: list[str] | None = None) -> int:
    """Score a classifier on labelled files: accuracy and macro-F1.

    Args:
        model: the classifier folder (made by `lmforge classify train`).
        data: labelled files, one 'text<TAB>label' per line (label: 0..n-1 or a label name).
    """
    if not data:
        raise ClassifyError("classify eval needs {param} FILE...", param="data")
    clf, encoder, _ = load_classifier(model)
    examples = [e for f in data for e in read_labelled(f, clf.labels)]
    print(json.dumps(report(clf, encoder, examples)))
    return 0
