"""Optimizers and learning-rate schedules for the training loop.

- `param_groups`: AdamW's decoupled weight decay applies to the >= 2-D weights of linear layers only; norms,
  biases and the embeddings (tok_emb, pos_emb, and so an lm_head tied to tok_emb) are not decayed, as in nanoGPT
  and most GPT recipes (decaying an embedding pulls rare tokens towards zero for no gain).
- `make_optimizer`: AdamW (fused single-kernel step where this PyTorch has one, else foreach) or plain SGD, the
  optimizer of PyTorch's word_language_model example.
- `Schedule`: one object for the three schedules, `lr_at(it)` gives the rate of iteration `it` and
  `observe(val_loss)` is told every evaluation:
  `cosine` (linear warmup, then cosine decay to `min_lr`, nanoGPT's `get_lr`), `constant` (warmup, then flat) and
  `plateau` (the example's "divide the learning rate by 4 when validation loss stops improving").
  Its state is a small dict, saved with the checkpoint so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from lmforge.errors import LmforgeError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant", "plateau")
NO_DECAY_NAMES = ("tok_emb", "pos_emb")  # embeddings; a tied lm_head shares tok_emb's tensor


class OptimConfigError(LmforgeError):
    """An optimizer or schedule setting out of range; the message names it and the allowed values."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (>= 2-D weights other than embeddings) and not decayed (norms, biases, embeddings).

    `named_parameters` lists a tied tensor once (under its first name, tok_emb.weight), so the tied lm_head
    lands with the embeddings and no tensor is in both groups.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.split(".")[0] in NO_DECAY_NAMES
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_available() -> bool:
    """Whether this PyTorch has the fused AdamW kernel for CPU tensors (torch >= 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def make_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, or SGD (with optional momentum) over every parameter.

    AdamW uses the fused step (one kernel per parameter group instead of a dozen small ops per tensor) where
    available: on a small model the optimizer step is a sizeable share of an iteration.
    """
    if lr <= 0:
        raise OptimConfigError(f"learning rate lr={lr} must be > 0 (e.g. 1e-3 for AdamW, 5 for the seed's SGD)")
    if weight_decay < 0:
        raise OptimConfigError(f"weight_decay={weight_decay} must be >= 0")
    if name == "adamw":
        if not all(0 <= b < 1 for b in betas):
            raise OptimConfigError(f"AdamW betas {betas} must each be in [0, 1)")
        fused = fused_adamw_available() and all(p.device.type == "cpu" or p.is_cuda for p in model.parameters())
        return torch.optim.AdamW(
            param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True
        )
    if name == "sgd":
        if not 0 <= momentum < 1:
            raise OptimConfigError(f"SGD momentum={momentum} must be in [0, 1)")
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise OptimConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class Schedule:
    """The learning rate of each iteration, and the plateau rule's state.

    Attributes:
        kind: "cosine", "constant" or "plateau".
        lr: peak learning rate, reached at the end of warmup.
        warmup_iters: iterations of linear warmup from lr/warmup_iters up to lr (0: none).
        decay_iters: cosine: the iteration where the rate reaches min_lr and stays.
        min_lr: cosine: the floor.
        factor: plateau: what the rate is multiplied by when validation loss did not improve (the example: 1/4).
        scale: plateau: the product of the reductions so far (state, saved with checkpoints).
        best: plateau: the best validation loss seen (state).
    """

    kind: str = "cosine"
    lr: float = 1e-3
    warmup_iters: int = 0
    decay_iters: int = 1
    min_lr: float = 0.0
    factor: float = 0.25
    scale: float = 1.0
    best: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise OptimConfigError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.lr <= 0:
            raise OptimConfigError(f"learning rate lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise OptimConfigError(f"min_lr={self.min_lr} must be between 0 and lr={self.lr}")
        if self.warmup_iters < 0:
            raise OptimConfigError(f"warmup_iters={self.warmup_iters} must be >= 0")
        if not 0 < self.factor < 1:
            raise OptimConfigError(f"plateau factor={self.factor} must be in (0, 1), e.g. 0.25")

    def lr_at(self, it: int, time_fraction: float | None = None) -> float:
        """The learning rate for iteration `it` (0-based).

        time_fraction: the share of a wall-clock budget spent so far; when given, the cosine decays over that
        instead of over iterations (warmup still counts iterations).
        """
        if it < self.warmup_iters:
            return self.lr * (it + 1) / self.warmup_iters
        if self.kind == "plateau":
            return self.lr * self.scale
        if self.kind == "constant":
            return self.lr
        if time_fraction is not None:
            progress = min(time_fraction, 1.0)
        elif self.decay_iters <= self.warmup_iters or it >= self.decay_iters:
            return self.min_lr
        else:
            progress = (it - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)

    def observe(self, val_loss: float) -> bool:
        """Record an evaluation; for `plateau`, reduce the rate when it did not improve. True if reduced."""
        improved = val_loss < self.best
        self.best = min(self.best, val_loss)
        if self.kind == "plateau" and not improved:
            self.scale *= self.factor
            return True
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
