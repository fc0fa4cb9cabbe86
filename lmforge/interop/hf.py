"""Hugging Face model folders <-> lmforge models: GPT-2 and Llama (and Mistral without a sliding window).

A Hugging Face folder holds config.json (with "model_type"), weights (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin), tokenizer.json, tokenizer_config.json (which carries the
chat template) and generation_config.json. Import reads them from local disk; export writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

Weight layouts (ours <- theirs):
- GPT-2 stores its linear layers as Conv1D, weight (in, out): transpose to nn.Linear's (out, in). Its c_attn
  is already fused [q; k; v] along the output, like our attn.qkv.
- Llama keeps q/k/v and gate/up separate: concatenate them into our fused [q; k; v] and [gate; up] rows.
  Both use the half-split RoPE layout, so q and k rows need no permutation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import CheckpointError, load_state, model_tensors, write_folder
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.errors import LmforgeError
from lmforge.fsutil import read_json

KEPT_FILES = ("tokenizer_config.json", "generation_config.json")  # copied into the lmforge folder on import
LLAMA_LIKE = ("llama", "mistral")


class UnsupportedModelError(LmforgeError):
    """A Hugging Face config (or an lmforge model) that the other side cannot represent; says which setting."""


# ---------------------------------------------------------------------------------------------- config


def _rope_theta(d: dict) -> float:
    """rope_theta from transformers 5's `rope_parameters`, or the older top-level rope_theta/rope_scaling."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for spec in (params, scaling or {}):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise UnsupportedModelError(f"rope scaling {kind!r} ({spec}) is not supported; lmforge implements "
                                        f"plain RoPE (rope_type 'default') only")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def config_from_hf(hf_config: dict, name: str | None = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face config.json (a dict); UnsupportedModelError names what cannot be run.

    `name` (e.g. the folder's name) becomes the config's name; by default the model_type.
    """
    d = hf_config
    model_type = d.get("model_type")
    name = name or model_type
    if model_type == "gpt2":
        act = d.get("activation_function", "gelu_new")
        problems = []
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            problems.append(f"activation_function={act!r} (lmforge's GPT-2 runs 'gelu_new' or 'gelu')")
        if not d.get("tie_word_embeddings", True):
            problems.append("tie_word_embeddings=false (HF's untied GPT-2 head has no bias, lmforge's has one)")
        if d.get("scale_attn_by_inverse_layer_idx"):
            problems.append("scale_attn_by_inverse_layer_idx=true")
        if not d.get("scale_attn_weights", True):
            problems.append("scale_attn_weights=false")
        if d.get("add_cross_attention"):
            problems.append("add_cross_attention=true")
        if problems:
            raise UnsupportedModelError(f"GPT-2 config not supported: {'; '.join(problems)}")
        return ModelConfig(
            name=name, vocab_size=d["vocab_size"], block_size=d.get("n_positions", 1024), n_layer=d["n_layer"],
            n_head=d["n_head"], n_embd=d["n_embd"], intermediate_size=d.get("n_inner") or 4 * d["n_embd"],
            norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp=mlp, pos="learned", bias=True,
            tie_embeddings=True, extra={"imported_from": "huggingface", "model_type": "gpt2"})
    if model_type in LLAMA_LIKE:
        n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
        problems = []
        if d.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={d['hidden_act']!r} (lmforge's SwiGLU uses 'silu')")
        if d.get("attention_bias") or d.get("mlp_bias"):
            problems.append("attention_bias/mlp_bias=true (lmforge's Llama has no biases)")
        if d.get("head_dim") not in (None, n_embd // n_head):
            problems.append(f"head_dim={d['head_dim']} differs from hidden_size/num_attention_heads="
                            f"{n_embd // n_head}")
        window, context = d.get("sliding_window"), d.get("max_position_embeddings", 2048)
        if window is not None and window < context and d.get("use_sliding_window", True):
            problems.append(f"sliding_window={window} < max_position_embeddings={context} "
                            f"(lmforge attends over the whole context)")
        if problems:
            raise UnsupportedModelError(f"{model_type} config not supported: {'; '.join(problems)}")
        return ModelConfig(
            name=name, vocab_size=d["vocab_size"], block_size=context, n_layer=d["num_hidden_layers"],
            n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd,
            intermediate_size=d["intermediate_size"], norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
            mlp="swiglu", pos="rope", rope_base=_rope_theta(d), bias=False,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            extra={"imported_from": "huggingface", "model_type": model_type})
    raise UnsupportedModelError(f"Hugging Face model_type {model_type!r} is not supported; lmforge imports "
                                f"'gpt2', {', '.join(repr(t) for t in LLAMA_LIKE)}")


GPT2_ACTS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # our mlp -> Hugging Face activation_function


def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama' when our config has that architecture exactly, else UnsupportedModelError saying why."""
    c = config
    if c.quantization:
        raise UnsupportedModelError(f"model is quantized ({c.quantization}); export the float checkpoint")
    common = dict(norm_placement="pre", final_norm=True, embed_scale=False)
    families = {
        "gpt2": dict(common, norm="layernorm", pos="learned", bias=True, tie_embeddings=True),
        "llama": dict(common, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False),
    }
    for family, wanted in families.items():
        if all(getattr(c, k) == v for k, v in wanted.items()) and (family == "llama" or c.mlp in GPT2_ACTS):
            return family
    diffs = {fam: [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in w.items() if getattr(c, k) != v]
             for fam, w in families.items()}
    raise UnsupportedModelError("this model is neither a GPT-2 nor a Llama architecture; as GPT-2: "
                                f"{', '.join(diffs['gpt2'])}; as Llama: {', '.join(diffs['llama'])}")


def hf_config_from(config: ModelConfig, dtype: torch.dtype = torch.float32, bos_id: int | None = None,
                   eos_id: int | None = None) -> dict:
    """The Hugging Face config.json dict for our config (GPT-2 or Llama architecture)."""
    c = config
    dtype_name = str(dtype).removeprefix("torch.")
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if hf_family(c) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "n_inner": c.intermediate_size, "activation_function": GPT2_ACTS[c.mlp],
                "layer_norm_epsilon": c.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": True, "dtype": dtype_name, "torch_dtype": dtype_name, **ids}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "max_position_embeddings": c.block_size, "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base}, "rope_theta": c.rope_base,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": c.tie_embeddings,
            "dtype": dtype_name, "torch_dtype": dtype_name, **ids}


# --------------------------------------------------------------------------------------------- weights


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    folder = Path(folder)
    single, index, pt = folder / "model.safetensors", folder / "model.safetensors.index.json", folder / "pytorch_model.bin"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index, "safetensors index", CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} is not a safetensors index: it needs a 'weight_map' object")
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif pt.is_file():
        try:
            return dict(torch.load(pt, map_location="cpu", weights_only=True))
        except Exception as e:  # a damaged zip/pickle raises many kinds
            raise CheckpointError(f"{pt} cannot be read ({type(e).__name__}: {e}); it may be truncated") from None
    else:
        raise CheckpointError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                              f"or pytorch_model.bin")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weights shard {f} (listed in {index.name}) is missing")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}); it may be truncated") from None
    return tensors


def _strip(name: str) -> str:
    for prefix in ("transformer.", "model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def convert_hf_to_lmforge(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and for GPT-2 transpose, for Llama fuse) Hugging Face tensors into our parameter names.

    A tensor that is neither used nor a known derived buffer raises CheckpointError (so an unsupported feature is
    not silently dropped); missing ones are reported by lmforge.checkpoint.load_state.
    """
    sd = {_strip(k): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise CheckpointError(f"Hugging Face weights lack {name!r} (needed for a {config.extra.get('model_type', config.name)} "
                                  f"model with {config.n_layer} layers); is config.json from the same model?")
        used.add(name)
        return sd[name]

    if hf_family(config) == "gpt2":
        out["tok_emb.weight"], out["pos_emb.weight"] = take("wte.weight"), take("wpe.weight")
        out["norm_f.weight"], out["norm_f.bias"] = take("ln_f.weight"), take("ln_f.bias")
        conv1d = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
        for i in range(config.n_layer):
            h, p = f"h.{i}.", f"blocks.{i}."
            for theirs, ours in conv1d.items():
                out[p + ours + ".weight"] = take(h + theirs + ".weight").t()  # Conv1D (in, out) -> (out, in)
                out[p + ours + ".bias"] = take(h + theirs + ".bias")
            for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = take(h + theirs + ".weight"), take(h + theirs + ".bias")
        derived = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older GPT-2 checkpoints carry
    else:
        out["tok_emb.weight"], out["norm_f.weight"] = take("embed_tokens.weight"), take("norm.weight")
        if not config.tie_embeddings:
            out["lm_head.weight"] = take("lm_head.weight")
        for i in range(config.n_layer):
            h, p = f"layers.{i}.", f"blocks.{i}."
            out[p + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{x}_proj.weight") for x in "qkv"])
            out[p + "attn.proj.weight"] = take(h + "self_attn.o_proj.weight")
            out[p + "mlp.fc.weight"] = torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")])
            out[p + "mlp.proj.weight"] = take(h + "mlp.down_proj.weight")
            out[p + "norm1.weight"] = take(h + "input_layernorm.weight")
            out[p + "norm2.weight"] = take(h + "post_attention_layernorm.weight")
        derived = ("rotary_emb.inv_freq",)  # recomputed from rope_theta
    head, emb = sd.get("lm_head.weight"), out["tok_emb.weight"]
    if config.tie_embeddings and head is not None and not torch.equal(head, emb):
        raise CheckpointError("config.json says tie_word_embeddings=true but lm_head.weight differs from the token "
                              "embedding; the config does not describe these weights")
    left = sorted(k for k in sd if k not in used and k != "lm_head.weight" and not k.endswith(derived))
    if left:
        raise CheckpointError(f"Hugging Face weights hold tensors lmforge would ignore: {left[:5]}"
                              f"{'...' if len(left) > 5 else ''}; the config may not describe these weights")
    return {k: v.contiguous() for k, v in out.items()}


def convert_lmforge_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names, laid out as transformers stores them (tied head omitted)."""
    c = model.config
    sd = model_tensors(model)
    out: dict[str, torch.Tensor] = {}
    if hf_family(c) == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = sd["tok_emb.weight"], sd["pos_emb.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm_f.weight"], sd["norm_f.bias"]
        names = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
                 "ln_1": "norm1", "ln_2": "norm2"}
        for i in range(c.n_layer):
            for theirs, ours in names.items():
                w, b = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
                out[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t()  # -> Conv1D
                out[f"transformer.h.{i}.{theirs}.bias"] = b
    else:
        out["model.embed_tokens.weight"], out["model.norm.weight"] = sd["tok_emb.weight"], sd["norm_f.weight"]
        if not c.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(c.n_layer):
            h, p = f"model.layers.{i}.", f"blocks.{i}."
            q, k, v = sd[p + "attn.qkv.weight"].split([c.n_embd, c.kv_dim, c.kv_dim])
            out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                        h + "self_attn.v_proj.weight": v, h + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"]})
            gate, up = sd[p + "mlp.fc.weight"].chunk(2)
            out.update({h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                        h + "mlp.down_proj.weight": sd[p + "mlp.proj.weight"],
                        h + "input_layernorm.weight": sd[p + "norm1.weight"],
                        h + "post_attention_layernorm.weight": sd[p + "norm2.weight"]})
    return {k: v.detach().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------ import/export


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    d = read_json(path, "Hugging Face model config", CheckpointError)
    if "model_type" not in d:
        raise CheckpointError(f"{path} has no 'model_type': not a Hugging Face model config")
    return d


def import_hf(folder: str | os.PathLike):
    """Load a Hugging Face folder from local disk.

    Returns (model, tokenizer, extras): the lmforge Transformer (float32, eval mode), a BPETokenizer from
    tokenizer.json (None when absent), and {file name: bytes} of tokenizer_config.json / generation_config.json
    to keep beside the model (pass as `extra_files` to lmforge.checkpoint.save_model).
    """
    folder = Path(folder)
    try:
        config = config_from_hf(read_hf_config(folder), name=folder.resolve().name)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'config.json'} lacks a needed setting: {e!r}") from None
    tensors = convert_hf_to_lmforge(load_hf_state_dict(folder), config)
    model = Transformer(config)
    load_state(model, {k: v.float() for k, v in tensors.items()}, folder / "config.json")
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from lmforge.tokenizer import BPETokenizer

        tokenizer = BPETokenizer.from_file(folder / "tokenizer.json")
    extras = {name: (folder / name).read_bytes() for name in KEPT_FILES if (folder / name).is_file()}
    return model.eval(), tokenizer, extras


def export_hf(model: Transformer, tokenizer=None, out_dir: str | os.PathLike = "hf_model",
              extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json, model.safetensors, generation_config.json, and for a
    BPE tokenizer tokenizer.json + tokenizer_config.json), atomically. `extra_files` (e.g. the
    tokenizer_config.json / generation_config.json kept at import) are written as given, replacing generated ones.

    Other tokenizer kinds (char, word, llama2.c) have no tokenizer.json form and are not written.
    """
    dtype = next(model.parameters()).dtype
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    config = hf_config_from(model.config, dtype, bos, eos)
    tensors = convert_lmforge_to_hf(model)
    generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if getattr(tokenizer, "kind", None) == "bpe":
            tokenizer.save(tmp)
            special = {f"{n}_token": tokenizer.tok.id_to_token(i) for n, i in (("bos", bos), ("eos", eos))
                       if i is not None}
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                          **special}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(out_dir, write)
