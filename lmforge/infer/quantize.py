"""Weight-only int8 quantization: every Linear becomes an `Int8Linear` (int8 weights, one scale per output row).

Two steps, as gpt-fast's `WeightOnlyInt8QuantHandler`:

- offline, `quantize_model(model, "int8")` rounds each Linear's weight W (out, in) to
  w_int8 = round(W / s) with s = max|W[row]| / 127 (symmetric, per output channel, s in W's float dtype) and
  swaps the module in place; the model's config records `quantization="int8"`, so `save_model` writes a folder
  that says what it holds.
- at load time, `build_model(config)` (which lmforge.loader.load hands to lmforge.checkpoint.load_model) sees the
  mode in the config and calls `convert_for_runtime(model, mode)`, which swaps in `Int8Linear`s with empty
  buffers of the right shapes for the saved int8 state dict to be loaded into.

The output head is quantized like any Linear. When it is tied to the token embedding (GPT-2), the embedding stays
float -- a lookup reads one row per token, so int8 would save memory but no time -- and the head gets its own
int8 copy: the tie is broken, the file holds the float embedding plus the int8 head.

The matmul: on CPU, `torch._weight_int8pack_mm` reads the int8 weight directly. Its float32 kernel is a slow
reference loop in torch 2.13 while its bfloat16 kernel is vectorised, so activations are rounded to bfloat16 for
the product (accumulation is in float32 inside the kernel) and the result is cast back to the input dtype.
The kernel needs the input width to be a multiple of its vector: 8 on AVX2, 16 on AVX-512, where other widths
return garbage or segfault (torch 2.13); narrower or odd widths take the cast-weight formula below.
Elsewhere (CUDA, MPS) the weight is cast to the activation dtype and the product scaled, gpt-fast's formula.
int4 group-wise is not offered: on this project's AVX2 CPU `_weight_int4pack_mm_for_cpu` (torch 2.13) ran 15-30x
slower than the float32 matmul at batch 1 (bench/quantize.py prints the kernel timings), so it does not pay here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

MODES = ("int8",)


class QuantizationError(LmforgeError):
    """A quantization request that cannot be done; the message names the mode or the model state."""


def check_mode(mode: str | None) -> str:
    if mode not in MODES:
        hint = (" (int4 is not implemented: its CPU kernel is slower than float32 here, see bench/quantize.py)"
                if mode == "int4" else "")
        raise QuantizationError(f"quantization mode {mode!r} is not supported; choose one of {MODES}{hint}")
    return mode


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight (out, in) float -> (w_int8 (out, in) int8, scales (out,) in weight's dtype).

    weight ~= w_int8 * scales[:, None]; a row of zeros gets scale 1 (any scale is exact for it).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return w_int8, scales.to(weight.dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ (weight * scales[:, None]).T + bias for x (..., in), int8 weight (out, in), scales (out,)."""
    if x.device.type == "cpu" and weight.shape[1] % 16 == 0:  # other widths: wrong sums or a crash (torch 2.13)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the vectorised kernel's activation dtype
        y = torch._weight_int8pack_mm(x2, weight, scales.to(torch.bfloat16)).to(x.dtype)
        y = y.view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias


class Int8Linear(nn.Module):
    """A Linear with int8 weight (out, in) and float scales (out,) as buffers; the bias (if any) stays float."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q.weight, q.scales = quantize_int8(w)
        if q.bias is not None:  # exactly when the linear has one
            q.bias.copy_(linear.bias)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float weight (out, in) this module stands for (for tests and inspection)."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap_linears(model: nn.Module, make) -> int:
    """Replace every nn.Linear below `model` by make(linear); returns how many were replaced."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def _record_mode(model: nn.Module, mode: str) -> None:
    if isinstance(model, Transformer):
        model.config = dataclasses.replace(model.config, quantization=mode)


def _check_unquantized(model: nn.Module) -> None:
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise QuantizationError("the model is already quantized; quantize the float checkpoint instead")


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize every Linear of `model` in place (output head included) and record `mode` in model.config."""
    check_mode(mode)
    _check_unquantized(model)
    if _swap_linears(model, Int8Linear.from_linear) == 0:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    _record_mode(model, mode)
    return model


def convert_for_runtime(model: nn.Module, mode: str) -> nn.Module:
    """Swap in empty `Int8Linear`s of the right shapes, ready for a saved quantized state dict to be loaded."""
    check_mode(mode)
    _check_unquantized(model)

    def empty(linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)

    _swap_linears(model, empty)
    _record_mode(model, mode)
    return model


def build_model(config: ModelConfig) -> Transformer:
    """The empty model for a config, with `Int8Linear`s swapped in when the config records a quantization."""
    model = Transformer(config)
    if config.quantization:
        convert_for_runtime(model, config.quantization)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-packed weights have no storage to point at
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
