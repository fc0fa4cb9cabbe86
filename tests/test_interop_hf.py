"""Hugging Face interop against transformers itself: the same random weights give the same logits both ways."""

import json

import pytest
import torch

from lmforge.apps.convert import export_command, import_command
from lmforge.checkpoint import CheckpointError, save_model
from lmforge.config import ModelConfig
from lmforge.interop.hf import UnsupportedModelError, config_from_hf, export_hf, import_hf
from lmforge.loader import load
from lmforge.model import Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 120


def gpt2_hf(seed=0, vocab_size=VOCAB):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab_size, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama_hf(seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; make them random so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def ours_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def save_hf(model, folder, storage):
    model.save_pretrained(folder, **({"max_shard_size": "30KB"} if storage == "sharded" else {}))
    if storage == "bin":  # the older pickle format, written as transformers 4 did
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    if storage == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()


TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("storage", ["safetensors", "sharded", "bin"])
def test_gpt2_import_matches_transformers(tmp_path, storage):
    hf = gpt2_hf()
    save_hf(hf, tmp_path, storage)
    model, _, extras = import_hf(tmp_path)
    assert model.config.pos == "learned" and model.config.tie_embeddings
    assert "generation_config.json" in extras
    torch.testing.assert_close(ours_logits(model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("storage", ["safetensors", "bin"])
def test_llama_gqa_import_matches_transformers(tmp_path, storage, tie):
    hf = llama_hf(tie=tie)
    save_hf(hf, tmp_path, storage)
    model, _, _ = import_hf(tmp_path)
    assert model.config.n_kv_head == 2 and model.config.n_head == 4 and model.config.tie_embeddings == tie
    torch.testing.assert_close(ours_logits(model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)
    # The cached path of the imported model agrees too (prefill 20, then 4 single steps).
    cache = model.new_cache(2, 24)
    with torch.no_grad():
        steps = [model(TOKENS[:, :20], kv_cache=cache)] + [
            model(TOKENS[:, t : t + 1], kv_cache=cache) for t in range(20, 24)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "preset,overrides", [("gpt-nano", {}), ("llama-nano", {}), ("llama-nano", {"tie_embeddings": True})]
)
def test_export_loads_in_transformers(tmp_path, preset, overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(preset, vocab_size=VOCAB, block_size=32, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms and biases away from their 1/0 init, so a misplaced one shows
                p.uniform_(0.5, 1.5)
    export_hf(model, None, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] in ("gpt2", "llama") and config["architectures"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = TOKENS[:, :16]
    torch.testing.assert_close(hf_logits(hf, tokens), ours_logits(model, tokens), atol=1e-4, rtol=1e-4)
    again, _, _ = import_hf(tmp_path / "hf")  # and back: the round trip is exact
    torch.testing.assert_close(ours_logits(again, tokens), ours_logits(model, tokens), atol=0, rtol=0)


def test_import_command_keeps_tokenizer_and_chat_template(tmp_path):
    from lmforge.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["once upon a time there was a tiny model that could talk."] * 20, vocab_size=300)
    hf = gpt2_hf(vocab_size=tok.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    template = {
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "eos_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(template))

    import_command(str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text()) == template
    loaded = load(tmp_path / "ours", prepare=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    assert tokenizer.kind == "bpe" and tokenizer.encode("a tiny model") == tok.encode("a tiny model")
    torch.testing.assert_close(ours_logits(model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)

    export_command(str(tmp_path / "ours"), str(tmp_path / "back"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert hf_tok("once upon a time")["input_ids"] == tok.encode("once upon a time")
    assert hf_tok.chat_template == template["chat_template"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(hf_logits(back, TOKENS), hf_logits(hf, TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "bert"}, "model_type 'bert'"),
        ({"rope_scaling": {"rope_type": "mrope", "factor": 2.0}}, "rope type 'mrope'"),
        ({"hidden_act": "relu"}, "hidden_act='relu'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_llama_configs_say_why(change, message):
    config = llama_hf().config.to_dict() | change
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(config)


def test_gpt2_untied_head_is_refused():
    with pytest.raises(UnsupportedModelError, match="tie_word_embeddings"):
        config_from_hf(gpt2_hf().config.to_dict() | {"tie_word_embeddings": False})


def test_mistral_without_window_imports(tmp_path):
    config = llama_hf().config.to_dict() | {"model_type": "mistral", "sliding_window": None}
    assert config_from_hf(config).n_kv_head == 2


def test_export_refuses_other_architectures(tmp_path):
    model = Transformer(ModelConfig.from_name("seed", vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="norm_placement='post'"):
        export_hf(model, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_truncated_hf_weights_fail_naming_the_file(tmp_path):
    gpt2_hf().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        import_hf(tmp_path)


def test_config_that_does_not_match_weights_fails(tmp_path):
    gpt2_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_layer": 3}))
    with pytest.raises(CheckpointError, match="h.2.attn.c_attn.weight"):
        import_hf(tmp_path)


def test_shuffled_lmforge_weights_fail_naming_the_file(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("llama-nano", vocab_size=VOCAB))
    save_model(tmp_path / "m", model)
    load(tmp_path / "m")  # intact: loads
    path = tmp_path / "m" / "model.safetensors"
    data = bytearray(path.read_bytes())
    tail = data[-4096:]
    data[-4096:] = tail[2048:] + tail[:2048]  # swap two halves of the last tensor's bytes: same size, same header
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*checksum"):
        load(tmp_path / "m")
