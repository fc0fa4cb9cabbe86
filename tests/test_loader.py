"""The one loader: what a path is comes from what is on disk; each kind loads to the weights its own reader (or
transformers) gives, and dtype, adapter, quantization and decode preparation apply in that order."""

import json

import pytest
import torch
from test_llama2c import write_llama2c

from lmforge import lora
from lmforge.apps.convert import quantize_command
from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.infer.fused import decode_path
from lmforge.infer.generate import generate
from lmforge.infer.quantize import Int8Linear
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.llama2c import read_llama2c_model
from lmforge.interop.peft import save_adapter
from lmforge.loader import load, read
from lmforge.model import Transformer
from lmforge.tokenizer import BPETokenizer

TOKENS = torch.tensor([[5, 9, 2, 31, 7, 7, 1, 30]])
TEMPLATE = {"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"}


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(["the cat sat on the mat and the dog ran off. " * 30], vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """An lmforge model folder with a chat template beside the weights, and the model it holds."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=32)
    ).eval()
    path = save_model(
        tmp_path_factory.mktemp("m") / "model",
        model,
        tok,
        extra_files={"tokenizer_config.json": json.dumps(TEMPLATE).encode()},
    )
    return path, model


def test_an_lmforge_folder_and_its_run_folder_load_the_saved_weights(folder, tmp_path):
    path, model = folder
    loaded = load(path, prepare=False)
    torch.testing.assert_close(logits(loaded.model), logits(model), atol=0, rtol=0)
    assert loaded.tokenizer.encode("the cat") == BPETokenizer.from_file(path / "tokenizer.json").encode("the cat")
    assert loaded.template_folder == path and json.loads(loaded.extras["tokenizer_config.json"]) == TEMPLATE
    assert loaded.chat_template().render([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert loaded.eos_id == loaded.tokenizer.eos_id is not None

    save_model(tmp_path / "run" / "best", model, None)  # a training run: its best/ checkpoint is the model
    torch.testing.assert_close(logits(load(tmp_path / "run", prepare=False).model), logits(model), atol=0, rtol=0)


def test_a_hugging_face_folder_loads_to_the_logits_transformers_computes(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        max_position_embeddings=32,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = load(tmp_path / "hf", prepare=False)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    torch.testing.assert_close(logits(loaded.model), expected, atol=1e-4, rtol=1e-4)
    assert loaded.tokenizer is None and loaded.template_folder == tmp_path / "hf"


def test_a_llama2c_file_loads_with_the_tokenizer_given(tmp_path, tok):
    path = write_llama2c(tmp_path / "tiny.bin", vocab=tok.vocab_size, seq=32)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):  # llama2.c keeps none beside this one
        load(path)
    tok.save(tmp_path / "t")
    loaded = load(path, tokenizer=tmp_path / "t" / "tokenizer.json", prepare=False)
    torch.testing.assert_close(logits(loaded.model), logits(read_llama2c_model(path)), atol=0, rtol=0)
    assert loaded.tokenizer.kind == "bpe" and loaded.template_folder is None and loaded.extras == {}


def test_a_preset_name_gives_the_same_random_weights_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    first = load("gpt-nano", prepare=False).model
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(torch.rand(3), after)  # the loader seeded a forked RNG, not ours
    second = load("gpt-nano", prepare=False).model
    tokens = TOKENS % first.config.vocab_size
    torch.testing.assert_close(logits(first, tokens), logits(second, tokens), atol=0, rtol=0)
    assert read("gpt-nano").tokenizer is None


def test_what_cannot_be_loaded_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpt-nano"):  # the message lists the presets
        load(tmp_path / "nowhere")
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(LmforgeError, match=r"model\.onnx.*\.bin") as e:
        load(tmp_path / "model.onnx")
    assert e.value.param == "model"
    with pytest.raises(LmforgeError, match="float64") as e:
        load("gpt-nano", dtype="float64")
    assert e.value.param == "dtype"


def test_dtype_quantization_and_preparation_apply_in_order(folder):
    path, model = folder
    assert decode_path(load(path, prepare=False).model) == "plain"
    assert decode_path(load(path).model) in ("fused", "packed")  # fused where the extension builds
    bf16 = load(path, dtype="bfloat16", prepare=False).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    q = load(path, quantize="int8", prepare=False).model
    assert q.config.quantization == "int8" and isinstance(q.blocks[0].mlp.fc, Int8Linear)
    rel = (logits(q) - logits(model)).norm() / logits(model).norm()
    assert 0 < rel < 0.02
    prepared = load(path, quantize="int8").model  # prepared after quantizing: its decode step reads the int8 weights
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert generate(prepared, TOKENS.tolist(), params)[0].tokens == generate(q, TOKENS.tolist(), params)[0].tokens


def test_an_adapter_merges_and_brings_its_chat_template(folder, tmp_path):
    path, model = folder
    adapted = load(path, prepare=False).model
    digest = lora.base_digest(adapted)
    lora.add_lora(adapted, rank=2, alpha=4, targets=["attn.qkv", "mlp.fc"])
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_(0, 0.1)
    own = {"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}
    save_adapter(
        tmp_path / "adapter",
        adapted,
        base=str(path),
        digest=digest,
        extra_files={"tokenizer_config.json": json.dumps(own).encode()},
    )
    loaded = load(path, adapter=tmp_path / "adapter", prepare=False)
    torch.testing.assert_close(logits(loaded.model), logits(adapted), atol=1e-5, rtol=1e-5)  # merged == unmerged
    assert not torch.allclose(logits(loaded.model), logits(model), atol=1e-3)
    assert loaded.template_folder == tmp_path / "adapter"
    assert json.loads(loaded.extras["tokenizer_config.json"]) == own  # a re-save keeps the adapter's template
    assert loaded.chat_template().render([{"role": "user", "content": "hi"}]) == "[hi]"


def test_quantize_keeps_the_files_beside_the_weights(folder, tmp_path, capsys):
    path, _ = folder
    assert quantize_command(str(path), str(tmp_path / "q")) == 0
    assert json.loads((tmp_path / "q" / "tokenizer_config.json").read_text()) == TEMPLATE
    assert load(tmp_path / "q", prepare=False).model.config.quantization == "int8"
