"""Hugging Face architectures <-> lmforge: one small converter class per family, registered by model_type.

As llama.cpp's convert_hf_to_gguf.py: a base class does what the Llama-shaped families share and each family
overrides only where it differs: its config.json keys and transformers' defaults for them, its norm names, fused
projections (Phi-3), a norm weight offset (Gemma), the ModelConfig fields every model of the family has. Each class
- `config(d, name)`: reads config.json (a dict) into a ModelConfig, refusing with UnsupportedModelError (naming
  the key and its value) whatever lmforge would otherwise run wrongly;
- `hf_config(c)`: writes a ModelConfig back as that family's config.json;
- `to_ours(take, c)` / `to_hf(sd, c)`: renames (concatenates, splits, offsets) the weights.
A family can export a ModelConfig exactly when reading its own config.json gives the same ModelConfig back
(`family_for`), so no second list of "what fits" can drift from the converters.

The models are transformers' modeling_<family>.py; where transformers' config class has a default for a key that
a config.json may omit (Qwen3's head_dim 128, Gemma 2's soft-caps, Mistral's sliding window), `defaults` holds it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError

Take = Callable[[str], torch.Tensor]  # a Hugging Face tensor by name (the checkpoint checks it exists)


class UnsupportedModelError(LmforgeError):
    """A Hugging Face config (or an lmforge model) that the other side cannot represent; says which setting."""


# ------------------------------------------------------------------------------------------------ GPT-2


class GPT2:
    """GPT2LMHeadModel: LayerNorm, learned positions, Conv1D weights stored (in, out), c_attn already [q; k; v]."""

    model_type, architecture = "gpt2", "GPT2LMHeadModel"
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    conv1d = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    derived = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older GPT-2 checkpoints carry

    def config(self, d: dict, name: str) -> ModelConfig:
        act = d.get("activation_function", "gelu_new")
        problems = []
        mlp = self.acts.get(act)
        if mlp is None:
            problems.append(f"activation_function={act!r} (lmforge's GPT-2 runs 'gelu_new' or 'gelu')")
        if not d.get("tie_word_embeddings", True):
            problems.append("tie_word_embeddings=false (HF's untied GPT-2 head has no bias, lmforge's has one)")
        for key, bad in (
            ("scale_attn_by_inverse_layer_idx", True),
            ("scale_attn_weights", False),
            ("add_cross_attention", True),
            ("reorder_and_upcast_attn", True),
        ):
            if d.get(key, not bad) == bad:
                problems.append(f"{key}={str(bad).lower()}")
        if problems:
            raise UnsupportedModelError(f"GPT-2 config not supported: {'; '.join(problems)}")
        return ModelConfig(
            name=name,
            vocab_size=d["vocab_size"],
            block_size=d.get("n_positions", 1024),
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_embd=d["n_embd"],
            intermediate_size=d.get("n_inner") or 4 * d["n_embd"],
            norm="layernorm",
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            mlp=mlp,
            pos="learned",
            bias=True,
            tie_embeddings=True,
            extra={"imported_from": "huggingface", "model_type": "gpt2"},
        )

    def hf_config(self, c: ModelConfig) -> dict:
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}.get(c.mlp, c.mlp)
        return {
            "architectures": [self.architecture],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": c.intermediate_size,
            "activation_function": act,
            "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": True,
        }

    def to_ours(self, take: Take, c: ModelConfig) -> dict[str, torch.Tensor]:
        out = {
            "tok_emb.weight": take("wte.weight"),
            "pos_emb.weight": take("wpe.weight"),
            "norm_f.weight": take("ln_f.weight"),
            "norm_f.bias": take("ln_f.bias"),
        }
        for i in range(c.n_layer):
            h, p = f"h.{i}.", f"blocks.{i}."
            for theirs, ours in self.conv1d.items():
                out[p + ours + ".weight"] = take(h + theirs + ".weight").t()  # Conv1D (in, out) -> (out, in)
                out[p + ours + ".bias"] = take(h + theirs + ".bias")
            for theirs, ours in (("ln_1", "norm1"), ("ln_2", "norm2")):
                out[p + ours + ".weight"] = take(h + theirs + ".weight")
                out[p + ours + ".bias"] = take(h + theirs + ".bias")
        return out

    def to_hf(self, sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
        out = {
            "transformer.wte.weight": sd["tok_emb.weight"],
            "transformer.wpe.weight": sd["pos_emb.weight"],
            "transformer.ln_f.weight": sd["norm_f.weight"],
            "transformer.ln_f.bias": sd["norm_f.bias"],
        }
        names = {**self.conv1d, "ln_1": "norm1", "ln_2": "norm2"}
        for i in range(c.n_layer):
            for theirs, ours in names.items():
                w, b = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
                out[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t()  # -> Conv1D
                out[f"transformer.h.{i}.{theirs}.bias"] = b
        return out


# ------------------------------------------------------------------------------------------------ Llama and kin


class Llama:
    """LlamaForCausalLM (Llama 2/3.x, SmolLM2, TinyLlama): RMSNorm, RoPE, SwiGLU, grouped-query attention.

    The base of the Llama-shaped families: subclasses change class attributes and override the hooks.
    """

    model_type, architecture = "llama", "LlamaForCausalLM"
    defaults: dict = {
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
    }
    act_key = "hidden_act"
    acts = {"silu": "swiglu"}  # Hugging Face activation of the gate -> our gated MLP
    norms = {"input_layernorm": "norm1", "post_attention_layernorm": "norm2"}  # per layer, theirs -> ours
    fused = False  # Phi-3: one qkv_proj and one gate_up_proj hold [q; k; v] and [gate; up]
    norm_offset = 0.0  # Gemma stores RMSNorm weights as w - 1 (it computes with 1 + w)
    fixed: dict = {}  # ModelConfig fields every model of the family has
    derived = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry, recomputed from the config

    def get(self, d: dict, key: str):
        """d[key], or transformers' default for it when config.json leaves it out (or sets null)."""
        value = d.get(key)
        return self.defaults.get(key) if value is None else value

    # ---- config.json -> ModelConfig ----------------------------------------------------------
    def config(self, d: dict, name: str) -> ModelConfig:
        problems: list[str] = []
        n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
        head_dim = self.get(d, "head_dim") or n_embd // n_head
        act = self.get(d, self.act_key)
        if act not in self.acts:
            problems.append(f"{self.act_key}={act!r} (lmforge's {self.model_type} runs {sorted(self.acts)})")
        context = self.get(d, "max_position_embeddings")
        fields = dict(
            name=name,
            vocab_size=d["vocab_size"],
            block_size=context,
            n_layer=d["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            intermediate_size=d["intermediate_size"],
            norm="rmsnorm",
            norm_eps=self.get(d, "rms_norm_eps"),
            mlp=self.acts.get(act, "swiglu"),
            pos="rope",
            bias=False,
            tie_embeddings=bool(self.get(d, "tie_word_embeddings")),
            head_size=head_dim if head_dim * n_head != n_embd else None,
            extra={"imported_from": "huggingface", "model_type": self.model_type},
            **self.fixed,
        )
        fields |= self.rope(d, head_dim, context, problems)
        fields |= self.windows(self.layer_windows(d, fields["n_layer"], problems), fields["block_size"])
        fields |= self.features(d, problems)
        if problems:
            raise UnsupportedModelError(f"{self.model_type} config not supported: {'; '.join(problems)}")
        return ModelConfig(**fields)

    def features(self, d: dict, problems: list[str]) -> dict:
        """ModelConfig fields of the family's own settings (biases, norms, scales); refusals into `problems`."""
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                problems.append(f"{key}={d[key]} (lmforge's {self.model_type} has no biases)")
        return {}

    def layer_windows(self, d: dict, n_layer: int, problems: list[str]) -> list[int | None]:
        """The sliding window of each layer (None: full attention). Llama has none."""
        return [None] * n_layer

    @staticmethod
    def windows(per_layer: list[int | None], context: int) -> dict:
        """sliding_window / window_layers for per-layer windows; a window as long as the context is none."""
        per_layer = [w if w is not None and w < context else None for w in per_layer]
        sizes = {w for w in per_layer if w is not None}
        if not sizes:
            return {}
        if len(sizes) > 1:
            raise UnsupportedModelError(f"layers with different sliding windows {sorted(sizes)} are not supported")
        windowed = [i for i, w in enumerate(per_layer) if w is not None]
        return {"sliding_window": sizes.pop(), "window_layers": None if len(windowed) == len(per_layer) else windowed}

    def rope_params(self, d: dict) -> tuple[dict, dict | None]:
        """(global, local) RoPE parameters in transformers 5's form ({"rope_type", "rope_theta", ...}), from
        `rope_parameters` or the older top-level rope_theta / rope_scaling (which wins, as in transformers); local is
        for windowed layers."""
        params = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        if "rope_theta" not in params:
            params["rope_theta"] = self.get(d, "rope_theta")
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        return params, None

    def rope(self, d: dict, head_dim: int, context: int, problems: list[str]) -> dict:
        """rope_base, rope_scaling, rope_dim and rope_local_base from config.json."""
        params, local = self.rope_params(d)
        factor = params.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
        rotary = int(head_dim * factor)
        fields = {"rope_base": float(params["rope_theta"]), "rope_dim": rotary if rotary != head_dim else None}
        kind = params["rope_type"]
        original = d.get("original_max_position_embeddings") if self.top_level_original else None
        original = original or params.get("original_max_position_embeddings") or context
        keep = {
            k: params[k]
            for k in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")
            if params.get(k) is not None
        }
        if kind == "default":
            scaling = None
        elif kind == "linear":
            scaling = {"type": "linear", "factor": params["factor"]}
        elif kind == "dynamic":  # NTK-aware, for positions past max_position_embeddings: the context it reaches
            scaling = {"type": "dynamic", "factor": params["factor"], "original_context": context}
            fields["block_size"] = int(context * params["factor"])
        elif kind == "llama3":
            scaling = {
                "type": "llama3",
                "original_context": original,
                **{k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor")},
            }
        elif kind == "yarn":
            scaling = {
                "type": "yarn",
                "factor": params.get("factor") or context / original,
                "original_context": original,
                **keep,
            }
        elif kind == "longrope":
            scaling = {
                "type": "longrope",
                "short_factor": list(params["short_factor"]),
                "long_factor": list(params["long_factor"]),
                "original_context": original,
                "factor": params.get("factor") or context / original,
                **keep,
            }
        else:
            problems.append(
                f"rope type {kind!r} ({params}) is not supported; lmforge implements 'default', "
                f"'linear', 'dynamic', 'llama3', 'yarn' and 'longrope'"
            )
            scaling = None
        fields["rope_scaling"] = scaling
        if local is not None:
            if local.get("rope_type", local.get("type", "default")) != "default":
                problems.append(f"rope_parameters.sliding_attention={local} (the local layers' RoPE must be plain)")
            if float(local["rope_theta"]) != fields["rope_base"] or scaling is not None:
                fields["rope_local_base"] = float(local["rope_theta"])
        return fields

    top_level_original = False  # Phi-3 keeps original_max_position_embeddings at the top level, and it wins

    # ---- ModelConfig -> config.json ----------------------------------------------------------
    def hf_config(self, c: ModelConfig) -> dict:
        act = {v: k for k, v in self.acts.items()}.get(c.mlp, c.mlp)
        scaling = c.rope_scaling
        context = scaling["original_context"] if scaling and scaling["type"] == "dynamic" else c.block_size
        d = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": context,
            "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            self.act_key: act,
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tie_embeddings,
            "rope_theta": c.rope_base,
            "rope_parameters": self.hf_rope(c, c.rope_base, scaling),
        }
        return d | self.hf_features(c)

    def hf_rope(self, c: ModelConfig, base: float, scaling: dict | None) -> dict:
        params = {"rope_type": "default", "rope_theta": base}
        if c.rope_dim is not None:
            params["partial_rotary_factor"] = c.rope_dim / c.head_dim
        if scaling:
            params |= {k: v for k, v in scaling.items() if k not in ("type", "original_context")}
            params["rope_type"] = scaling["type"]
            if scaling["type"] != "linear" and scaling["type"] != "dynamic":
                params["original_max_position_embeddings"] = scaling["original_context"]
        return params

    def hf_features(self, c: ModelConfig) -> dict:
        """The family's own config.json keys for `c` (windows, biases, scales)."""
        return {"attention_bias": False, "mlp_bias": False}

    # ---- weights -------------------------------------------------------------------------------
    def to_ours(self, take: Take, c: ModelConfig) -> dict[str, torch.Tensor]:
        off = self.norm_offset
        out = {"tok_emb.weight": take("embed_tokens.weight"), "norm_f.weight": take("norm.weight") + off}
        if not c.tie_embeddings:
            out["lm_head.weight"] = take("lm_head.weight")
        for i in range(c.n_layer):
            h, p = f"layers.{i}.self_attn.", f"blocks.{i}."
            if self.fused:
                out[p + "attn.qkv.weight"] = take(h + "qkv_proj.weight")
                out[p + "mlp.fc.weight"] = take(f"layers.{i}.mlp.gate_up_proj.weight")
            else:
                out[p + "attn.qkv.weight"] = torch.cat([take(h + f"{x}_proj.weight") for x in "qkv"])
                out[p + "mlp.fc.weight"] = torch.cat([take(f"layers.{i}.mlp.{x}_proj.weight") for x in ("gate", "up")])
            if c.has_qkv_bias:
                out[p + "attn.qkv.bias"] = torch.cat([take(h + f"{x}_proj.bias") for x in "qkv"])
            out[p + "attn.proj.weight"] = take(h + "o_proj.weight")
            out[p + "mlp.proj.weight"] = take(f"layers.{i}.mlp.down_proj.weight")
            if c.qk_norm is not None:
                out[p + "attn.q_norm.weight"] = take(h + "q_norm.weight") + off
                out[p + "attn.k_norm.weight"] = take(h + "k_norm.weight") + off
            for theirs, ours in self.norms.items():
                out[p + ours + ".weight"] = take(f"layers.{i}.{theirs}.weight") + off
        return out

    def to_hf(self, sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
        off = self.norm_offset
        out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"] - off}
        if not c.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(c.n_layer):
            h, p = f"model.layers.{i}.self_attn.", f"blocks.{i}."
            qkv, fc = sd[p + "attn.qkv.weight"], sd[p + "mlp.fc.weight"]
            if self.fused:
                out[h + "qkv_proj.weight"], out[f"model.layers.{i}.mlp.gate_up_proj.weight"] = qkv, fc
            else:
                for x, w in zip("qkv", qkv.split([c.q_dim, c.kv_dim, c.kv_dim])):
                    out[h + f"{x}_proj.weight"] = w
                for x, w in zip(("gate", "up"), fc.chunk(2)):
                    out[f"model.layers.{i}.mlp.{x}_proj.weight"] = w
            if c.has_qkv_bias:
                for x, b in zip("qkv", sd[p + "attn.qkv.bias"].split([c.q_dim, c.kv_dim, c.kv_dim])):
                    out[h + f"{x}_proj.bias"] = b
            out[h + "o_proj.weight"] = sd[p + "attn.proj.weight"]
            out[f"model.layers.{i}.mlp.down_proj.weight"] = sd[p + "mlp.proj.weight"]
            if c.qk_norm is not None:
                out[h + "q_norm.weight"] = sd[p + "attn.q_norm.weight"] - off
                out[h + "k_norm.weight"] = sd[p + "attn.k_norm.weight"] - off
            for theirs, ours in self.norms.items():
                out[f"model.layers.{i}.{theirs}.weight"] = sd[p + ours + ".weight"] - off
        return out


class Mistral(Llama):
    """MistralForCausalLM: Llama with a sliding window on every layer (transformers defaults it to 4096)."""

    model_type, architecture = "mistral", "MistralForCausalLM"
    defaults = Llama.defaults | {"max_position_embeddings": 4096 * 32, "sliding_window": 4096}

    def layer_windows(self, d, n_layer, problems):
        return [self.get(d, "sliding_window")] * n_layer

    def features(self, d, problems):
        return {}  # transformers' Mistral has no bias options

    def hf_features(self, c):
        return {"sliding_window": c.sliding_window if c.all_windowed else None}


class Qwen2(Llama):
    """Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on q, k, v (not on o_proj); windows from `layer_types`, or on the
    layers from max_window_layers on when use_sliding_window is set."""

    model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    defaults = Llama.defaults | {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28}

    def layer_windows(self, d, n_layer, problems):
        window = self.get(d, "sliding_window") if d.get("use_sliding_window") else None
        types = d.get("layer_types") or [
            "sliding_attention" if window is not None and i >= self.get(d, "max_window_layers") else "full_attention"
            for i in range(n_layer)
        ]
        return [window if t == "sliding_attention" else None for t in types]

    def features(self, d, problems):
        return {"qkv_bias": True}

    def hf_features(self, c):
        windowed = [i for i in range(c.n_layer) if c.layer_window(i) is not None]
        return {
            "use_sliding_window": bool(windowed),
            "sliding_window": c.sliding_window,
            "max_window_layers": windowed[0] if windowed else c.n_layer,
            "layer_types": ["sliding_attention" if c.layer_window(i) else "full_attention" for i in range(c.n_layer)],
        }


class Qwen3(Qwen2):
    """Qwen3ForCausalLM: Qwen2's windows, no biases (attention_bias), RMSNorm over each head of q and k."""

    model_type, architecture = "qwen3", "Qwen3ForCausalLM"
    defaults = Qwen2.defaults | {"head_dim": 128}
    fixed = {"qk_norm": "head"}

    def features(self, d, problems):
        if d.get("attention_bias"):
            problems.append(f"attention_bias={d['attention_bias']} (lmforge's qwen3 has no biases)")
        return {}

    def hf_features(self, c):
        return super().hf_features(c) | {"attention_bias": False}


class Phi3(Llama):
    """Phi3ForCausalLM (Phi-3, 3.5, 4-mini): fused qkv_proj and gate_up_proj, LongRoPE, partial rotary, a sliding
    window on every layer when set."""

    model_type, architecture = "phi3", "Phi3ForCausalLM"
    defaults = Llama.defaults | {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    fused = True
    top_level_original = True

    def rope_params(self, d):
        params, local = super().rope_params(d)
        if params["rope_type"] in ("su", "yarn"):  # what older Phi-3 configs call LongRoPE
            params["rope_type"] = "longrope"
        return params, local

    def layer_windows(self, d, n_layer, problems):
        return [d.get("sliding_window")] * n_layer

    def features(self, d, problems):
        return {}

    def hf_features(self, c):
        scaling = c.rope_scaling or {}
        original = scaling.get("original_context", c.block_size) if scaling.get("type") != "dynamic" else c.block_size
        return {
            "sliding_window": c.sliding_window if c.all_windowed else None,
            "original_max_position_embeddings": original,
        }


class Gemma2(Llama):
    """Gemma2ForCausalLM: norms stored as w - 1, four norms a layer (sandwich), GeGLU (tanh), embeddings times
    sqrt(d), scores scaled by query_pre_attn_scalar^-1/2 and soft-capped, logits soft-capped, a sliding window on
    alternate layers (the first of each pair)."""

    model_type, architecture = "gemma2", "Gemma2ForCausalLM"
    defaults = Llama.defaults | {
        "max_position_embeddings": 8192,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    }
    act_key = "hidden_activation"
    acts = {"gelu_pytorch_tanh": "geglu_tanh"}
    norms = {
        "input_layernorm": "norm1",
        "post_attention_layernorm": "post_norm1",
        "pre_feedforward_layernorm": "norm2",
        "post_feedforward_layernorm": "post_norm2",
    }
    norm_offset = 1.0
    fixed = {"norm_placement": "sandwich", "embed_scale": True}
    pattern = 2  # every pattern-th layer attends globally, the others through the window

    def layer_windows(self, d, n_layer, problems):
        window = self.get(d, "sliding_window")
        types = d.get("layer_types") or [
            "sliding_attention" if (i + 1) % self.pattern else "full_attention" for i in range(n_layer)
        ]
        return [window if t == "sliding_attention" else None for t in types]

    def features(self, d, problems):
        if d.get("attention_bias"):
            problems.append(f"attention_bias={d['attention_bias']} (lmforge's {self.model_type} has no biases)")
        if d.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention=true (lmforge's models are causal)")
        return {
            "attn_scale": self.get(d, "query_pre_attn_scalar") ** -0.5,
            "logit_softcap": self.get(d, "final_logit_softcapping"),
            **self.attention_softcap(d),
        }

    def attention_softcap(self, d):
        return {"attn_softcap": self.get(d, "attn_logit_softcapping")}

    def hf_features(self, c):
        scalar = c.attn_scale**-2 if c.attn_scale else c.head_dim
        return {
            "attention_bias": False,
            "query_pre_attn_scalar": round(scalar, 6) if abs(scalar - round(scalar)) > 1e-6 else round(scalar),
            "final_logit_softcapping": c.logit_softcap,
            "attn_logit_softcapping": c.attn_softcap,
            "sliding_window": c.sliding_window,
            "layer_types": ["sliding_attention" if c.layer_window(i) else "full_attention" for i in range(c.n_layer)],
        }


class Gemma3(Gemma2):
    """Gemma3ForCausalLM (the text model, model_type gemma3_text): Gemma 2 with RMSNorm over each head of q and k,
    no attention soft-cap (transformers' Gemma 3 attention ignores attn_logit_softcapping), five windowed layers to
    one global, and the windowed layers' RoPE at their own base (rope_local_base_freq, or rope_parameters'
    sliding_attention entry); scaling applies to the global layers."""

    model_type, architecture = "gemma3_text", "Gemma3ForCausalLM"
    defaults = Gemma2.defaults | {
        "max_position_embeddings": 131072,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    }
    fixed = Gemma2.fixed | {"qk_norm": "head"}
    pattern = 6

    def layer_windows(self, d, n_layer, problems):
        self.pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6
        return super().layer_windows(d, n_layer, problems)

    def rope_params(self, d):
        nested = d.get("rope_parameters") or {}
        if "full_attention" in nested or "sliding_attention" in nested:  # rope_scaling, if any, updates the global
            full = dict(nested.get("full_attention") or {"rope_type": "default"}) | dict(d.get("rope_scaling") or {})
            local = dict(nested.get("sliding_attention") or {"rope_type": "default"})
            full.setdefault("rope_theta", self.get(d, "rope_theta"))
            local.setdefault("rope_theta", self.get(d, "rope_local_base_freq"))
        else:  # older config.json: rope_theta, rope_scaling (global layers), rope_local_base_freq
            full = dict(d.get("rope_scaling") or {}) | {"rope_theta": self.get(d, "rope_theta")}
            local = {"rope_type": "default", "rope_theta": self.get(d, "rope_local_base_freq")}
        full["rope_type"] = full.get("rope_type", full.get("type", "default"))
        return full, local

    def attention_softcap(self, d):
        return {}

    def hf_config(self, c):
        d = super().hf_config(c)
        local = c.rope_local_base if c.rope_local_base is not None else c.rope_base
        d["rope_parameters"] = {
            "full_attention": self.hf_rope(c, c.rope_base, c.rope_scaling),
            "sliding_attention": self.hf_rope(c, local, None),
        }
        d["rope_local_base_freq"] = local
        return d

    def hf_features(self, c):
        return super().hf_features(c) | {"attn_logit_softcapping": None, "use_bidirectional_attention": False}


class Olmo2(Llama):
    """Olmo2ForCausalLM: norms on the attention and MLP outputs only (no pre-norms), RMSNorm over the whole q and k
    projections."""

    model_type, architecture = "olmo2", "Olmo2ForCausalLM"
    defaults = Llama.defaults | {"rms_norm_eps": 1e-5}
    norms = {"post_attention_layernorm": "post_norm1", "post_feedforward_layernorm": "post_norm2"}
    fixed = {"norm_placement": "output", "qk_norm": "proj"}

    def features(self, d, problems):
        if d.get("attention_bias"):
            problems.append(f"attention_bias={d['attention_bias']} (lmforge's olmo2 has no biases)")
        return {}

    def hf_features(self, c):
        return {"attention_bias": False}


FAMILIES = {
    f.model_type: f for f in (GPT2(), Llama(), Mistral(), Qwen2(), Qwen3(), Phi3(), Gemma2(), Gemma3(), Olmo2())
}


def family_of(model_type: str | None):
    """The converter for a config.json's model_type, or UnsupportedModelError listing the ones lmforge reads."""
    if model_type == "gemma3":
        raise UnsupportedModelError(
            "model_type 'gemma3' is Gemma 3's image-text model; lmforge imports its text "
            "model (Gemma3ForCausalLM, model_type 'gemma3_text', e.g. gemma-3-1b)"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"Hugging Face model_type {model_type!r} is not supported; lmforge imports "
            f"{', '.join(repr(t) for t in FAMILIES)}"
        )
    return FAMILIES[model_type]


def _same(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that differ between two configs (name and provenance aside; floats to 1e-6 relative)."""
    diffs = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("name", "extra", "multiple_of", "init", "dropout"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        close = math.isclose(x, y, rel_tol=1e-6) if isinstance(x, float) and isinstance(y, float) else x == y
        if not close:
            diffs.append(f"{f.name}={x!r} (as {b.extra.get('model_type')}: {y!r})")
    return diffs


# What a plain GPT-2 or Llama is, for saying why a model is neither (lmforge's own presets are one or the other).
ARCHETYPES = {
    "gpt2": dict(
        norm_placement="pre",
        final_norm=True,
        embed_scale=False,
        norm="layernorm",
        pos="learned",
        bias=True,
        tie_embeddings=True,
    ),
    "llama": dict(
        norm_placement="pre", final_norm=True, embed_scale=False, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False
    ),
}


def family_for(config: ModelConfig):
    """The converter that writes `config` exactly: the one it was imported from when that still fits, else the
    first of GPT-2, Llama, then the others whose config.json reads back as the same ModelConfig."""
    if config.quantization:
        raise UnsupportedModelError(f"model is quantized ({config.quantization}); export the float checkpoint")
    first = config.extra.get("model_type")
    order = ([FAMILIES[first]] if first in FAMILIES else []) + [f for f in FAMILIES.values() if f.model_type != first]
    why = {}
    for family in order:
        try:
            back = family.config(family.hf_config(config), config.name)
        except (UnsupportedModelError, KeyError, TypeError, ValueError) as e:
            why[family.model_type] = str(e)
            continue
        diffs = _same(config, back)
        if not diffs:
            return family
        why[family.model_type] = ", ".join(diffs)
    for name, wanted in ARCHETYPES.items():
        diffs = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
        why[name] = ", ".join(diffs) or why[name]
    raise UnsupportedModelError(
        "this model is neither a GPT-2 nor a Llama architecture, nor another family lmforge "
        f"exports ({', '.join(t for t in FAMILIES if t not in ARCHETYPES)}); as GPT-2: "
        f"{why['gpt2']}; as Llama: {why['llama']}"
    )
