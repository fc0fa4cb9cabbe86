"""A run's record: metrics.jsonl (always), TensorBoard event files (`--logger tensorboard`), and loss.png.

Every record is one JSON line with its step (`iter`) and figures: training lines (loss, lr, tokens_per_s) and
evaluation lines (val_loss, val_ppl, ...). With TensorBoard on, each figure is also a scalar of that name at that
step in RUN/tensorboard/ (`tensorboard --logdir RUN`); off by default, and the tensorboard package is then not
needed. A resumed run first forgets what was logged after its checkpoint, in both, so each reads as one
uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_path, atomic_write_text

LOGGERS = ("tensorboard",)
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    """metrics.jsonl, flushed as written, and optionally TensorBoard. A resumed run drops the records logged
    after its checkpoint (iter > keep_until); TensorBoard hides them too (its purge_step)."""

    def __init__(self, path: Path, keep_until: int, logger: str | None = None):
        self.path = Path(path)
        kept = [r for r in self.records() if r["iter"] <= keep_until] if keep_until else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.writer = None
        if logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LmforgeError(
                    "{param} tensorboard needs the tensorboard package: pip install tensorboard "
                    "(or lmforge[tensorboard])",
                    param="logger",
                ) from None
            self.writer = SummaryWriter(
                str(self.path.parent / TENSORBOARD_DIR), purge_step=keep_until + 1 if keep_until else None
            )
        elif logger is not None:
            raise LmforgeError(f"{{param}}={logger!r} is not one of: {', '.join(LOGGERS)}", param="logger")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if (
                    key != "iter"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    self.writer.add_scalar(key, value, record["iter"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(log: MetricsLog, png: Path) -> None:
    """Training and validation loss against iteration, written atomically (matplotlib's Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = log.records()
    train_pts = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for pts, label, style in ((train_pts, "train", "-"), (val_pts, "validation", "o-")):
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
