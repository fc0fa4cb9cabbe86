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
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
