"""oneDNN-packed linear layers against PyTorch's own nn.Linear, the plain twin they replace."""

import copy

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer.generate import generate
from lmforge.infer.packed import GemmLinear, PackedLinear, gemm, gemm_linears, pack_linears, packing_available
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@pytest.mark.parametrize("shape", [(1, 1, 96), (8, 1, 96), (2, 33, 96), (5, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias)
    x = torch.randn(*shape)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_packed_model_generates_what_the_plain_model_does(name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(name, vocab_size=64, n_layer=2)).eval()
    packed = pack_linears(copy.deepcopy(model))
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    params = SamplingParams(max_tokens=12, temperature=0)
    assert [c.tokens for c in generate(packed, prompts, params)] == [c.tokens for c in generate(model, prompts, params)]
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), atol=1e-5, rtol=1e-5)


def test_only_float32_and_bfloat16_cpu_models_are_packed():
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=1)).to(torch.float16)
    assert not packing_available(model)
    assert pack_linears(model) is model and any(type(m) is torch.nn.Linear for m in model.modules())


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bfloat16 kernels on this CPU")
def test_packed_bfloat16_layers_compute_the_bfloat16_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(5, 96).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        got = packed(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)  # bfloat16 output: ~3 significant digits


def test_model_bytes_counts_packed_weights_once_each():
    from lmforge.infer.quantize import model_bytes

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=64, n_layer=2)).eval()
    before = model_bytes(model)
    packed = pack_linears(copy.deepcopy(model))
    assert any(m.packed.is_mkldnn for m in packed.modules() if isinstance(m, PackedLinear))
    # the tied head packs its own copy of the embedding; every other weight is counted once, as before
    head = model.lm_head.weight
    assert model_bytes(packed) == before + head.numel() * head.element_size()


@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 96), (2, 40, 96), (300, 96)])  # below and above GEMM_ROWS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_equals_linear_in_its_dtype(shape, dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bfloat16 kernels on this CPU")
    torch.manual_seed(0)
    x, w, b = torch.randn(*shape).to(dtype), torch.randn(200, 96).to(dtype), torch.randn(200).to(dtype)
    want = x.double() @ w.double().T + b.double()
    got = gemm(x, w, b)
    assert got.dtype == dtype and got.shape == (*shape[:-1], 200)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_gemm_linears_share_the_weights_and_prefill_as_the_plain_model(name):
    """The swap keeps the very parameters (a tied head stays tied, nothing is copied) and a prompt's logits stay
    the plain model's within float32 rounding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(name, vocab_size=64, n_layer=2, tie_embeddings=True)).eval()
    swapped = gemm_linears(copy.deepcopy(model))
    assert isinstance(swapped.lm_head, GemmLinear) and swapped.lm_head.weight is swapped.tok_emb.weight
    assert isinstance(swapped.blocks[0].attn.qkv, GemmLinear) and not any(
        type(m) is torch.nn.Linear for m in swapped.modules()
    )
    assert swapped.state_dict().keys() == model.state_dict().keys()
    tokens = torch.randint(0, 64, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(swapped(tokens), model(tokens), atol=1e-4, rtol=1e-4)
