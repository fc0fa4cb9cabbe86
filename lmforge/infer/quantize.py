"""Weight-only quantization: every Linear becomes an `Int8Linear` (int8, one scale per output row) or an
`Int4Linear` (4-bit, one scale per block of 32 inputs).

Two steps, as gpt-fast's `WeightOnlyInt8QuantHandler`:

- offline, `quantize_model(model, mode)` rounds each Linear's weight and swaps the module in place; the model's
  config records `quantization=mode`, so `save_model` writes a folder that says what it holds.
- at load time, `build_model(config)` (which lmforge.loader.load hands to lmforge.checkpoint.load_model) sees the
  mode in the config and calls `convert_for_runtime(model, mode)`, which swaps in empty modules of the right
  shapes for the saved state dict to be loaded into.

int8: w_int8 = round(W / s), s = max|W[row]| / 127 (symmetric, per output row, s in W's float dtype).

int4 is GGUF's Q4_0, bit for bit: each row is cut into blocks of 32 inputs; a block's scale is d = m / -8, m its
value of largest magnitude (sign kept), stored as float16; its values are q = min(15, trunc(w / d + 8.5)), four bits
each, standing for (q - 8) * d; byte i of a block holds q[i] in its low nibble and q[16 + i] in its high one. No zero
point: Q4_0 has none, so a GGUF Q4_0 tensor and an lmforge int4 one are the same bytes (export and import are
lossless, and one kernel serves both), and symmetric blocks cost nothing in the product (an offset would add a
per-block sum of the activations to every dot). The block's largest weight lands exactly on -8 * d, the other side
gets 7 steps: the asymmetric range is used in full on one side. The group is 32 and only 32: it is Q4_0's block,
the checkpoint records only the mode, and a group of 64 or 128 would save 0.25 or 0.375 bits a weight (4.5 -> 4.25)
for a larger rounding error. A layer whose input width is not a multiple of 32 (stories260K's 172) gets int8.

The output head is quantized like any Linear. When it is tied to the token embedding (GPT-2), the embedding stays
float -- a lookup reads one row per token, so fewer bits would save memory but no time -- and the head gets its
own quantized copy: the tie is broken, the file holds the float embedding plus the quantized head.

The products. Decoding (a few rows) runs in the fused C++ step (lmforge.infer.fused), which widens int8 and 4-bit
weights to float in registers as they stream in; an eager call of a few rows uses the same kernel.
Many rows (a prompt) are matrix-matrix work: the weight is dequantized and multiplied by oneDNN's GEMM
(lmforge.infer.packed.gemm) in bfloat16 where the CPU has bfloat16 kernels (AVX-512 BF16, AMX), else in the
activations' dtype. bfloat16 runs at 370-385 GFLOP/s a core against float32's 215 (AMD EPYC Zen 5, 512 rows), for
a rounding of the activations to bfloat16 (llama.cpp rounds them to 8 bits for its Q8_0 and Q4_0 products) and, for
4-bit weights, of each (q - 8) * d to bfloat16 (2^-9 relative; int8 values are exact in it, the row scale applied
after the product in float32). Dequantizing costs about what a few dozen of its rows' products do, so it pays from
`Q4_GEMM_ROWS` (int8: `GEMM_ROWS`) rows on and is a few percent of a prompt of hundreds.
Without the compiled step, a few rows of int8 go through `torch._weight_int8pack_mm`, whose float32 kernel is a
slow reference loop in torch 2.13 while its bfloat16 one is vectorised: activations are rounded to bfloat16 for
it. That kernel needs the input width to be a multiple of its vector (16 on AVX-512; other widths return garbage
or segfault in torch 2.13); other widths, and other devices (CUDA, MPS), take the cast-weight formula.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.packed import GEMM_ROWS, bf16_gemm_available, gemm
from lmforge.model import Transformer

MODES = ("int8", "int4")
Q4_BLOCK = 32  # inputs per 4-bit block: GGUF Q4_0's
# From this many rows on, a 4-bit product dequantizes and runs one GEMM; below, the decode step's kernel: 160-180
# GFLOP/s a core at any row count, which dequantize + GEMM only passes from about 64 rows (AMD EPYC Zen 5, 1
# thread, 4096 x 768 and 768 x 2048: 185 vs 171 at 64 rows, 154 vs 170 at 32).
Q4_GEMM_ROWS = 64


class QuantizationError(LmforgeError):
    """A quantization request that cannot be done; the message names the mode or the model state."""


def check_mode(mode: str | None) -> str:
    if mode not in MODES:
        raise QuantizationError(f"quantization mode {mode!r} is not supported; choose one of {MODES}", param="mode")
    return mode


def _kernels():
    """The fused step's compiled extension (its products and 4-bit dequantizer), or None where it was not built."""
    from lmforge.infer.fused import _load_extension

    return _load_extension()


def _prompt_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a prompt's product over dequantized weights runs in: bfloat16 where oneDNN has its kernels."""
    return torch.bfloat16 if bf16_gemm_available() else x.dtype


def _kernel_rows(ext, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
    """x (..., in) through the decode step's own kernel (float32, weights widened in registers), in x's dtype."""
    b = torch.Tensor() if bias is None else bias.float().contiguous()
    y = ext.linear_act(x.reshape(-1, x.shape[-1]).float().contiguous(), weight, scales, b, 0)
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------------ int8


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
    rows = x.numel() // x.shape[-1]
    ext = _kernels() if x.device.type == "cpu" and rows < GEMM_ROWS else None
    if ext is not None:  # a few rows: the decode step's kernel, float32 throughout
        return _kernel_rows(ext, x, weight, scales.float().contiguous(), bias)
    if x.device.type == "cpu" and rows >= GEMM_ROWS:  # a prompt: one GEMM on the exact int8 values, then the scales
        dtype = _prompt_dtype(x)
        y = (gemm(x.to(dtype), weight.to(dtype)).float() * scales.float()).to(x.dtype)
    elif x.device.type == "cpu" and weight.shape[1] % 16 == 0:  # other widths: wrong sums or a crash (torch 2.13)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the vectorised kernel's activation dtype
        y = torch._weight_int8pack_mm(x2, weight, scales.to(torch.bfloat16)).to(x.dtype)
        y = y.view(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)
    return y if bias is None else y + bias


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the sizes, a float bias (if any), and `from_linear`, which fills the
    subclass's `weight` and `scales` buffers with its `quantize` of the float weight."""

    weight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight buffer, scales buffer) for a float weight (out, in)."""
        raise NotImplementedError

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        q.weight, q.scales = cls.quantize(w)
        if q.bias is not None:  # exactly when the linear has one
            q.bias.copy_(linear.bias)
        return q

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """A Linear with int8 weight (out, in) and float scales (out,) as buffers; the bias (if any) stays float."""

    quantize = staticmethod(quantize_int8)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, device=None
    ):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scales, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float weight (out, in) this module stands for (for tests and inspection)."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]


# ------------------------------------------------------------------------------------------------ int4


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 of weight (out, in), in % 32 == 0 -> (packed (out, in/2) uint8, scales (out, in/32) float16).

    ggml's reference quantizer, step for step (float32 arithmetic, the scale rounded to float16 only when stored),
    so that the bytes equal `gguf.quants.quantize(weight, Q4_0)`'s.
    """
    out, n = weight.shape
    if n % Q4_BLOCK:
        raise QuantizationError(f"4-bit blocks take {Q4_BLOCK} inputs; a row of {n} does not split into them")
    w = weight.detach().float().reshape(out, n // Q4_BLOCK, Q4_BLOCK)
    extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True))  # the largest magnitude, its sign kept
    d = extreme / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(w * inv + 8.5).clamp(0, 15).to(torch.uint8)  # (out, blocks, 32)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte i: value i low, value 16 + i high
    return packed.reshape(out, n // 2), d.squeeze(-1).to(torch.float16)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight (out, in) of 4-bit `packed` (out, in/2) and `scales` (out, in/32): (q - 8) * d."""
    out, half = packed.shape
    blocks = packed.reshape(out, half // 16, 16)
    q = torch.cat([blocks & 15, blocks >> 4], dim=-1).float() - 8  # (out, blocks, 32)
    return (q * scales.float()[..., None]).reshape(out, 2 * half)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequantize_int4(packed, scales).T + bias for x (..., in), in x's dtype (a prompt's product in
    bfloat16 where oneDNN has its kernels: see the module's docstring)."""
    rows = x.numel() // x.shape[-1]
    ext = _kernels() if x.device.type == "cpu" else None
    if ext is not None and rows < Q4_GEMM_ROWS:  # a few rows: the decode step's kernel, widened in registers
        return _kernel_rows(ext, x, packed, scales, bias)
    w = ext.dequantize_q4(packed, scales) if ext is not None else dequantize_int4(packed, scales)
    if x.device.type == "cpu":
        dtype = _prompt_dtype(x)
        y = gemm(x.to(dtype), w.to(dtype)).to(x.dtype)
        return y if bias is None else y + bias
    return F.linear(x, w.to(x.dtype), bias)


class Int4Linear(QuantizedLinear):
    """A Linear with 4-bit weight packed as Q4_0 (out, in/2) uint8 and float16 block scales (out, in/32) as
    buffers; the bias (if any) stays float. The scales stay float16 when the model is cast (`model.to(dtype)`)."""

    quantize = staticmethod(quantize_int4)

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, device=None
    ):
        if in_features % Q4_BLOCK:
            raise QuantizationError(f"4-bit blocks take {Q4_BLOCK} inputs; in_features={in_features} does not split")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales", torch.empty(out_features, in_features // Q4_BLOCK, dtype=torch.float16, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.weight, self.scales, self.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) this module stands for (for tests and inspection)."""
        return dequantize_int4(self.weight, self.scales)

    def _apply(self, fn, recurse=True):
        scales = self._buffers.pop("scales")  # moved with the module, never cast: they are Q4_0's float16 d
        assert scales is not None
        super()._apply(fn, recurse)
        moved = fn(scales)
        self._buffers["scales"] = moved if moved.dtype == torch.float16 else scales.to(moved.device)
        return self


# ------------------------------------------------------------------------------------------- the model


def _quantized_class(mode: str, linear: nn.Linear) -> type[QuantizedLinear]:
    """The module a Linear becomes: int4 where its input width splits into 32-value blocks, else int8."""
    return Int4Linear if mode == "int4" and linear.in_features % Q4_BLOCK == 0 else Int8Linear


def _swap_linears(model: nn.Module, make) -> int:
    """Replace every nn.Linear below `model` by make(linear); returns how many were replaced."""
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)


def _record_mode(model: nn.Module, mode: str) -> None:
    if isinstance(model, Transformer):
        model.config = dataclasses.replace(model.config, quantization=mode)


def _check_unquantized(model: nn.Module) -> None:
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise QuantizationError("the model is already quantized; quantize the float checkpoint instead")


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantize every Linear of `model` in place (output head included) and record `mode` in model.config."""
    check_mode(mode)
    _check_unquantized(model)
    if _swap_linears(model, lambda linear: _quantized_class(mode, linear).from_linear(linear)) == 0:
        raise QuantizationError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    _record_mode(model, mode)
    return model


def convert_for_runtime(model: nn.Module, mode: str) -> nn.Module:
    """Swap in empty quantized modules of the right shapes, ready for a saved quantized state dict to be loaded."""
    check_mode(mode)
    _check_unquantized(model)

    def empty(linear: nn.Linear) -> nn.Module:
        w = linear.weight
        return _quantized_class(mode, linear)(
            linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device
        )

    _swap_linears(model, empty)
    _record_mode(model, mode)
    return model


def build_model(config: ModelConfig) -> Transformer:
    """The empty model for a config, with quantized modules swapped in when the config records a quantization."""
    model = Transformer(config)
    if config.quantization:
        convert_for_runtime(model, config.quantization)
    return model


def state_for(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (our names; float, or GGUF Q4_0 rows (out, blocks * 18) uint8, as lmforge.interop.gguf_import
    reads them) in the layouts of `model`'s modules: Q4_0 rows into an Int4Linear's bytes unchanged, other weights
    of a quantized Linear rounded by its own quantizer, Q4_0 rows anywhere else dequantized. A quantized model's
    tied head gets its own copy of the embedding's values, as `quantize_model` gives it."""
    from lmforge.interop.gguf import int4_from_q4_0_rows

    def widened(t: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(*int4_from_q4_0_rows(t)) if t.dtype == torch.uint8 else t

    own = model.state_dict()
    tensors = dict(tensors)
    if "lm_head.scales" in own and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    out = {}
    for name, t in tensors.items():
        scales = name.removesuffix("weight") + "scales"
        if not name.endswith(".weight") or scales not in own:
            out[name] = widened(t)
        elif own[name].dtype == torch.uint8:
            out[name], out[scales] = int4_from_q4_0_rows(t) if t.dtype == torch.uint8 else quantize_int4(t)
        else:
            out[name], out[scales] = quantize_int8(widened(t))
            out[scales] = out[scales].to(own[scales].dtype)
    return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_mkldnn else t.data_ptr()  # oneDNN-packed weights have no storage to point at
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
