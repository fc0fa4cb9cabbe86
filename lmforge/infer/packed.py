"""Inference-only linear layers whose weights are pre-packed for oneDNN, swapped in like quantized layers.

On a CPU, decoding multiplies a few rows of activations by every weight matrix, so it runs at the speed the
weights stream from memory. PyTorch's default float32 path (MKL) streams them slowly for one to a few dozen
rows; oneDNN with the weight reordered once into its blocked layout streams them faster and handles any number
of rows, so one packed copy serves prefill and decode alike (bench/decode_vs_hf.py measures both paths side by
side with Hugging Face transformers). The packed weight replaces the float one, so the model stays the same size;
a head tied to the token embedding gets its own packed copy while the embedding stays float.

The layout is chosen for a number of rows (`batch_hint`); 8 measured as fast as 1 for single-row decoding and
1.5-2x faster for 8 to 32 rows (prefill, batched decode), so it is the default. bfloat16 models pack too: oneDNN's
bfloat16 kernels (AMX tiles on CPUs that have them) were 1.3-5x faster than `F.linear` in bfloat16 for 1 to 32
rows here, and the fused decode step (lmforge.infer.fused) runs its matrix products on these packed weights.

`pack_linears` is for inference: packed layers hold no trainable parameters and are not saved in checkpoints.

Prompts (many rows) are matrix-matrix work, bound by the CPU's GEMM rate rather than by memory. PyTorch sends a
float32 `F.linear` to MKL, which on AMD CPUs takes a generic path: 190 GFLOP/s where oneDNN reaches 450-475 on the
same 2-core AMD EPYC (Zen 5, AVX-512) for 512 x 768 x 2304. `gemm` hands a product of many rows to oneDNN with the
weight as it is (oneDNN reorders it per call, about 5% of a 512-row product), so the fused decode step keeps
reading the plain weight and no second copy is held; `GemmLinear` is the nn.Linear that does that for the prompt
and keeps F.linear for a few rows; quantized layers dequantize into the same `gemm` (lmforge.infer.quantize).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GEMM_ROWS = 16  # from this many rows on, a product goes to oneDNN's GEMM (fewer: its per-call reorder dominates)


def bf16_gemm_available() -> bool:
    """Whether oneDNN has bfloat16 GEMM kernels for this CPU (AVX-512 BF16, AMX): about twice float32's rate."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T + bias through oneDNN, weight unpacked (float32 or bfloat16, on the CPU)."""
    if (
        torch.backends.mkldnn.is_available()
        and x.dtype == weight.dtype
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and bf16_gemm_available()))
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class GemmLinear(nn.Module):
    """An nn.Linear (the same weight and bias parameters, not copies) whose products of many rows go to `gemm`."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= GEMM_ROWS * self.in_features and x.device.type == "cpu":
            return gemm(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def gemm_linears(model: nn.Module) -> nn.Module:
    """Swap every float32 CPU nn.Linear of an inference model for a GemmLinear sharing its parameters (tied weights
    stay tied), where oneDNN is available. Returns the model (changed in place)."""
    if not torch.backends.mkldnn.is_available():
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, GemmLinear(child))
    return model


def packing_available(model: nn.Module) -> bool:
    """oneDNN packing applies to float32 models on the CPU when PyTorch was built with oneDNN, and to bfloat16
    ones where oneDNN has bfloat16 kernels for this CPU (AVX-512 and up)."""
    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (reordered once, for `batch_hint` rows)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def pack_linears(model: nn.Module, batch_hint: int = 8) -> nn.Module:
    """Swap every nn.Linear of a float32 or bfloat16 CPU model for a PackedLinear, in place, where
    `packing_available`; other models are returned as they are. Returns the model."""
    if not packing_available(model):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, batch_hint))
    return model
