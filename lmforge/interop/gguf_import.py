"""GGUF import: a llama.cpp GGUF file -> an lmforge model, its tokenizer and chat template.

The file is read with llama.cpp's own `gguf` package (GGUFReader: metadata and memory-mapped tensors;
gguf.quants.dequantize for block types), and every step inverts what lmforge.interop.gguf's exporter (and
llama.cpp's convert_hf_to_gguf.py, which writes the same names and layouts) does:

- Config: lmforge.interop.gguf_arch (one `Arch` row per llama.cpp architecture).
- Weights: llama's q and k rows go back from adjacent-pair to half-split order (lmforge.interop.llama2c's
  permutation), q/k/v and gate/up are concatenated into lmforge's fused rows; Gemma's norms already hold w + 1 in
  GGUF, as in lmforge, so none is offset.
- Tensor types (see `plan_mode`): a file is read as one lmforge precision, the one most of its weight matrices'
  values map to: float32 for F32/F16/BF16, int4 for Q4_0, int8 for every other block type. Q4_0 weights become
  Int4Linear's bytes unchanged (lmforge's int4 is Q4_0's block layout). Every other block type is dequantized
  exactly (gguf.quants.dequantize) and re-rounded to the model's mode:
  - Q8_0 -> int8 (one scale per row, Q8_0 has one per 32 values): a weight moves by at most half its row's step,
    max|row| / 254; exact where the row's blocks share one scale. On the test models this moves the logits about
    as far again as Q8_0 itself moved them from F32's (tests/test_gguf_import.py).
  - K-quants (Q4_K, Q5_K, Q6_K) and the other block types -> int8, not int4: re-rounding them to Q4_0's blocks
    doubled their error on the test models (1.1-1.7x the file's own), while int8 adds about a sixteenth of a 4-bit
    step. The price is memory and decode speed: 8 bits a weight instead of the file's 4.5-6.6.
  - In an int4 model (a Q4_0 file), llama-quantize's Q6_K output head is re-rounded to Q4_0.
  Embeddings stay float, as in every lmforge model. What happened to each source type is counted in
  `GGUFImport.summary()`.

This module stops at our tensors (float, or Q4_0 rows for int4 weights) and the config: lmforge.loader builds the
model (lmforge.infer.quantize.build_model and state_for, a layer above interop). Anything this module does not
implement is refused with a GGUFImportError naming the metadata key (or tensor) and
its value. The tokenizer and chat template are lmforge.interop.gguf_vocab's job.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.interop.gguf import Q4_0_BLOCK_BYTES
from lmforge.interop.gguf_arch import ARCHS, ROPE_FACTORS, Arch, GGUFImportError, Metadata, config_from_gguf
from lmforge.interop.llama2c import interleaved_to_half_split
from lmforge.tokenizer import Tokenizer


def _gguf():
    try:
        import gguf  # llama.cpp's package; imported when used so that `lmforge --help` stays fast
    except ModuleNotFoundError:
        raise GGUFImportError(
            "reading a .gguf file needs llama.cpp's gguf package: pip install 'lmforge[gguf]'", param="model"
        ) from None
    return gguf


EMBEDDINGS = ("tok_emb.weight", "pos_emb.weight")  # float in every lmforge model
Q4_0_BLOCK = 32  # values in a Q4_0 block

# Per-layer tensors that map one to one (GGUF blk.{i}.<name> -> blocks.{i}.<ours>), weight and bias alike.
LAYER_TENSORS = {
    "attn_norm": "norm1",
    "ffn_norm": "norm2",
    "post_attention_norm": "post_norm1",
    "post_ffw_norm": "post_norm2",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "attn_qkv": "attn.qkv",
    "attn_output": "attn.proj",
    "ffn_down": "mlp.proj",
}


# ------------------------------------------------------------------------------------------------ weights


FLOAT_TYPES = ("F32", "F16", "BF16")
MODE_NAMES = {None: "float32", "int8": "int8", "int4": "int4"}


def plan_mode(tensors: dict) -> str | None:
    """The lmforge precision of the file's weight matrices: the one most of their values map to (None, float32, for
    float types; int4 for Q4_0; int8 for every other block type: see the module docstring)."""
    votes: Counter = Counter()
    for name, t in tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            kind = t.tensor_type.name
            votes[None if kind in FLOAT_TYPES else "int4" if kind == "Q4_0" else "int8"] += int(t.n_elements)
    return votes.most_common(1)[0][0] if votes else None


class Weights:
    """The file's tensors under lmforge's names: float32, or, for Q4_0 weights going into an int4 model, their
    raw Q4_0 rows (uint8, (out, blocks * 18)), which row permutations and concatenations keep whole."""

    def __init__(self, tensors: dict, mode: str | None):
        self.tensors, self.mode = tensors, mode
        self.used: set[str] = set()
        self.source: dict[str, list[str]] = {}  # our name -> GGUF type names it came from
        self.widened: set[str] = set()  # our names whose Q4_0 parts were dequantized (fused with another type)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise GGUFImportError(f"the GGUF file lacks the tensor {name!r} its metadata implies")
        self.used.add(name)
        Q = _gguf().GGMLQuantizationType
        if t.tensor_type == Q.Q4_0 and self.mode == "int4":
            return torch.from_numpy(np.array(t.data))
        try:
            values = _gguf().quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFImportError(
                f"tensor {name!r} has type {t.tensor_type.name}, which gguf.quants cannot dequantize"
            ) from None
        return torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mapped read-only

    def put(self, out: dict, ours: str, *names: str, heads: list | None = None) -> None:
        """out[ours] = the rows of `names` concatenated; `heads[i]` (if given) un-permutes part i's rows from
        adjacent-pair to half-split RoPE order in that many heads."""
        parts = [self.take(n) for n in names]
        if heads:
            parts = [interleaved_to_half_split(p, h) if h and p.dim() == 2 else p for p, h in zip(parts, heads)]
        if any(p.dtype == torch.uint8 for p in parts) and not all(p.dtype == torch.uint8 for p in parts):
            parts = [_dequantize_q4_0(p) if p.dtype == torch.uint8 else p for p in parts]
            self.widened.add(ours)
        out[ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.source[ours] = [self.tensors[n].tensor_type.name for n in names]


def _dequantize_q4_0(rows: torch.Tensor) -> torch.Tensor:
    gguf = _gguf()
    return torch.from_numpy(gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType.Q4_0).copy())


def lmforge_tensors(w: Weights, c: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """Our state dict (before quantization) from the GGUF tensors: the exporter's gguf_tensors, inverted."""
    out: dict[str, torch.Tensor] = {}
    w.put(out, "tok_emb.weight", "token_embd.weight")
    if c.pos == "learned":
        w.put(out, "pos_emb.weight", "position_embd.weight")
    w.put(out, "norm_f.weight", "output_norm.weight")
    if w.has("output_norm.bias"):
        w.put(out, "norm_f.bias", "output_norm.bias")
    if not c.tie_embeddings:
        w.put(out, "lm_head.weight", "output.weight")
        if c.bias:  # lmforge's untied GPT-2 head has a bias; llama.cpp's has none
            out["lm_head.bias"] = torch.zeros(c.vocab_size)
    elif w.has("output.weight"):
        w.used.add("output.weight")  # the same values as token_embd (checked by config_from_gguf)
    w.used.update(n for n in ROPE_FACTORS if w.has(n))  # read into the config's rope_scaling
    rope_heads = [c.n_head, c.n_kv_head, None] if arch.interleaved_rope else None
    for i in range(c.n_layer):
        b, p = f"blk.{i}.", f"blocks.{i}."
        for theirs, ours in LAYER_TENSORS.items():
            for part in ("weight", "bias"):
                if w.has(f"{b}{theirs}.{part}"):
                    w.put(out, f"{p}{ours}.{part}", f"{b}{theirs}.{part}")
        for part in ("weight", "bias"):
            if not arch.fused_qkv and w.has(f"{b}attn_q.{part}"):
                w.put(out, f"{p}attn.qkv.{part}", *(f"{b}attn_{x}.{part}" for x in "qkv"), heads=rope_heads)
            if not arch.fused_gate_up and w.has(f"{b}ffn_gate.{part}"):
                w.put(out, f"{p}mlp.fc.{part}", f"{b}ffn_gate.{part}", f"{b}ffn_up.{part}")
            elif w.has(f"{b}ffn_up.{part}"):  # phi3's [gate; up] rows, gpt2's one up projection
                w.put(out, f"{p}mlp.fc.{part}", f"{b}ffn_up.{part}")
    left = sorted(set(w.tensors) - w.used)
    if left:
        raise GGUFImportError(
            f"the GGUF file holds tensors lmforge's {arch.model_type} would ignore: {left[:5]}"
            f"{'...' if len(left) > 5 else ''}"
        )
    return out


# ------------------------------------------------------------------------------------------------- import


@dataclass
class GGUFImport:
    """What `read_gguf` read: the config (its `quantization` the file's precision), our tensors before
    quantization (float, or Q4_0 rows for int4 weights: lmforge.infer.quantize.state_for builds the model's state
    from them), what travels with the model, and the fate of each source tensor type."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None = None
    extras: dict[str, bytes] = field(default_factory=dict)
    arch: str = ""
    fates: Counter = field(default_factory=Counter)  # (GGUF type, what lmforge did) -> tensors
    notes: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str | None:
        return self.config.quantization

    def summary(self) -> str:
        """One line: per GGUF tensor type, how many tensors became what."""
        parts = [f"{kind} x{n} -> {fate}" for (kind, fate), n in sorted(self.fates.items())]
        return f"GGUF {self.arch} as an lmforge {MODE_NAMES[self.mode]} model: " + "; ".join(parts)


def _fate(kind: str, target: str | None, blocks_kept: bool = True) -> str:
    """What became of a `kind` tensor: a float one (target None) or a quantized Linear's weight (int8, int4)."""
    if target is None:  # embeddings, norms, biases, or the weights of a float model
        return "float32" + (" (exact)" if kind in FLOAT_TYPES else " (dequantized)")
    if kind == "Q4_0" and target == "int4" and blocks_kept:
        return "int4 (Q4_0 blocks unchanged)"
    return f"{target} (re-quantized)"


def _target(name: str, t: torch.Tensor, mode: str | None) -> str | None:
    """The precision lmforge.infer.quantize gives our tensor `name` in a `mode` model: Linear weights are quantized
    (int4 where their rows split into 32-value blocks, else int8), embeddings, norms and biases stay float."""
    if mode is None or not name.endswith(".weight") or t.dim() != 2 or name in EMBEDDINGS:
        return None
    inputs = t.shape[1] // Q4_0_BLOCK_BYTES * Q4_0_BLOCK if t.dtype == torch.uint8 else t.shape[1]
    return "int4" if mode == "int4" and inputs % Q4_0_BLOCK == 0 else "int8"


def _open(path: Path):
    """(reader, metadata, tensors by name) of a GGUF file of an architecture lmforge reads."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFImportError(f"{path} is not a readable GGUF file ({e})", param="model") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch not in ARCHS:
        raise GGUFImportError(
            f"general.architecture={arch!r} is not supported; lmforge reads {', '.join(ARCHS)}",
            param="general.architecture",
        )
    return reader, Metadata(reader, arch), {t.name: t for t in reader.tensors}


def read_gguf(path: str | os.PathLike) -> GGUFImport:
    """Read a GGUF file: its config, our tensors, tokenizer and chat template (as extras), and a report."""
    from lmforge.interop.gguf_vocab import read_vocab

    path = Path(path)
    _, meta, tensors = _open(path)
    arch = meta.arch
    config = config_from_gguf(meta, tensors, meta.get("general.name") or path.stem)
    mode = plan_mode(tensors)
    weights = Weights(tensors, mode)
    sd = lmforge_tensors(weights, config, ARCHS[arch])
    config = dataclasses.replace(config, quantization=mode)
    result = GGUFImport(config, sd, arch=arch)
    for ours, kinds in weights.source.items():
        for kind in kinds:
            result.fates[(kind, _fate(kind, _target(ours, sd[ours], mode), ours not in weights.widened))] += 1
    if mode is not None and config.tie_embeddings:  # the quantized head is a copy of the embedding's values
        kind = tensors["token_embd.weight"].tensor_type.name
        head = _target("lm_head.weight", sd["tok_emb.weight"], mode)
        result.fates[(kind, _fate(kind, head) + ", the tied head")] += 1
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "longrope" and scaling["short_factor"] != scaling["long_factor"]:
        result.notes.append(
            f"LongRoPE: lmforge turns a sequence by the long factors once it passes "
            f"{scaling['original_context']} tokens (as transformers does); llama.cpp does from the "
            f"start whenever its context is longer than that"
        )
    if not ARCHS[arch].uses_window and meta.get("{arch}.attention.sliding_window"):
        result.notes.append(f"{arch}.attention.sliding_window is ignored, as llama.cpp's {arch} does")
    result.tokenizer, result.extras = read_vocab(meta, config.vocab_size)
    return result


__all__ = ["ARCHS", "Arch", "GGUFImport", "GGUFImportError", "config_from_gguf", "plan_mode", "read_gguf"]
