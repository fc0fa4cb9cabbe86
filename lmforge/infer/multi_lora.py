"""Many LoRA adapters beside one unmerged base model, each row of a batch with its own (S-LoRA, Punica).

Sheng et al. 2023, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters"; Chen et al. 2023, "Punica:
Multi-Tenant LoRA Serving". Merging an adapter into the weights (lmforge.lora.merge_adapter) serves one adapter
per model copy. Kept apart, every adapted layer computes, for the rows b of a batch that use adapter g,

    y_b = x_b W^T + bias + (x_b A_g^T) (scale_g B_g)^T          A_g (r, in), B_g (out, r)

so requests for different adapters, and for the base, share one forward: the base product is one matrix product
over all rows, and each adapter adds a product of rank r over its own rows (Punica's SGMV). In the model's own
forward (prompt chunks) each row's A and B are gathered from the stacks below and the low-rank products of all
rows are two batched products (torch.bmm), whatever the mix of adapters; the base's rows gather a zero slice.

`AdapterBank(model)` holds the adapters by name and hooks the model's linear layers (forward hooks: the model's
code and modules stay as they are, quantized or packed alike). The hooks add nothing except inside a `LoRABatch`
(`with bank.batch(names):`), which names each row's adapter for the forwards it wraps; the serving engine passes
one to each forward it runs (lmforge.engine.forward). The fused decode step (lmforge.infer.fused) takes the same
rows (`LoRABatch.slots`, -1 for the base) and the bank's stacked tensors (`fused_stacks`): per adapted product A
(N, r, in) and B^T (N, r, out), float32, scale folded into B and ranks padded with zeros to the largest, N = the
number of adapters; it adds each row's product right after the base product, in the step's one C++ call.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.lora import BLOCK_TARGETS, Adapter, base_digest


class AdapterError(LmforgeError):
    """An adapter that cannot be served: an unknown or duplicate name, one still in use, one that does not fit."""


class AdapterBank:
    """Named adapters for one base model, applied per row inside `rows(...)`.

    Args:
        model: the base model (an lmforge Transformer, prepared for decoding or not); its linear layers get hooks.
        check_base: check adapters that record their base's weight digest (lmforge-trained ones) against this
            model's. Only a model whose linear layers hold their float32 weights as stored can be checked (a
            quantized, bfloat16 or oneDNN-packed one is not; those adapters load unchecked).
    """

    def __init__(self, model: nn.Module, check_base: bool = True):
        self.model, self.check_base = model, check_base
        self._digest: str | None = None
        self.adapters: dict[str, Adapter] = {}
        self.ids: dict[str, int] = {}  # name -> a number unique to this load of it (a prefix-cache key)
        self._ids = itertools.count(1)
        self._slot: dict[str, int] = {}
        # path -> A (N + 1, r, in), scale * B^T (N + 1, r, out) by slot, the last slice (slot -1, the base) zeros;
        # in the adapters' dtype, at least float32 (a float64 test model's stay float64)
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._adapts: dict[str, set[int]] = {}  # path -> the slots whose adapter adapts it
        self.fused_stacks: list[torch.Tensor] = []  # what the fused step reads (see the module docstring)
        self._rows: torch.Tensor | None = None  # inside a batch: each row's slot
        self._single: int | None = None  # inside a batch whose rows all use one adapter: its slot
        linears = {name: m for name, m in model.named_modules() if hasattr(m, "in_features")}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    # ---- adapters ------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        """Serve `adapter` under `name` (checked against the model and, when both are known, the base digest)."""
        if not name or name in self.adapters:
            raise AdapterError(
                f"an adapter named {name!r} is already loaded" if name else "an adapter needs a name", param="name"
            )
        digest = self.base_digest() if self.check_base and adapter.base_digest is not None else None
        if digest is not None and adapter.base_digest != digest:
            raise AdapterError(
                f"adapter {name!r} ({adapter.source}) was trained on a different base model "
                f"({adapter.base}): its recorded weight digest does not match this model's"
            )
        adapter.check(self.model, check_base=False)
        self.adapters[name] = adapter
        self.ids[name] = next(self._ids)
        self._restack()

    def base_digest(self) -> str | None:
        """The served weights' digest (lmforge.lora.base_digest), when they are the float32 weights as stored."""
        if self._digest is None and all(
            type(m) is nn.Linear and m.weight.dtype == torch.float32
            for m in self.model.modules()
            if hasattr(m, "in_features")
        ):
            self._digest = base_digest(self.model)
        return self._digest

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r} is loaded", param="name")
        del self.adapters[name], self.ids[name]
        self._restack()

    def slot(self, name: str | None) -> int:
        """The row slot of an adapter (-1: the base)."""
        return -1 if name is None else self._slot[name]

    def _restack(self) -> None:
        names = list(self.adapters)
        self._slot = {n: i for i, n in enumerate(names)}
        paths = {p for a in self.adapters.values() for p in a.layers}
        self._stacks = {p: self._stack(p, names) for p in paths}
        self._adapts = {p: {i for i, n in enumerate(names) if p in self.adapters[n].layers} for p in paths}
        self.fused_stacks = []
        for path in self._fused_paths():
            A, Bt = self._stacks.get(path, (torch.Tensor(), torch.Tensor()))
            self.fused_stacks += [t[:-1].float().contiguous() if t.numel() else t for t in (A, Bt)]

    def _fused_paths(self) -> list[str]:
        """The fused step's products in its order: each block's qkv, proj, fc, mlp proj, then the head."""
        n_layer = getattr(getattr(self.model, "config", None), "n_layer", 0)
        return [f"blocks.{i}.{t}" for i in range(n_layer) for t in BLOCK_TARGETS] + ["lm_head"]

    def _stack(self, path: str, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """A (N + 1, r, in) and scale * B^T (N + 1, r, out), one slice per adapter slot (zeros where an adapter
        leaves the product alone, past an adapter's rank, and in the last slice: the base's rows)."""
        weights = [self.adapters[n].layers.get(path) for n in names]
        present = [w for w in weights if w is not None]
        r = max(w.rank for w in present)
        dtype = _wide(torch.cat([w.A.flatten()[:1] for w in present])).dtype
        m = dict(self.model.named_modules())[path]
        A = torch.zeros(len(names) + 1, r, m.in_features, dtype=dtype)
        Bt = torch.zeros(len(names) + 1, r, m.out_features, dtype=dtype)
        for i, w in enumerate(weights):
            if w is not None:
                A[i, : w.rank] = w.A.to(dtype)
                Bt[i, : w.rank] = (w.B.to(dtype) * w.scale).T
        return A, Bt

    # ---- rows ----------------------------------------------------------------------------------
    def batch(self, names: list[str | None]) -> LoRABatch | None:
        """The LoRABatch for rows whose adapters are `names` (None: the base); None when every row is the base."""
        if all(n is None for n in names):
            return None
        return LoRABatch(self, torch.tensor([self.slot(n) for n in names], dtype=torch.long))

    @contextlib.contextmanager
    def _applied(self, slots: torch.Tensor) -> Iterator[None]:
        first = int(slots[0])
        self._rows, self._single = slots, first if bool((slots == first).all()) else None
        try:
            yield
        finally:
            self._rows = self._single = None

    def _hook(self, path: str):
        def hook(module, args, y):
            stack = self._stacks.get(path) if self._rows is not None else None
            if stack is None:
                return None
            A, Bt = stack
            x = args[0]  # (B, ..., in): rows are dim 0
            if self._single is not None:  # every row the same adapter: no gathering
                if self._single in self._adapts[path]:
                    y += ((x.to(A.dtype) @ A[self._single].T) @ Bt[self._single]).to(y.dtype)
                return y
            xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (B, T, in)
            low = torch.bmm(xs, A[self._rows].transpose(1, 2))  # (B, T, r): each row by its own adapter's A
            y += torch.bmm(low, Bt[self._rows]).reshape(y.shape).to(y.dtype)
            return y

        return hook

    def close(self) -> None:
        """Remove the hooks: the model is the plain base again."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32: the low-rank products of a bfloat16 model run in float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class LoRABatch:
    """Which adapter each row of a forward uses: `with batch:` applies them (the model's hooks read it)."""

    def __init__(self, bank: AdapterBank, slots: torch.Tensor):
        self.bank, self.slots = bank, slots  # slots (B,) int64, -1: the base

    def select(self, rows) -> LoRABatch:
        """The same for a subset of the rows (a list or tensor of indices)."""
        return LoRABatch(self.bank, self.slots[torch.as_tensor(rows, dtype=torch.long)])

    def __enter__(self) -> LoRABatch:
        self._cm = self.bank._applied(self.slots)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._cm.__exit__(*exc)
