"""Adapters in PEFT's format against the real `peft` package: an adapter lmforge trains loads with peft onto the
exported Hugging Face base with the same logits, and one peft makes for an imported model loads in lmforge."""

import contextlib
import json
import warnings

import pytest
import torch

from lmforge import lora
from lmforge.checkpoint import CheckpointError, save_model, tensors_digest
from lmforge.config import ModelConfig
from lmforge.interop.hf import export_hf
from lmforge.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, save_adapter
from lmforge.loader import load
from lmforge.model import Transformer
from tests.test_interop_hf import TOKENS, VOCAB, gpt2_hf, llama_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")


def ours(preset, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name(preset, vocab_size=VOCAB, n_layer=2, block_size=32, **kw)).eval()


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def logits(model):
    with torch.no_grad():
        out = model(TOKENS)
    return getattr(out, "logits", out)


@pytest.mark.parametrize(
    "preset, targets",
    [
        ("gpt-nano", ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]),
        ("llama-nano", ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj", "lm_head"]),
    ],
)
def test_an_adapter_lmforge_trains_loads_in_peft_onto_the_exported_base_with_the_same_logits(preset, targets, tmp_path):
    model = ours(preset, **({"tie_embeddings": False} if preset == "llama-nano" else {}))
    export_hf(model, out_dir=tmp_path / "hf")  # the base, before any adapter
    digest = lora.base_digest(model)
    lora.add_lora(model, rank=4, alpha=6, targets=targets)
    randomize(model)
    save_adapter(tmp_path / "adapter", model, base=str(tmp_path / "hf"), digest=digest)

    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 6
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with no_peft_warning():
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(adapted), logits(model), atol=2e-5, rtol=1e-5)
    with adapted.disable_adapter():  # the adapter mattered
        assert not torch.allclose(logits(adapted), logits(model), atol=1e-3)
    # ... and lmforge reads it back onto the same base (the digest it recorded matches).
    again = load(tmp_path / "hf", adapter=tmp_path / "adapter", prepare=False).model
    torch.testing.assert_close(logits(again), logits(model), atol=2e-5, rtol=1e-5)


@contextlib.contextmanager
def no_peft_warning():
    """peft warns about what it does not understand (an unexpected config key, a tensor it did not load)."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    messages = [str(r.message) for r in records if "peft" in str(r.filename)]
    assert not messages, messages


PEFT_CASES = {
    "llama q,v only": (llama_hf, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama every linear, patterns, rslora": (
        llama_hf,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            rank_pattern={"k_proj": 2, "down_proj": 6},
            alpha_pattern={"model.layers.1.self_attn.v_proj": 3},
        ),
    ),
    "gpt2 conv1d": (gpt2_hf, dict(r=3, lora_alpha=5, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_a_peft_adapter_for_an_imported_model_loads_in_lmforge_with_peft_s_logits(case, tmp_path):
    make, settings = PEFT_CASES[case]
    base = make()
    base.save_pretrained(tmp_path / "hf")
    torch.manual_seed(3)
    adapted = peft.get_peft_model(
        base, peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **settings)
    ).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    expected = logits(adapted)

    merged = load(tmp_path / "hf", adapter=tmp_path / "adapter").model  # prepared for decoding, as serve loads it
    torch.testing.assert_close(logits(merged), expected, atol=3e-5, rtol=1e-5)
    plain = load(tmp_path / "hf", prepare=False).model
    assert not torch.allclose(logits(plain), expected, atol=1e-3)
    unmerged = load(tmp_path / "hf", prepare=False).model
    lora.attach_adapter(unmerged, read_adapter(tmp_path / "adapter", unmerged.config))
    torch.testing.assert_close(logits(unmerged), expected, atol=3e-5, rtol=1e-5)


def test_lmforge_s_earlier_adapter_folders_still_load(tmp_path):
    model = ours("gpt-nano")
    save_model(tmp_path / "base", model)
    digest = lora.base_digest(model)
    lora.add_lora(model, rank=2, alpha=4, targets=["attn.qkv", "mlp.proj"])
    randomize(model)
    tensors = {
        f"{p}.lora_{m}": getattr(layer, f"lora_{m}").detach().contiguous()
        for p, layer in lora.lora_layers(model).items()
        for m in "AB"
    }
    folder = tmp_path / "old"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt", "lmforge_sha256": tensors_digest(tensors)})
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps(
            {
                "method": "lora",
                "base": "x",
                "base_digest": digest,
                "rank": 2,
                "alpha": 4,
                "dropout": 0.0,
                "targets": ["attn.qkv", "mlp.proj"],
            }
        )
    )
    loaded = load(tmp_path / "base", adapter=folder, prepare=False).model
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=1e-5)


def test_adapters_lmforge_cannot_apply_exactly_are_refused_by_name(tmp_path):
    base = llama_hf()
    base.save_pretrained(tmp_path / "hf")
    adapted = peft.get_peft_model(
        base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], use_dora=True)
    )
    adapted.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="use_dora=True"):
        load(tmp_path / "hf", adapter=tmp_path / "dora", prepare=False)
    other = gpt2_hf()
    other.save_pretrained(tmp_path / "gpt2")
    gpt_adapter = peft.get_peft_model(
        other, peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    gpt_adapter.save_pretrained(tmp_path / "gpt2-adapter")
    with pytest.raises(CheckpointError, match="transformer.h.0.attn.c_attn, which a 2-layer llama model does not have"):
        load(tmp_path / "hf", adapter=tmp_path / "gpt2-adapter", prepare=False)
