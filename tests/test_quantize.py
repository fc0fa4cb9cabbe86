"""Weight-only int8: the quantized Linear against its dequantized float twin, the model against fp32, the folder."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.apps.convert import quantize_command
from lmforge.checkpoint import CheckpointError, load_model, save_model
from lmforge.config import ModelConfig
from lmforge.infer.packed import GEMM_ROWS, bf16_gemm_available
from lmforge.infer.quantize import (
    Q4_GEMM_ROWS,
    Int4Linear,
    Int8Linear,
    QuantizationError,
    convert_for_runtime,
    dequantize_int4,
    int8_linear,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from lmforge.loader import load
from lmforge.model import Transformer


def tiny(name="gpt-nano", **overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_name(
        name, **{"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 97, "block_size": 32, **overrides}
    )
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
    assert {k: (v.shape, v.dtype) for k, v in q.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in empty.state_dict().items()
    }


def test_bad_mode_and_double_quantization_are_clear_errors():
    with pytest.raises(QuantizationError, match=r"'int3'.*int8.*int4") as e:
        quantize_model(tiny(), "int3")
    assert e.value.param == "mode"
    for first, second in (("int8", "int8"), ("int4", "int8"), ("int8", "int4")):
        q = quantize_model(tiny(), first)
        with pytest.raises(QuantizationError, match="already quantized"):
            quantize_model(q, second)


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
    assert quantize_command(str(tmp_path / "fp32"), str(tmp_path / "int4"), mode="int4") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["mode"] == "int4" and report["bytes_after"] < report["bytes_before"]
    assert isinstance(load(tmp_path / "int4", prepare=False).model.blocks[0].mlp.fc, Int4Linear)


def test_quantize_help_through_cli():
    from lmforge.cli import main

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


@pytest.mark.parametrize("rows", [1, 5, GEMM_ROWS + 3])  # below GEMM_ROWS: torch's int8 kernel; from it: one GEMM
def test_int8_linear_of_any_row_count_matches_dequantized_reference(rows):
    torch.manual_seed(rows)
    w, x, b = torch.randn(40, 64), torch.randn(rows, 64), torch.randn(40)
    q, s = quantize_int8(w)
    ref = x.double() @ (q.double() * s.double()[:, None]).T + b.double()
    got = int8_linear(x, q, s, b)
    assert (got.double() - ref).abs().max() <= 0.01 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ int4


def naive_int4_weight(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_0 read one value at a time, as ggml's dequantize_row_q4_0 does: block j of row o, byte i holds
    value i (low nibble) and value 16 + i (high nibble), each (q - 8) * d."""
    out, half = packed.shape
    w = torch.empty(out, 2 * half, dtype=torch.float64)
    for o in range(out):
        for j in range(half // 16):
            d = float(scales[o, j])
            for i in range(16):
                byte = int(packed[o, 16 * j + i])
                w[o, 32 * j + i] = ((byte & 15) - 8) * d
                w[o, 32 * j + 16 + i] = ((byte >> 4) - 8) * d
    return w


def test_quantize_int4_is_gguf_q4_0_byte_for_byte():
    """An independent reference: gguf's own Q4_0 quantizer (ggml's reference, in numpy)."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(0)
    w = torch.randn(24, 96) * torch.logspace(-3, 1, 24)[:, None]
    w[3] = 0  # an all-zero row: scale 0
    w[5, :32] = torch.linspace(-1, 2, 32)  # the extreme is positive: it lands on -8 * d with d < 0
    q, s = quantize_int4(w)
    assert q.shape == (24, 48) and q.dtype == torch.uint8 and s.shape == (24, 3) and s.dtype == torch.float16
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(24, 3, 18)
    assert np.array_equal(blocks[..., :2].copy().view(np.float16)[..., 0], s.numpy())
    assert np.array_equal(blocks[..., 2:].reshape(24, 48), q.numpy())
    deq = dequantize_int4(q, s)
    assert torch.equal(deq.double(), naive_int4_weight(q, s))
    err, d = (deq - w).abs().reshape(24, 3, 32), s.float().abs()[..., None]
    # half a step, a whole one at the far end (+8 * |d| is clamped to 7), float16's rounding of d on top
    assert (err <= d + 2**-10 * w.abs().reshape(24, 3, 32)).all() and (err <= d / 2 + 1e-6).float().mean() > 0.9


@pytest.mark.parametrize("rows", [1, 3, Q4_GEMM_ROWS // 2 - 1, Q4_GEMM_ROWS // 2 + 5])  # x 2
@pytest.mark.parametrize("bias", [True, False])
def test_int4_linear_matches_the_naive_dequantized_reference(rows, bias):
    """A few rows take the fused step's kernel (float32), many (Q4_GEMM_ROWS on) one GEMM over the dequantized weight
    (bfloat16 where oneDNN has it): the product with the weight read one nibble at a time, to their rounding."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 40, bias=bias)
    q = Int4Linear.from_linear(linear)
    x = torch.randn(2, rows, 96)
    ref = x.double() @ naive_int4_weight(q.weight, q.scales).T + (linear.bias.double() if bias else 0)
    with torch.no_grad():
        got = q(x)
    assert got.shape == (2, rows, 40) and got.dtype == torch.float32
    if 2 * rows < Q4_GEMM_ROWS or not bf16_gemm_available():  # float32 throughout
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    else:  # a prompt's product in bfloat16: activations and weights rounded to 8 significant bits
        assert (got.double() - ref).abs().max() < 0.02 * ref.abs().max()


def test_int4_linear_runs_bfloat16_activations_and_keeps_float16_scales():
    torch.manual_seed(0)
    q = Int4Linear.from_linear(torch.nn.Linear(64, 32)).to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and q.bias.dtype == torch.bfloat16 and q.weight.dtype == torch.uint8
    for rows in (2, Q4_GEMM_ROWS + 1):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        with torch.no_grad():
            got = q(x)
        want = x.double() @ q.dequantized().double().T + q.bias.double()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=0.03, rtol=0.02)


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_int4_model_logits_close_to_fp32_and_odd_widths_get_int8(name):
    model = tiny(name, intermediate_size=72) if name == "llama-nano" else tiny(name)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(model, "int4")
        out = q(tokens)
    assert q.config.quantization == "int4" and isinstance(q.lm_head, Int4Linear)
    assert all(not isinstance(m, torch.nn.Linear) for m in q.modules())
    if name == "llama-nano":  # the SwiGLU down projection reads 72 inputs: not 32-value blocks
        assert isinstance(q.blocks[0].mlp.proj, Int8Linear) and isinstance(q.blocks[0].mlp.fc, Int4Linear)
    rel = (out - ref).norm() / ref.norm()
    assert 0.01 < rel < 0.25, f"relative logit error {rel:.4f}"  # 4-bit rounding of random weights: ~14%
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.75


def test_int4_save_load_round_trip_and_runtime_shapes(tmp_path):
    q = quantize_model(tiny("llama-nano", intermediate_size=72), "int4")
    save_model(tmp_path / "q", q)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == "int4"
    stored = load_file(tmp_path / "q" / "model.safetensors")
    assert stored["blocks.0.attn.qkv.weight"].dtype == torch.uint8 and stored["lm_head.scales"].dtype == torch.float16
    loaded = load(tmp_path / "q", prepare=False).model
    empty = convert_for_runtime(tiny("llama-nano", intermediate_size=72), "int4")
    assert {k: (v.shape, v.dtype) for k, v in q.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in empty.state_dict().items()
    }
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), q(tokens))
    bf16 = load(tmp_path / "q", dtype="bfloat16", prepare=False).model  # a cast keeps Q4_0's float16 scales exact
    assert torch.equal(bf16.lm_head.scales, q.lm_head.scales)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quantize_flag_loads_the_quantized_fused_model(tmp_path, capsys, mode):
    """`lmforge generate MODEL --quantize int4` (through the loader generate, chat and serve share) quantizes on
    load and decodes through the fused step, with the tokens of the model quantized beforehand."""
    from lmforge.apps.generate import generate_command
    from lmforge.infer.fused import _load_extension, decode_path
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["".join(chr(0x100 + i) for i in range(97))])  # 97 characters: the model's vocab
    save_model(tmp_path / "m", tiny("llama-nano"), tok)
    net = load(str(tmp_path / "m"), quantize=mode).model
    kind = Int4Linear if mode == "int4" else Int8Linear
    assert net.config.quantization == mode and isinstance(net.blocks[0].attn.qkv, kind)
    params = SamplingParams(max_tokens=8, temperature=0)
    want = generate(quantize_model(tiny("llama-nano"), mode), [[1, 2, 3]], params)[0].tokens
    assert generate(net, [[1, 2, 3]], params)[0].tokens == want
    if _load_extension() is not None:
        assert decode_path(net) == "fused"
    assert generate_command(str(tmp_path / "m"), prompt=chr(0x101), max_tokens=5, temperature=0, quantize=mode) == 0
    assert capsys.readouterr().out.strip()
