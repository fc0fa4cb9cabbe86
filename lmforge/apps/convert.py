"""The verbs that turn one model file into another: `import` (any format -> an lmforge folder), `export` (-> a
Hugging Face folder or a GGUF file) and `quantize` (-> an int8 or int4 lmforge folder).

Each is load (lmforge.loader, weights as stored) -> convert -> write atomically; the files a model carries
besides its weights (tokenizer_config.json with the chat template, generation_config.json) travel with it.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from lmforge.checkpoint import save_model
from lmforge.errors import LmforgeError
from lmforge.infer.quantize import check_mode, model_bytes, quantize_model
from lmforge.loader import load

log = logging.getLogger(__name__)


def import_command(source: str, out: str, tokenizer: str | None = None) -> None:
    """Import a Hugging Face folder, a llama2.c model file or a llama.cpp GGUF file into an lmforge model folder.

    A GGUF file's quantized weights become lmforge int4 or int8 (Q4_0 unchanged, other block types re-quantized);
    what happened to each tensor type is printed.

    Args:
        source: a Hugging Face model folder (config.json + weights + tokenizer.json), a llama2.c model .bin, or a
            .gguf file (tokenizer and chat template embedded).
        out: the lmforge model folder to write (replaced atomically if it exists).
        tokenizer: the tokenizer to use instead of the one found with the model (for llama2.c: its tokenizer .bin).
    """
    loaded = load(source, tokenizer=tokenizer, prepare=False)
    model, tok = loaded.model, loaded.tokenizer
    save_model(out, model, tok, extra_files=loaded.extras)
    for note in loaded.notes:
        print(note)
    c = model.config
    print(
        f"imported {source} -> {out}: {c.n_layer} layers, {c.n_embd} dims, vocab {c.vocab_size}, "
        f"{model.num_params() / 1e6:.2f}M parameters, tokenizer {getattr(tok, 'kind', None)}"
    )


def export_command(
    model: str,
    out: str,
    format: Literal["hf", "gguf"] = "hf",
    gguf_type: Literal["f32", "f16", "q8_0", "q4_0"] | None = None,
) -> None:
    """Export a model (lmforge folder, or anything `import` reads) to a Hugging Face folder or a GGUF file.

    Args:
        model: the lmforge model folder or training run to export (a Hugging Face folder or llama2.c .bin works too).
        out: the folder to write for "hf", the .gguf file for "gguf" (replaced atomically if it exists).
        format: the output format; "hf" loads with transformers.AutoModelForCausalLM.from_pretrained, "gguf" with
            llama.cpp (Llama and GPT-2 architectures, tokenizer embedded).
        gguf_type: GGUF type of the weight matrices: f32, f16, q8_0 or q4_0; norms and biases stay f32. Default: the
            model's own (f16 for a float model, q8_0 for int8, q4_0 for int4: lossless, lmforge's int4 is Q4_0).
    """
    if format not in ("hf", "gguf"):
        raise LmforgeError(f"unknown export format {format!r}; choose 'hf' or 'gguf'", param="format")
    if gguf_type is not None and format != "gguf":
        raise LmforgeError(f"--gguf-type {gguf_type} applies to --format gguf only", param="gguf_type")
    loaded = load(model, prepare=False)
    net, tok = loaded.model, loaded.tokenizer
    if format == "gguf":
        from lmforge.interop.gguf import OWN_TYPE, export_gguf

        done = export_gguf(net, tok, out, gguf_type, extras=loaded.extras)
        for note in done.notes:
            log.warning("%s", note)
        kind = gguf_type or OWN_TYPE.get(net.config.quantization, "f16")
        print(
            f"exported {model} -> {out} (GGUF {done.arch}, {kind}, tokenizer {done.tokenizer_model}, "
            f"{len(done.tensor_types)} tensors)"
        )
        return
    from lmforge.interop.hf import export_hf

    if tok is not None and tok.kind != "bpe":
        log.warning("a %s tokenizer has no tokenizer.json form; only the model is exported", tok.kind)
    export_hf(net, tok, out, extra_files=loaded.extras)
    print(f"exported {model} -> {out} (Hugging Face format)")


def quantize_command(model: str, out: str, mode: Literal["int8", "int4"] = "int8") -> int:
    """Write a weight-only quantized copy of a model folder; its config records the mode.

    Every Linear (the output head included) is quantized; the token embedding stays float. `lmforge eval OUT DATA`
    shows the perplexity change, `lmforge generate OUT` runs it, and `lmforge export OUT x.gguf --format gguf`
    writes it for llama.cpp (int4 as Q4_0, unchanged).

    Args:
        model: a model folder or training run (its best/ checkpoint) to quantize.
        out: the folder to write the quantized model to (replaced atomically if it exists).
        mode: int8 (one scale per output channel) or int4 (GGUF Q4_0: one float16 scale per 32 inputs; layers
            whose input width is not a multiple of 32 get int8).
    """
    check_mode(mode)
    loaded = load(model, prepare=False)
    before = model_bytes(loaded.model)
    quantize_model(loaded.model, mode)
    save_model(out, loaded.model, loaded.tokenizer, extra_files=loaded.extras)
    print(json.dumps({"out": str(out), "mode": mode, "bytes_before": before, "bytes_after": model_bytes(loaded.model)}))
    return 0
