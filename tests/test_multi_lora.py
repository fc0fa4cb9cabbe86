"""Batched multi-LoRA (lmforge.infer.multi_lora, the engine's adapters) against merged models: each row of a mixed
batch must give what the base with its own adapter merged gives."""

import copy

import pytest
import torch

from lmforge.checkpoint import CheckpointError
from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.engine.paged_cache import PagedKVCache, block_table_tensor
from lmforge.infer.fused import decode_path, prepare_for_decoding
from lmforge.infer.multi_lora import AdapterBank, AdapterError
from lmforge.infer.sampling import SamplingParams
from lmforge.lora import Adapter, LoRAWeights, merge_adapter
from lmforge.model import Transformer
from tests.test_engine import greedy_alone, prompts_of

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(preset="llama-nano", dtype=torch.float64):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(preset, vocab_size=48, block_size=64)).to(dtype).eval()


def random_adapter(model, seed, rank, targets, scale=0.5):
    """An adapter on `targets` (block-relative names, "lm_head") with random A and B: unlike a fresh one, it
    changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    paths = [f"blocks.{i}.{t}" for i in range(model.config.n_layer) for t in targets if t != "lm_head"]
    paths += ["lm_head"] if "lm_head" in targets else []
    layers = {}
    for p in paths:
        m = modules[p]
        layers[p] = LoRAWeights(
            torch.randn(rank, m.in_features, generator=g, dtype=torch.float64) * 0.3,
            torch.randn(m.out_features, rank, generator=g, dtype=torch.float64) * 0.3,
            scale,
        )
    return Adapter(layers, source=f"random-{seed}")


ADAPTERS = {  # different ranks and targets, one on the output head
    "a": (1, 4, ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]),
    "b": (2, 2, ["attn.qkv", "mlp.proj", "lm_head"]),
    "c": (3, 8, ["mlp.fc"]),
}


def bank_of(model):
    bank = AdapterBank(model)
    adapters = {name: random_adapter(model, seed, rank, targets) for name, (seed, rank, targets) in ADAPTERS.items()}
    for name, adapter in adapters.items():
        bank.add(name, adapter)
    return bank, adapters


def merged(model, adapter):
    return merge_adapter(copy.deepcopy(model), adapter, check_base=False) if adapter is not None else model


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_every_row_of_a_mixed_batch_gives_its_merged_models_logits(preset):
    model = tiny(preset)
    reference = copy.deepcopy(model)
    bank, adapters = bank_of(model)
    names = [None, "a", "b", "c", "b", None, "a"]
    tokens = torch.tensor(prompts_of([9] * len(names), 48, seed=4))
    with torch.no_grad():
        with bank.batch(names):
            mixed = model(tokens)  # (7, 9, V): one forward, base and three adapters
        outside = model(tokens)
    for b, name in enumerate(names):
        with torch.no_grad():
            expected = merged(reference, adapters.get(name))(tokens[b : b + 1])[0]
        torch.testing.assert_close(mixed[b], expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outside, reference(tokens))  # outside a batch the hooks add nothing
    assert not torch.allclose(mixed[1], outside[1])


def test_the_engine_serves_base_and_three_adapters_in_the_same_steps_as_merged_models_would():
    model = tiny("llama-nano")
    reference = copy.deepcopy(model)
    bank, adapters = bank_of(model)
    names = [None, "a", "b", "c", "a", "c", None, "b"]
    prompts = prompts_of([5, 12, 3, 20, 7, 9, 14, 6], 48, seed=2)
    engine = Engine(model, block_size=4, num_blocks=120, max_num_batched_tokens=24, max_num_seqs=8, adapters=bank)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    got = engine.generate(prompts, params, adapters=names)
    for prompt, name, c in zip(prompts, names, got):
        assert c.tokens == greedy_alone(merged(reference, adapters.get(name)), prompt, 10), name
    # The merged model's own logprobs: the batch computed each row's distribution, not just its argmax.
    plain = Engine(merged(reference, adapters["b"]), block_size=4, num_blocks=120).generate([prompts[2]], params)[0]
    torch.testing.assert_close(
        torch.tensor([lp.logprob for lp in got[2].logprobs]),
        torch.tensor([lp.logprob for lp in plain.logprobs]),
        atol=1e-9,
        rtol=0,
    )
    assert engine.stats()["steps"] < 8 * 10  # the rows shared steps


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_the_fused_step_gives_each_row_of_a_mixed_batch_its_merged_models_logits(preset):
    """Prompts (every position) and then one decoding token a row through the C++ step, base and three adapters in
    the same call, against each merged model's own float32 forward."""
    model = tiny(preset, torch.float32)
    served = prepare_for_decoding(copy.deepcopy(model))
    assert decode_path(served) != "python"
    bank, adapters = bank_of(served)
    names = [None, "a", "b", "c", "b", None, "a"]
    B, T = len(names), 7
    tokens = torch.tensor(prompts_of([T] * B, 48, seed=5))
    nxt = torch.tensor(prompts_of([1] * B, 48, seed=6))
    tables = [[2 * b, 2 * b + 1] for b in range(B)]  # blocks of 4 slots
    cache = PagedKVCache(model.config, 2 * B, 4)
    fused, table = served.fused_decoder, block_table_tensor(tables)
    prompt_logits = fused.paged(tokens.tolist(), cache, table, [0] * B, T, lora=bank.batch(names))  # (B, T, V)
    step_logits = fused.paged(nxt.tolist(), cache, table, [T] * B, 1, lora=bank.batch(names))[:, 0]
    plain = fused.paged(nxt.tolist(), cache, table, [T] * B, 1)[:, 0]  # no batch: nothing added
    for b, name in enumerate(names):
        with torch.no_grad():
            expected = merged(model, adapters.get(name))(torch.cat([tokens[b], nxt[b]])[None])[0]
        torch.testing.assert_close(prompt_logits[b], expected[:T], rtol=0, atol=2e-4)
        torch.testing.assert_close(step_logits[b], expected[T], rtol=0, atol=2e-4)
        if name is None:
            torch.testing.assert_close(plain[b], step_logits[b], rtol=0, atol=0)
        else:
            assert not torch.allclose(plain[b], step_logits[b], atol=1e-3), name


def test_the_engine_on_the_fused_step_serves_adapters_as_merged_models_would():
    model = tiny("llama-nano", torch.float32)
    served = prepare_for_decoding(copy.deepcopy(model))
    bank, adapters = bank_of(served)
    names = [None, "a", "b", "c", "a", "c", None, "b"]
    prompts = prompts_of([5, 12, 3, 20, 7, 9, 14, 6], 48, seed=2)
    engine = Engine(served, block_size=4, num_blocks=120, max_num_batched_tokens=24, max_num_seqs=8, adapters=bank)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    got = engine.generate(prompts, params, adapters=names)
    for prompt, name, c in zip(prompts, names, got):
        reference = merged(model, adapters.get(name))
        assert c.tokens == greedy_alone(reference, prompt, 10), name
        with torch.no_grad():  # each token's logprob under the merged model, given the same tokens
            logp = reference(torch.tensor([prompt + c.tokens[:-1]]))[0, len(prompt) - 1 :].log_softmax(-1)
        torch.testing.assert_close(
            torch.tensor([lp.logprob for lp in c.logprobs]),
            logp[torch.arange(10), torch.tensor(c.tokens)],
            atol=2e-4,
            rtol=0,
        )
    assert engine.stats()["steps"] < 8 * 10


def test_prefix_cache_blocks_are_never_shared_across_adapters():
    model = tiny("gpt-nano")
    reference = copy.deepcopy(model)
    bank, adapters = bank_of(model)
    prompt = prompts_of([17], 48, seed=7)[0]
    engine = Engine(model, block_size=4, num_blocks=80, adapters=bank)
    params = SamplingParams(max_tokens=6, temperature=0)
    for name in [None, "a", None, "a", "c"]:  # each prompt computed once per adapter, then hit in the cache
        tokens = engine.generate([prompt], params, adapters=[name])[0].tokens
        assert tokens == greedy_alone(merged(reference, adapters.get(name)), prompt, 6), name
    assert engine.stats()["prefix_hit_tokens"] == 2 * 16  # the second base and the second "a" request


def test_adapters_load_unload_and_bad_names_are_clear_errors():
    model = tiny()
    bank, adapters = bank_of(model)
    engine = Engine(model, adapters=bank)
    with pytest.raises(AdapterError, match="no LoRA adapter named 'x' is loaded \\(loaded: a, b, c\\)"):
        engine.add_request([1, 2], SamplingParams(max_tokens=3), adapter="x")
    with pytest.raises(AdapterError, match="already loaded"):
        bank.add("a", adapters["a"])
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), adapter="b")
    engine.step()
    with pytest.raises(AdapterError, match="'b' is in use by 1 running request"):
        engine.remove_adapter("b")
    while engine.has_unfinished():
        engine.step()
    engine.remove_adapter("b")
    assert list(bank.adapters) == ["a", "c"] and bank.slot("c") == 1
    other = Transformer(ModelConfig.from_name("llama-nano", vocab_size=48, n_embd=64, n_head=4)).double()
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv"):
        bank.add("wide", random_adapter(other, 9, 2, ["attn.qkv"]))
    with pytest.raises(AdapterError, match="another model"):
        Engine(other, adapters=bank)
