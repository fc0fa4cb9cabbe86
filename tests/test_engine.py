"""The engine against its plain twins: greedy decoding alone with the contiguous KVCache, and infer.generate.

Models are tiny, random and in float64, so batching, padding and paging change logits by ~1e-15 and token
choices are exactly comparable.
"""

import asyncio

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.engine.loop import EngineLoop
from lmforge.infer.generate import generate as plain_generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import CharTokenizer


def tiny(preset="gpt-nano", **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(preset, **kw)).double().eval()


@torch.no_grad()
def greedy_alone(model, prompt, max_tokens):
    """The reference: prefill the prompt into a contiguous cache, then argmax one token per step."""
    cache = model.new_cache(1, len(prompt) + max_tokens)
    logits = model(torch.tensor([prompt]), kv_cache=cache)[0, -1]
    out = []
    for _ in range(max_tokens):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), kv_cache=cache)[0, -1]
    return out


def prompts_of(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
def test_greedy_matches_decoding_each_prompt_alone_with_joins_chunks_and_leaves(preset):
    model = tiny(preset)
    # A small budget chunks the 40-token prompt over steps while others decode; prompts arrive at different steps.
    engine = Engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=12, max_num_seqs=4)
    prompts = prompts_of([5, 40, 1, 13, 9, 22], model.config.vocab_size)
    max_tokens = [10, 8, 15, 6, 12, 9]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 9: [5]}  # step -> prompts added before it
    ids, got, step = {}, {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            ids[engine.add_request(prompts[i], SamplingParams(max_tokens=max_tokens[i], temperature=0))] = i
        for out in engine.step():
            got.setdefault(ids[out.request_id], []).extend(out.new_token_ids)
        step += 1
    for i, prompt in enumerate(prompts):
        assert got[i] == greedy_alone(model, prompt, max_tokens[i]), f"prompt {i}"
    assert engine.block_manager.num_used_blocks == 0


def test_preemption_under_a_small_pool_still_gives_the_plain_tokens():
    model = tiny()
    prompts = prompts_of([6, 9, 3, 7], model.config.vocab_size, seed=4)
    engine = Engine(model, block_size=4, num_blocks=10)  # 40 slots for 4 x ~20 tokens: someone must yield
    outs = engine.generate(prompts, SamplingParams(max_tokens=14, temperature=0))
    assert engine.stats()["preemptions"] > 0
    for prompt, c in zip(prompts, outs):
        assert c.tokens == greedy_alone(model, prompt, 14)
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_caching_gives_the_same_tokens_and_computes_fewer():
    model = tiny()
    shared = prompts_of([24], model.config.vocab_size)[0]
    prompts = [shared + tail for tail in prompts_of([3, 5, 1], model.config.vocab_size, seed=2)]
    params = SamplingParams(max_tokens=6, temperature=0)
    engine = Engine(model, block_size=4, num_blocks=64)
    first = engine.generate(prompts[:1], params)  # computes and caches the shared blocks
    computed = engine.stats()["computed_tokens"]
    rest = engine.generate(prompts[1:], params)
    stats = engine.stats()
    for prompt, c in zip(prompts, first + rest):
        assert c.tokens == greedy_alone(model, prompt, 6)
    assert stats["prefix_hit_tokens"] == 2 * 24
    # Each later prompt computes only its tokens after the 24 cached ones, then one token per decode step.
    assert stats["computed_tokens"] - computed == (29 - 24 + 5) + (25 - 24 + 5)
    assert stats["kv_blocks_used"] == 0


def test_matches_infer_generate_with_sampling_penalties_stop_strings_logprobs_and_n():
    tok = CharTokenizer(sorted(" abcdefghijklmnopqrstuvwxyz"))
    model = tiny(vocab_size=tok.vocab_size)
    prompts = [tok.encode(t) for t in ("hello there", "abc", "the quick brown fox")]
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=7, logprobs=2),
        SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.3, stop=["e", "ab"]),
        SamplingParams(max_tokens=9, temperature=1.0, top_p=0.8, seed=3, n=2),
    ]
    want = plain_generate(model, prompts, params, tokenizer=tok)
    got = Engine(model, tok, block_size=4, num_blocks=64).generate(prompts, params)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert (g.prompt_index, g.sample_index) == (w.prompt_index, w.sample_index)
        assert g.tokens == w.tokens and g.text == w.text and g.finish_reason == w.finish_reason
        assert (g.logprobs is None) == (w.logprobs is None)
        if g.logprobs:
            assert [lp.token for lp in g.logprobs] == [lp.token for lp in w.logprobs]
            torch.testing.assert_close([lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs])
    assert got[2].tokens != got[3].tokens  # the n samples draw from different RNG streams


def test_a_seeded_request_gives_the_same_output_whatever_shares_its_batch():
    model = tiny()
    prompt = prompts_of([7], model.config.vocab_size)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=123)
    alone = Engine(model, block_size=4).generate([prompt], params)[0].tokens
    crowd = prompts_of([3, 11, 5], model.config.vocab_size, seed=9)
    mixed = Engine(model, block_size=4).generate(
        crowd + [prompt], [SamplingParams(max_tokens=10, seed=s) for s in (1, 2, 3)] + [params]
    )
    assert mixed[-1].tokens == alone


def test_abort_frees_blocks_at_once_and_the_rest_finish():
    model = tiny()
    engine = Engine(model, block_size=4, num_blocks=64)
    a = engine.add_request([1, 2, 3, 4, 5, 6], SamplingParams(max_tokens=30, temperature=0))
    b = engine.add_request([7, 8, 9], SamplingParams(max_tokens=5, temperature=0))
    engine.step(), engine.step()
    used = engine.stats()["kv_blocks_used"]
    (final,) = engine.abort(a)
    assert final.finish_reason == "abort"
    assert engine.stats()["kv_blocks_used"] == used - 2  # a's 8 slots lived in 2 blocks
    assert engine.abort(a) == []
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert all(o.request_id == b for o in outs) and outs[-1].finish_reason == "length"
    assert engine.stats()["kv_blocks_used"] == 0 and engine.requests == {}


def test_engine_loop_streams_each_request_and_cancels():
    model = tiny()
    prompts = prompts_of([4, 9, 6], model.config.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0)
    with EngineLoop(Engine(model, block_size=4, num_blocks=64)) as loop:
        streams = [loop.submit(p, params) for p in prompts]
        long = loop.submit(prompts[0], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
        for p, s in zip(prompts, streams):
            outs = list(s)
            assert sum((o.new_token_ids for o in outs), []) == greedy_alone(model, p, 8)
            assert outs[-1].finish_reason == "length" and outs[-1].metrics["ttft_s"] > 0
        loop.abort(long.request_id)
        assert list(long)[-1].finish_reason in ("abort", "length")
        with pytest.raises(ValueError, match="vocabulary"):
            loop.submit([10_000], params)

        async def consume():
            stream = loop.submit(prompts[1], params)
            return [t async for o in stream for t in o.new_token_ids]

        assert asyncio.run(consume()) == greedy_alone(model, prompts[1], 8)
    assert loop.engine.stats()["kv_blocks_used"] == 0


class Exploding:
    """A sampling hook (allowed tokens, or a TokenGuard) that raises once a row has `after` output tokens: a fault
    while the engine serves one request, before sampling (the mask) or after it (the guard's veto)."""

    end_token = None

    def __init__(self, after: int):
        self.after = after

    def __call__(self, output_ids):  # SamplingParams.allowed_tokens
        if len(output_ids) >= self.after:
            raise RuntimeError("the hook failed")
        return None

    def rejects(self, context, prompt_len, token):  # TokenGuard
        self(context[prompt_len:])
        return False

    def observe(self, logits):
        pass


def test_a_request_that_fails_in_a_step_fails_alone():
    """Requests whose hooks raise mid-output (one before sampling, one after the batch has drawn) end with
    finish_reason "error" and the exception, their KV blocks freed; the requests sharing their steps -- seeded
    sampling, greedy, a prompt prefilled in chunks meanwhile -- give exactly their outputs alone, and the engine
    goes on serving."""
    model = tiny()
    prompts = prompts_of([7, 12, 30], model.config.vocab_size)
    params = [
        SamplingParams(max_tokens=12, temperature=1.0, seed=5),
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=6, temperature=0.8, seed=9, top_k=5),
    ]
    alone = [Engine(model, block_size=4).generate([p], sp)[0].tokens for p, sp in zip(prompts, params)]
    bad = [
        SamplingParams(max_tokens=12, seed=1, n=2, allowed_tokens=Exploding(3)),
        SamplingParams(max_tokens=12, seed=2, guard=Exploding(2)),
    ]
    engine = Engine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16)
    good_ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    bad_ids = [engine.add_request(prompts[0], sp) for sp in bad]
    tokens, finals = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id, out.index] = out
    assert [tokens[rid, 0] for rid in good_ids] == alone
    assert all(finals[rid, 0].error is None for rid in good_ids)
    for rid, n, after in ((bad_ids[0], 2, 3), (bad_ids[1], 1, 2)):
        for j in range(n):
            assert finals[rid, j].finish_reason == "error" and "hook failed" in str(finals[rid, j].error)
            assert len(tokens[rid, j]) == after  # what it produced before the fault
    assert engine.block_manager.num_used_blocks == 0 and engine.requests == {}
    assert engine.generate([prompts[1]], params[1])[0].tokens == alone[1]
    with pytest.raises(RuntimeError, match="hook failed"):  # generate() runs the others to their end, then raises
        engine.generate([prompts[1], prompts[0]], [params[1], bad[0]])
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_the_engine_loop_keeps_serving_after_a_request_fails():
    model = tiny()
    prompts = prompts_of([4, 9], model.config.vocab_size)
    params = SamplingParams(max_tokens=8, temperature=0)
    with EngineLoop(Engine(model, block_size=4, num_blocks=64)) as loop:
        good = loop.submit(prompts[0], params)
        bad = loop.submit(prompts[1], SamplingParams(max_tokens=8, allowed_tokens=Exploding(1)))
        assert sum((o.new_token_ids for o in good), []) == greedy_alone(model, prompts[0], 8)
        outs = list(bad)
        assert outs[-1].finish_reason == "error" and isinstance(outs[-1].error, RuntimeError)
        assert loop.error is None
        later = loop.submit(prompts[1], params)
        assert sum((o.new_token_ids for o in later), []) == greedy_alone(model, prompts[1], 8)
    assert loop.engine.stats()["kv_blocks_used"] == 0


def test_kv_bytes_per_live_token_follow_the_blocks_held():
    model = tiny()
    engine = Engine(model, block_size=4, num_blocks=64)
    engine.add_request([1] * 6, SamplingParams(max_tokens=10, temperature=0))
    engine.step()  # 6 prompt tokens computed, in 2 blocks
    s = engine.stats()
    c = model.config
    assert s["kv_bytes_per_token_ideal"] == 2 * c.n_layer * c.kv_dim * 8  # float64
    assert s["live_tokens"] == 6 and s["kv_blocks_used"] == 2
    assert s["kv_bytes_per_live_token"] == 2 * 4 * s["kv_bytes_per_token_ideal"] / 6


def test_requests_that_cannot_fit_are_refused_with_the_reason():
    engine = Engine(tiny(), block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="context is 64"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ([], SamplingParams(), "prompt"),
        ([1, 10**6], SamplingParams(), "prompt"),
        ([1], SamplingParams(stop=["x"]), "stop"),
        ([1] * 60, SamplingParams(max_tokens=10), "max_tokens"),
    ],
)
def test_engine_and_generate_refuse_the_same_prompts_naming_the_same_parameter(prompt, params, param):
    from lmforge.errors import LmforgeError

    model = tiny()  # gpt-nano: a context of 64
    with pytest.raises(LmforgeError) as by_engine:
        Engine(model, block_size=4, num_blocks=64).add_request(prompt, params)
    with pytest.raises(LmforgeError) as by_generate:
        plain_generate(model, [prompt], params)
    assert by_engine.value.param == by_generate.value.param == param
