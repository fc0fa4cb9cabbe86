"""Weight-only int8: the quantized Linear against its dequantized float twin, the model against fp32, the folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.apps.convert import quantize_command
from lmforge.checkpoint import CheckpointError, load_model, save_model
from lmforge.config import ModelConfig
from lmforge.infer.quantize import (Int8Linear, QuantizationError, convert_for_runtime, int8_linear, quantize_int8,
                                    quantize_model)
from lmforge.loader import load
from lmforge.model import Transformer


def tiny(name="gpt-nano", **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_name(name, **{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97,
                                            "block_size": 32, **overrides})
    return Transformer(config).eval()


def test_quantize_int8_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 40) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    w[5] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == w.dtype and s.shape == (48,)
    assert q.abs().amax(dim=1)[torch.arange(48) != 5].eq(127).all()  # each row uses the full range
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()  # round-to-nearest: at most half a step per element
    assert err[5].eq(0).all()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(3,), (2, 5)])
@pytest.mark.parametrize("width", [40, 64])  # 40 is not a multiple of the CPU kernel's vector: the float formula
def test_int8_linear_matches_dequantized_reference(bias, lead, width):
    torch.manual_seed(1)
    linear = torch.nn.Linear(width, 24, bias=bias)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(*lead, width)
    # naive reference: the dequantized float weight
    ref = x @ (q.weight.float() * q.scales[:, None]).T + (linear.bias if bias else 0)
    out = q(x)
    assert out.shape == (*lead, 24) and out.dtype == x.dtype
    exact = width % 16 != 0  # the float formula is exact; the CPU kernel rounds activations and output to bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5 if exact else 1e-2, atol=1e-5 if exact else 1e-2)
    torch.testing.assert_close(out, linear(x), rtol=5e-2, atol=2e-2)  # and close to the float layer


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_quantized_logits_close_to_fp32(name):
    model = tiny(name)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(model, "int8")
        out = q(tokens)
    assert q.config.quantization == "int8"
    assert all(not isinstance(m, torch.nn.Linear) for m in q.modules())  # every Linear was swapped
    assert isinstance(q.lm_head, Int8Linear)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, f"relative logit error {rel:.4f}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_tied_embedding_stays_float_and_head_gets_its_own_int8_copy():
    model = tiny()
    assert model.config.tie_embeddings
    emb = model.tok_emb.weight.detach().clone()
    quantize_model(model, "int8")
    assert model.tok_emb.weight.dtype == torch.float32 and torch.equal(model.tok_emb.weight, emb)
    torch.testing.assert_close(model.lm_head.dequantized(), emb, atol=float(model.lm_head.scales.max()), rtol=0)


def test_save_load_round_trip_rebuilds_quantized_modules(tmp_path):
    q = quantize_model(tiny(), "int8")
    save_model(tmp_path / "q", q)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == "int8"
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.int8
    assert stored["lm_head.weight"].dtype == torch.int8 and stored["tok_emb.weight"].dtype == torch.float32

    loaded = load(tmp_path / "q", prepare=False).model
    assert isinstance(loaded.blocks[1].mlp.fc, Int8Linear) and loaded.config.quantization == "int8"
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), q(tokens))
    with pytest.raises(CheckpointError, match="int8-quantized weights: load it with lmforge.loader.load"):
        load_model(tmp_path / "q")  # the checkpoint layer alone builds plain Linears: it says where to go


def test_convert_for_runtime_shapes_match_quantize_model():
    q = quantize_model(tiny("llama-nano"), "int8")
    empty = convert_for_runtime(tiny("llama-nano"), "int8")
    assert {k: (v.shape, v.dtype) for k, v in q.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()}


def test_bad_mode_and_double_quantization_are_clear_errors():
    with pytest.raises(QuantizationError, match=r"'int3'.*int8"):
        quantize_model(tiny(), "int3")
    with pytest.raises(QuantizationError, match="int4 is not implemented"):
        quantize_model(tiny(), "int4")
    q = quantize_model(tiny(), "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(q, "int8")


def test_quantize_command_writes_a_loadable_quantized_folder(tmp_path, capsys):
    model = tiny()
    save_model(tmp_path / "fp32", model)
    assert quantize_command(str(tmp_path / "fp32"), str(tmp_path / "int8")) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mode"] == "int8" and report["bytes_after"] < report["bytes_before"]
    loaded = load(tmp_path / "int8", prepare=False).model
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        rel = (loaded(tokens) - model(tokens)).norm() / model(tokens).norm()
    assert rel < 0.02
    with pytest.raises(ValueError, match="int4"):
        quantize_command(str(tmp_path / "fp32"), str(tmp_path / "int4"), mode="int4")


def test_quantize_help_through_cli():
    from lmforge.cli import COMMANDS, main

    if "quantize" not in COMMANDS:
        pytest.skip("the lead has not wired `lmforge quantize` into lmforge/cli.py yet")
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.parametrize("in_features", [64, 172])  # 172: stories260K's FFN width, not a multiple of 8
def test_int8_linear_matches_dequantized_reference_at_any_width(in_features):
    torch.manual_seed(0)
    w, x = torch.randn(48, in_features), torch.randn(5, in_features)
    q, s = quantize_int8(w)
    ref = x @ (q.float() * s[:, None]).T
    got = int8_linear(x, q, s, None)
    assert (got - ref).abs().max() <= 0.01 * ref.abs().max()  # bf16 activations: ~0.4% here
