"""Speculative decoding inside the engine against its plain twins: the engine without a draft, and greedy alone.

Models are tiny, random and in float64 (see test_engine.py), so greedy token choices are exactly comparable.
"""

import torch

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.engine import Engine
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.sequence import Sequence
from lmforge.infer.sampling import SamplingParams
from tests.test_engine import greedy_alone, prompts_of, tiny


def draft_of(target, seed=5):
    torch.manual_seed(seed)
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    return (
        Transformer(ModelConfig.from_name("gpt-nano", n_layer=1, vocab_size=target.config.vocab_size)).double().eval()
    )


def test_scheduler_reserves_lookahead_and_takes_several_tokens_per_step():
    sched = Scheduler(BlockManager(16, 4), 4, 64, num_lookahead_tokens=3)
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0), eos_id=0)
    sched.add(seq)
    out = sched.schedule()
    assert out.scheduled == [(seq, 3)] and out.lookahead == {}  # a prompt does not speculate
    sched.update_from_output(out, {seq.seq_id: [7]})
    out = sched.schedule()
    assert out.lookahead == {seq.seq_id: 3} and out.num_batched_tokens == 4
    assert len(seq.block_table) * 4 >= seq.num_computed_tokens + 1 + 3  # slots for the drafts it checks
    sched.update_from_output(out, {seq.seq_id: [8, 9, 10]})  # two drafts accepted, one token of the target's
    assert seq.output_ids == [7, 8, 9, 10] and seq.num_computed_tokens == seq.num_tokens - 1
    out = sched.schedule()
    assert out.lookahead == {seq.seq_id: 1}  # max_tokens=6 leaves room for 2 more: one draft at most
    sched.update_from_output(out, {seq.seq_id: [11, 12, 13]})  # more than max_tokens allows: cut there
    assert seq.finished and seq.finish_reason == "length" and seq.output_ids == [7, 8, 9, 10, 11, 12]
    seq2 = Sequence("b", [1, 2], SamplingParams(max_tokens=9, temperature=0), eos_id=0)
    sched.add(seq2)
    sched.update_from_output(sched.schedule(), {seq2.seq_id: [5]})
    sched.update_from_output(sched.schedule(), {seq2.seq_id: [6, 0, 7]})
    assert seq2.finish_reason == "stop" and seq2.output_ids == [5, 6]
    assert sched.block_manager.num_used_blocks == 0


def run(engine, prompts, params):
    return [c.tokens for c in engine.generate(prompts, params)]


def test_greedy_equals_plain_greedy_with_a_poor_draft_and_chunked_prompts():
    model = tiny("llama-nano")
    prompts = prompts_of([5, 40, 1, 13, 9, 22], model.config.vocab_size)
    engine = Engine(
        model,
        block_size=4,
        num_blocks=96,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        draft=draft_of(model),
        num_speculative_tokens=3,
    )
    got = run(engine, prompts, SamplingParams(max_tokens=12, temperature=0))
    for prompt, tokens in zip(prompts, got):
        assert tokens == greedy_alone(model, prompt, 12)
    stats = engine.stats()
    assert stats["draft_proposed"] > 0 and stats["draft_accepted"] < stats["draft_proposed"]
    assert engine.block_manager.num_used_blocks == 0


def test_the_target_as_its_own_draft_accepts_every_greedy_proposal_and_takes_fewer_steps():
    model = tiny()
    prompts = prompts_of([7, 3], model.config.vocab_size, seed=3)
    plain = Engine(model, block_size=4, num_blocks=64)
    spec = Engine(model, block_size=4, num_blocks=64, draft=model, num_speculative_tokens=4)
    params = SamplingParams(max_tokens=16, temperature=0)
    assert run(spec, prompts, params) == run(plain, prompts, params)
    s = spec.stats()
    assert s["draft_accepted"] == s["draft_proposed"] > 0
    assert s["steps"] < plain.stats()["steps"] / 2


def test_prefix_cache_hits_preemption_stop_ids_and_logprobs_keep_plain_results():
    model = tiny()
    V = model.config.vocab_size
    shared = prompts_of([12], V)[0]
    prompts = [shared + tail for tail in prompts_of([3, 5, 1, 2], V, seed=2)]
    params = SamplingParams(max_tokens=14, temperature=0, logprobs=2, stop_token_ids=[7])
    plain = Engine(model, block_size=4, num_blocks=64).generate(prompts, params)
    spec_engine = Engine(
        model, block_size=4, num_blocks=20, max_num_seqs=4, draft=draft_of(model), num_speculative_tokens=2
    )
    spec = spec_engine.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        assert [lp.token for lp in a.logprobs] == [lp.token for lp in b.logprobs]
        assert torch.allclose(
            torch.tensor([lp.logprob for lp in a.logprobs]), torch.tensor([lp.logprob for lp in b.logprobs]), atol=1e-9
        )
    assert spec_engine.stats()["prefix_hit_tokens"] > 0
    assert spec_engine.block_manager.num_used_blocks == 0


def test_sampled_tokens_keep_the_target_distribution():
    # Many seeded samples of a 3-token continuation, with and without a (poor) draft: the per-position token
    # frequencies must agree within sampling noise; a draft that leaked its own distribution would not.
    model = tiny(vocab_size=8)
    draft = draft_of(model, seed=11)
    prompt = [1, 2, 3]
    n = 1500

    def freqs(engine):
        params = [SamplingParams(max_tokens=3, temperature=0.4, seed=i) for i in range(n)]
        counts = torch.zeros(3, 8)
        for c in engine.generate([prompt] * n, params):
            for pos, t in enumerate(c.tokens):
                counts[pos, t] += 1
        return counts / n

    plain = freqs(Engine(model, max_num_seqs=64, max_num_batched_tokens=512))
    spec = freqs(Engine(model, max_num_seqs=64, max_num_batched_tokens=512, draft=draft, num_speculative_tokens=2))
    draft_only = freqs(Engine(draft, max_num_seqs=64, max_num_batched_tokens=512))
    assert (plain - spec).abs().max() < 0.05
    assert (plain - draft_only).abs().max() > 0.15  # the test could tell a draft's distribution apart
