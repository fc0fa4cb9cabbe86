"""LoRA (lmforge.lora): the adapted model starts as the base, merging changes nothing, only A and B train,
and an adapter folder round-trips through the loader."""

import copy

import pytest
import torch

from lmforge import lora
from lmforge.apps.finetune import FinetuneConfig, collate, finetune, masked_loss
from lmforge.apps.sft import Example
from lmforge.checkpoint import CheckpointError, load_model, save_model
from lmforge.config import ModelConfig
from lmforge.interop import peft
from lmforge.loader import load
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

TEXT = "the cat sat on the mat. the dog ran to the park and the bird sang in the tree. " * 20
TARGETS = ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]


def tiny(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=40, n_layer=2, n_embd=32, n_head=2, block_size=32, **kw)
    ).eval()


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def tokens(n=12, seed=2):
    return torch.randint(0, 40, (2, n), generator=torch.Generator().manual_seed(seed))


def test_lora_forward_equals_base_at_init():
    base = tiny()
    adapted = copy.deepcopy(base)
    lora.add_lora(adapted, rank=4, alpha=8, targets=TARGETS + ["lm_head"])
    x = tokens()
    assert torch.equal(adapted(x), base(x))  # B starts at zero: not even a rounding difference


def test_lora_layer_is_w_plus_scaled_ba():
    linear = torch.nn.Linear(6, 5)
    layer = lora.LoRALinear(linear, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    W = linear.weight + (6.0 / 3) * layer.lora_B @ layer.lora_A  # the paper's W0 + (alpha / r) B A
    torch.testing.assert_close(layer(x), x @ W.T + linear.bias)


@pytest.mark.parametrize("targets", [TARGETS, ["attn.qkv", "lm_head"]])
def test_merged_model_gives_the_adapted_logits(targets):
    model = tiny()
    lora.add_lora(model, rank=4, alpha=8, targets=targets)
    randomize_lora(model)
    x = tokens()
    with torch.no_grad():
        adapted = model(x)
        lora.merge_lora(model)
        merged = model(x)
    assert not lora.lora_layers(model)
    assert all(type(m) is not lora.LoRALinear for m in model.modules())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_only_lora_parameters_train_and_their_share():
    model = tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = model.config
    r = 4
    lora.add_lora(model, rank=r, alpha=8, targets=TARGETS)
    # per block: qkv (C -> qkv_dim), proj (C -> C), fc (C -> intermediate), proj (intermediate -> C)
    per_block = r * (
        (c.n_embd + c.qkv_dim) + 2 * c.n_embd + (c.n_embd + c.intermediate_size) + (c.intermediate_size + c.n_embd)
    )
    trainable, total = lora.count_params(model)
    assert trainable == c.n_layer * per_block
    assert total == sum(p.numel() for p in base.values()) + trainable  # named_parameters lists tied ones once
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.{t}.lora_{m}" for i in range(c.n_layer) for t in TARGETS for m in "AB"
    }

    from lmforge.train.optim import make_optimizer

    opt = make_optimizer(model, "adamw", 1e-2)
    ex = [Example(list(range(1, 13)), [True] * 12), Example(list(range(5, 15)), [False] * 5 + [True] * 5)]
    for _ in range(3):
        opt.zero_grad()
        masked_loss(model, collate(ex)).backward()
        opt.step()
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    for name, value in base.items():
        assert torch.equal(after[name], value), f"{name} changed but the base is frozen"
    assert any(float(layer.lora_B.detach().abs().sum()) > 0 for layer in lora.lora_layers(model).values())


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown LoRA target.*attn\.q.*choose from attn\.qkv"):
        lora.add_lora(tiny(), targets=["attn.q"])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "base"
    tok = train_tokenizer("bpe", [TEXT], vocab_size=280)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=32)
    )
    save_model(folder, model, tok)
    return folder, tok


def train_adapter(base_folder, out, merge=False):
    folder, tok = base_folder
    ids = tok.encode(TEXT)
    examples = [Example(ids[i : i + 17], [True] * 17) for i in range(0, 160, 16)]
    return finetune(
        FinetuneConfig(
            base=str(folder),
            out=str(out),
            method="lora",
            lr=1e-2,
            max_iters=6,
            batch_size=4,
            eval_interval=3,
            lora_rank=2,
            lora_alpha=4,
            merge=merge,
            lora_targets=TARGETS + ["lm_head"],
        ),
        examples,
        examples[:2],
    )


def test_adapter_round_trips_through_the_loader(base_folder, tmp_path):
    folder, tok = base_folder
    summary = train_adapter(base_folder, tmp_path / "run", merge=True)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / peft.ADAPTER_WEIGHTS).is_file() and (adapter / peft.ADAPTER_CONFIG).is_file()
    assert summary["trainable_fraction"] < 0.2 and summary["adapter_dir"] == str(adapter)

    # independent path: the base in memory, adapter read back from disk and kept unmerged
    reference, _ = load_model(folder)
    lora.attach_adapter(reference, peft.read_adapter(tmp_path / "run", reference.config))  # a run: its adapter/
    assert float(sum(layer.lora_B.detach().abs().sum() for layer in lora.lora_layers(reference).values())) > 0
    x = torch.as_tensor([tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        expected = reference(x)
        served = load(folder, adapter=adapter).model
        merged = load(tmp_path / "run").model  # OUT/best: the merged model folder
        base = load(folder).model
        torch.testing.assert_close(served(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(x), expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(x), expected, atol=1e-3)

    unprepared = load(folder, adapter=adapter, prepare=False)  # a merged copy, saved as a normal model folder
    out = save_model(tmp_path / "merged", unprepared.model, unprepared.tokenizer, extra_files=unprepared.extras)
    again, _ = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_base_is_refused(base_folder, tmp_path):
    folder, tok = base_folder
    train_adapter(base_folder, tmp_path / "run")
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_model(other, Transformer(load_model(folder)[0].config), tok)
    with pytest.raises(CheckpointError, match="different base model"):
        load(other, adapter=tmp_path / "run" / "adapter")
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        load(folder, adapter=folder)


def test_serve_with_adapter_answers_as_the_merged_model(base_folder, tmp_path):
    import httpx

    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.serve.process import start_server, stop_server

    folder, tok = base_folder
    train_adapter(base_folder, tmp_path / "run", merge=True)
    merged = load(tmp_path / "run").model
    prompt = "the cat sat on"
    expected = generate(
        merged, [tok.encode(prompt)], SamplingParams(max_tokens=8, temperature=0), tokenizer=tok, eos_id=tok.eos_id
    )[0].text
    proc, url = start_server(str(folder), "--adapter", str(tmp_path / "run" / "adapter"), timeout=120)
    try:
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
    finally:
        stop_server(proc)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
