"""A fused decode step: one C++ call per generated token for decoder-only models on a CPU.

Decoding one token per row is a chain of about fifteen small operations per layer. Run one by one from Python,
each pays dispatch and thread start-up costs that, on a small model, add up to as much as streaming its weights
(bench/decode_vs_hf.py: the 14M model spends about 40% of a step outside its matrix products). `fused_decode.cpp`
runs the whole step (embeddings, every layer's norms, attention over the KV cache, MLP and residuals, the final
norm and the output head) in one call, with matrix-vector products that stream the float32 weights nn.Linear
already holds. Prefill, training and everything else keep the ordinary model code; for a float32 model
`prepare_for_decoding` swaps its nn.Linears for `GemmLinear`s holding the same weights, so a prompt's products run
at oneDNN's GEMM rate (lmforge.infer.packed) while the step streams those same weights.

The extension is compiled when lmforge is installed (setup.py, with PyTorch's own extension build), one module per
ISA variant (fused_build.py: AVX2, AVX-512), and imported here by the CPU's capability: nothing compiles, waits on
a lock or writes a cache at run time. After changing fused_decode.cpp, rebuild with `make ext` (or
`pip install -e .` again); until then the changed source's module is missing and decoding says so and falls back.
Where the step cannot run (not built, no AVX2, the classic post-norm model) `prepare_for_decoding` falls back to
oneDNN-packed linear layers (lmforge.infer.packed), and `decode_path(model)` says which one runs.

Supported: decoders with LayerNorm or RMSNorm before, after (on the sublayer's output) or around each sublayer,
learned or rotary positions (scaled, partial, per-layer tables), a GELU (exact or tanh), ReLU, SwiGLU or GeGLU
MLP, multi-head or grouped-query attention with any head size, q/k norms, sliding windows, score scales and
soft-caps, with or without biases, tied or separate output head: GPT-2, Llama and the gpt-* / llama-* presets,
llama2.c models and every imported family (Qwen, Mistral, Phi-3, Gemma 2/3, OLMo 2) alike; float32
weights, int8 ones with per-row scales or 4-bit ones in GGUF Q4_0's blocks (lmforge.infer.quantize's Int8Linear
and Int4Linear), which the kernel widens to float as it streams them, exactly: a quarter (int8) or 4.5/32 (4-bit)
of the bytes for the same arithmetic. bfloat16 models get their linear layers packed
for oneDNN (`prepare_for_decoding`) and the step hands each matrix product of all its rows to oneDNN's bfloat16
kernels, which at many rows (the serving engine's batches) beat any float32 kernel on CPUs with AMX or AVX-512
BF16; the rest of the step stays float32, the KV cache float32, bfloat16 or float16. Their rows' logits may differ
in the last bfloat16 place with the batch (oneDNN's kernel depends on the row count); float32, int8 and 4-bit rows
do not.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from lmforge.infer import fused_build
from lmforge.infer.packed import PackedLinear, gemm_linears, pack_linears
from lmforge.model import Block, KVCache, Transformer
from lmforge.rope import long_rope_switch

log = logging.getLogger(__name__)

_ACT = {"gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu": 4, "geglu_tanh": 5}
_extension = None
_build_error: str | None = None


def _load_extension():
    """The extension module built for this CPU at install time, or None (the reason is kept for
    `unsupported_reason`, and logged once: the line that says decoding falls back to packed linear layers)."""
    global _extension, _build_error
    if _extension is None and _build_error is None:
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in fused_build.CHOICES:
            _build_error = f"the CPU lacks AVX2 ({capability})"
            return None
        failures = []
        for variant in fused_build.CHOICES[capability]:
            name = fused_build.module_name(variant, torch.__version__)
            try:
                _extension = importlib.import_module(f"{__package__}.{name}")
                break
            except ImportError as e:  # not built (ModuleNotFoundError), or built against another torch
                if not isinstance(e, ModuleNotFoundError) or e.name != f"{__package__}.{name}":
                    failures.append(f"{name}: {e}")
        else:
            if failures:
                _build_error = f"the fused decode step did not load ({'; '.join(failures)})"
            elif fused_build.built_modules():
                _build_error = (
                    "the fused decode step was built from another fused_decode.cpp or torch: "
                    "rebuild it with `make ext` (or pip install --no-build-isolation lmforge again)"
                )
            else:
                _build_error = (
                    "the fused decode step was not built when lmforge was installed (no C++ compiler "
                    "then?): install one and run `make ext` (or pip install --no-build-isolation "
                    "lmforge again)"
                )
            log.warning("lmforge: %s; decoding with packed linear layers instead", _build_error)
    return _extension


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `model` cannot decode through the fused step, or None when it can."""
    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not an lmforge Transformer"
    c = model.config
    if c.norm_placement == "post" or c.pos not in ("learned", "rope") or c.mlp not in _ACT:
        return (
            f"norm_placement={c.norm_placement!r}, pos={c.pos!r}, mlp={c.mlp!r}: the fused step runs models "
            f"with norms before or on their sublayers, learned or rotary positions and a {'/'.join(_ACT)} MLP"
        )
    if not c.final_norm:
        return f"final_norm={c.final_norm} is not fused"
    if c.qk_norm is not None and c.norm != "rmsnorm":
        return f"qk_norm={c.qk_norm!r} with norm={c.norm!r}: the fused step norms q and k with RMSNorm"
    for module in model.modules():
        if type(module).__module__.startswith("lmforge.infer") and type(module).__name__ not in (
            "Int8Linear",
            "Int4Linear",
            "PackedLinear",
            "GemmLinear",
        ):
            return f"{type(module).__name__} layers are not fused"
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
            return "bfloat16 linear layers run packed for oneDNN (prepare_for_decoding packs them where it can)"
        params, buffers = list(module.parameters(recurse=False)), list(module.buffers(recurse=False))
        quantized = type(module).__name__ in ("Int8Linear", "Int4Linear")  # lmforge.infer.quantize's
        floats = params if quantized else params + buffers  # the kernel checks quantized weights and scales
        if any(t.dtype not in (torch.float32, torch.bfloat16) for t in floats) or any(
            t.device.type != "cpu" for t in params + buffers
        ):
            return "the fused step runs float32, bfloat16 (or int8- or 4-bit-weight) models on the CPU"
    if _load_extension() is None:
        return _build_error
    return None


class FusedDecoder:
    """New tokens through the whole model in one call, reading and writing a contiguous `KVCache` (advanced) or
    the serving engine's paged pool (`paged`).

    decoder(tokens (B,), cache) -> logits (B, V): one decode step.
    decoder(tokens (B, T), cache, last) -> logits (B, last, V) of each row's last `last` tokens: a few tokens at
    once (speculative verification). Every row's arithmetic is the same whatever else is in the call, so a token's
    logits do not depend on the batch or on T. Prompts of many tokens are matrix-matrix work that PyTorch's own
    kernels do well: callers send those through the model (`MAX_TOKENS`).
    """

    MAX_TOKENS = 16

    def __init__(self, model: Transformer):
        c = model.config
        self.n_head, self.eps, self.act = c.n_head, float(c.norm_eps), _ACT[c.mlp]
        self.windows = [c.layer_window(i) or 0 for i in range(c.n_layer)]
        self.scalars = [
            c.attn_scale or 0.0,
            c.attn_softcap or 0.0,
            c.logit_softcap or 0.0,
            c.n_embd**0.5 if c.embed_scale else 0.0,
        ]
        self.long_from = long_rope_switch(c)  # LongRoPE: rows whose sequence reaches it turn by the long tables
        none = torch.Tensor()  # an empty tensor marks an absent bias or scale

        def tensor(t):  # float32: bfloat16 models' norms, biases and rotary tables widened (small copies)
            return none if t is None else t.detach().float()

        def linear(module):  # weight (oneDNN-packed for PackedLinear), scales (int8: float32, 4-bit: float16), bias
            weight = module.packed if isinstance(module, PackedLinear) else module.weight.detach()
            scales = getattr(module, "scales", None)  # 4-bit blocks' float16 scales go as they are
            return [weight, scales if weight.dtype == torch.uint8 else tensor(scales), tensor(module.bias)]

        def norm(module):  # weight, bias (RMSNorm has none); an nn.Identity (no norm there) gives empty ones
            return [tensor(getattr(module, "weight", None)), tensor(getattr(module, "bias", None))]

        self.params: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []  # per layer: q_norm, k_norm, post_norm1 (w, b), post_norm2 (w, b)
        for block in model.blocks:
            assert isinstance(block, Block)  # what the Transformer is made of (for the type checker)
            self.params += [
                *norm(block.norm1),
                *linear(block.attn.qkv),
                *linear(block.attn.proj),
                *norm(block.norm2),
                *linear(block.mlp.fc),
                *linear(block.mlp.proj),
            ]
            attn = block.attn
            self.norms += [
                tensor(attn.q_norm.weight) if attn.qk_norm else none,
                tensor(attn.k_norm.weight) if attn.qk_norm else none,
                *norm(block.post_norm1),
                *norm(block.post_norm2),
            ]
        self.params += [
            model.tok_emb.weight.detach(),
            tensor(None if model.pos_emb is None else model.pos_emb.weight),
            *norm(model.norm_f),
            *linear(model.lm_head),
        ]
        self.rms = c.norm == "rmsnorm"
        self.ropes = [
            tensor(getattr(model, f"rope{which}_{part}", None))
            for which in ("", "_local", "_long")
            for part in ("cos", "sin")
        ]  # empty where the model has no such table
        self.params = [
            p if p.is_mkldnn else p.contiguous() for p in self.params
        ]  # a no-op for the usual, contiguous weights
        self.norms = [p.contiguous() for p in self.norms]
        self.ropes = [p.contiguous() for p in self.ropes]
        self.extension = _load_extension()

    def accepts(self, cache, new_tokens: int = 1) -> bool:
        """Whether `cache` (a contiguous KVCache or the engine's PagedKVCache) can take `new_tokens` per row here."""
        known = type(cache).__name__ in ("KVCache", "PagedKVCache")  # exactly the layouts the kernel addresses
        return (
            known
            and cache.k.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and cache.v.dtype == cache.k.dtype
            and cache.k.is_contiguous()
            and cache.v.is_contiguous()
            and new_tokens <= self.MAX_TOKENS
        )

    def _run(self, tokens, lo, start, last, cache, block_table, long_rows=None, lora=None, lengths=None):
        if long_rows is None and self.long_from is not None:  # rows whose last new position is past the switch
            fed = lengths if lengths is not None else tokens.shape[1]
            long_rows = start + fed - 1 - lo >= self.long_from
        long_rows = torch.Tensor() if long_rows is None else torch.as_tensor(long_rows, dtype=torch.bool)
        stacks, slots = (lora.bank.fused_stacks, lora.slots) if lora is not None else ([], torch.Tensor())
        return self.extension.forward_step(
            tokens,
            torch.Tensor() if lengths is None else lengths,
            lo,
            start,
            last,
            cache.k,
            cache.v,
            block_table,
            self.params,
            self.norms,
            self.n_head,
            self.eps,
            self.act,
            self.rms,
            self.ropes,
            long_rows.contiguous(),
            self.windows,
            self.scalars,
            stacks,
            slots,
        )

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, last: int = 1) -> torch.Tensor:
        step = tokens.dim() == 1
        tokens = (tokens[:, None] if step else tokens).to(torch.long).contiguous()
        B, T = tokens.shape
        lo = cache.pad.to(torch.long).contiguous() if cache.pad is not None else torch.zeros(B, dtype=torch.long)
        start = torch.full((B,), cache.length, dtype=torch.long)
        logits = self._run(tokens, lo, start, last, cache, torch.Tensor())
        cache.advance(T)
        return logits[:, 0] if step else logits

    @torch.no_grad()
    def paged(
        self,
        feeds: Sequence[Sequence[int]],
        cache,
        block_table: torch.Tensor,
        starts: Sequence[int],
        last: int = 1,
        long_rope: Sequence[bool] | None = None,
        *,
        lora=None,
    ) -> torch.Tensor:
        """Rows of the serving engine's pool (lmforge.engine.forward): row b feeds the tokens feeds[b] at
        positions starts[b].. (its cached tokens), its blocks block_table[b] ((B, blocks) int64, as
        lmforge.engine.paged_cache.block_table_tensor lays them out). Logits (B, last, V) of each row's last `last`
        tokens; a row of n < last tokens has the logits of all n first, zeros after them. Rows of different
        lengths share the call without computing padding (a speculative check beside plain decoding rows).
        long_rope: the rows that turn by LongRoPE's long factors (default: those whose last new position is past
        the original context). `lora` (lmforge.infer.multi_lora.LoRABatch): row b's LoRA adapter, added after
        each of its products in the step."""
        lengths = [len(f) for f in feeds]
        T = max(lengths)
        if min(lengths) == T:
            tokens, fed = torch.tensor(feeds, dtype=torch.long), None
        else:
            tokens = torch.zeros(len(feeds), T, dtype=torch.long)
            for b, f in enumerate(feeds):
                tokens[b, : len(f)] = torch.as_tensor(f, dtype=torch.long)
            fed = torch.tensor(lengths, dtype=torch.long)
        lo = torch.zeros(len(feeds), dtype=torch.long)
        starts_t = torch.tensor(starts, dtype=torch.long)
        return self._run(tokens, lo, starts_t, last, cache, block_table, long_rope, lora=lora, lengths=fed)


def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Make an inference model decode fast: attach a `FusedDecoder` where supported, else pack its linear layers
    for oneDNN. bfloat16 models are packed first: the fused step multiplies by their packed weights. Returns the
    model (changed in place)."""
    if next(model.parameters()).dtype == torch.bfloat16:
        pack_linears(model)
    reason = unsupported_reason(model)
    if reason is None and isinstance(model, Transformer):  # (the first thing unsupported_reason checks)
        gemm_linears(model)  # float32 prompts through oneDNN's GEMM; the step reads the same weights
        model.fused_decoder = FusedDecoder(model)
        return model
    log.debug("fused decode unavailable (%s); packing linear layers", reason)
    return pack_linears(model)


def decode_path(model: nn.Module) -> str:
    """'fused', 'packed' or 'plain': how `lmforge.infer.generate.decode_step` runs this model."""
    if getattr(model, "fused_decoder", None) is not None:
        return "fused"
    return "packed" if any(isinstance(m, PackedLinear) for m in model.modules()) else "plain"
