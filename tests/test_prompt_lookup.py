"""Prompt-lookup (n-gram) speculative decoding against its plain twins: a naive scan for the index, plain greedy
decoding for the tokens, the target's distribution for sampled outputs, and the plain engine for the work done."""

import random

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import NgramIndex, SpeculativeError, accept_reject, one_hot, speculative_generate
from lmforge.model import Transformer
from tests.test_engine import greedy_alone, tiny
from tests.test_speculative import CHI2_999, FixedLM, chi_square


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def naive_lookup(tokens, k, n_min, n_max):
    """The rule written as a scan: the longest n first, the most recent earlier occurrence of the last n tokens."""
    L = len(tokens)
    for n in range(min(n_max, L), n_min - 1, -1):
        for end in range(L - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == tokens[L - n :]:
                return tokens[end + 1 : end + 1 + k]
    return []


def repetitive(vocab, length, seed):
    """A prompt that repeats itself: a few random phrases, each used several times."""
    rng = random.Random(seed)
    phrases = [[rng.randrange(vocab) for _ in range(rng.randint(3, 7))] for _ in range(4)]
    out = []
    while len(out) < length:
        out += rng.choice(phrases)
    return out[:length]


def test_the_index_proposes_what_a_naive_scan_proposes_as_tokens_are_appended():
    rng = random.Random(0)
    for trial in range(60):
        n_min, n_max = rng.choice([(1, 1), (1, 3), (2, 4), (3, 3)])
        k = rng.randint(1, 6)
        tokens = [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randint(1, 5))]
        index = NgramIndex(n_min, n_max)
        while len(tokens) < 80:
            assert index.propose(tokens, k) == naive_lookup(tokens, k, n_min, n_max)
            tokens += [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randint(1, 4))]


def test_lookup_takes_the_longest_n_gram_and_its_most_recent_occurrence():
    index = NgramIndex(1, 3)
    # "7 8" occurred twice (followed by 1 then by 2); "9 7 8" once, followed by 3: the longer match wins.
    assert index.propose([9, 7, 8, 3, 5, 7, 8, 1, 6, 7, 8, 2, 0, 9, 7, 8], 2) == [3, 5]
    assert NgramIndex(1, 2).propose([9, 7, 8, 3, 5, 7, 8, 1, 6, 7, 8, 2, 0, 9, 7, 8], 2) == [2, 0]  # most recent
    assert NgramIndex(2, 3).propose([1, 2, 3, 4], 3) == []  # nothing repeats: no proposal
    with pytest.raises(SpeculativeError, match="n_min=0"):
        NgramIndex(0, 2)


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_greedy_prompt_lookup_gives_plain_greedy_tokens_with_fewer_forwards(name):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(name, vocab_size=31, block_size=128, n_layer=2)).eval()
    for seed in range(3):
        prompt = repetitive(31, 40, seed)
        tokens, stats = speculative_generate(
            model, NgramIndex(), prompt, SamplingParams(temperature=0, max_tokens=40), k=4
        )
        assert tokens == greedy_alone(model, prompt, 40)
        assert stats["proposed"] > 0 and stats["rounds"] < 40  # proposals happened, and some were accepted


def test_a_one_hot_draft_keeps_the_target_distribution_under_accept_reject():
    """The deterministic proposal x is kept with probability p(x), and otherwise a token is drawn from p without x:
    the first token follows p, not the proposal."""
    gen = torch.Generator().manual_seed(0)
    V = 5
    p = torch.softmax(torch.randn(4, V, generator=gen) * 1.5, -1)
    drafted = [int(p[0].argmin()), 1, 2]
    counts = torch.zeros(V)
    for _ in range(4000):
        counts[accept_reject(drafted, one_hot(drafted, V), p, gen)[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_999[V - 1]
    assert counts[drafted[0]] < 0.5 * 4000  # a rule that kept proposals would give it (nearly) every draw


def test_sampled_prompt_lookup_keeps_the_models_distribution_token_after_token():
    """Tokens of a context-free target are independent draws from p: their bigram counts must fit p x p. Copying a
    proposal that followed an earlier occurrence would tie each token to the one before it."""
    logits = torch.tensor([0.0, 1.0, 0.5, -0.5])
    target = FixedLM(logits)
    params = SamplingParams(max_tokens=4000, temperature=1.0, seed=5)
    tokens, stats = speculative_generate(target, NgramIndex(1, 2), [0, 1, 2, 3, 0, 1], params, k=3)
    assert stats["proposed"] > 1000 and 0 < stats["accepted"] < stats["proposed"]
    p = torch.softmax(logits, -1)
    pairs = torch.zeros(4, 4)
    for a, b in zip(tokens, tokens[1:]):
        pairs[a, b] += 1
    chi2 = chi_square(pairs.flatten(), torch.outer(p, p).flatten())
    assert chi2 < 37.7  # chi-square 0.999 quantile, 15 degrees of freedom
    assert chi_square(torch.bincount(torch.tensor(tokens), minlength=4).float(), p) < CHI2_999[3]


def run(engine, prompts, params):
    return [c.tokens for c in engine.generate(prompts, params)]


def test_the_engine_with_prompt_lookup_gives_plain_greedy_tokens_and_only_rejected_proposals_cost_extra():
    model = tiny("llama-nano", vocab_size=31, block_size=128)
    prompts = [repetitive(31, n, seed) for seed, n in enumerate([30, 45, 9, 60, 22])]
    prompts.append(list(range(20)))  # nothing repeats in the prompt
    params = SamplingParams(max_tokens=24, temperature=0)
    plain = Engine(model, block_size=4, num_blocks=160, max_num_batched_tokens=32, max_num_seqs=4)
    spec = Engine(
        model,
        block_size=4,
        num_blocks=160,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        speculative="ngram",
        num_speculative_tokens=3,
    )
    got = run(spec, prompts, params)
    assert got == run(plain, prompts, params)
    for prompt, tokens in zip(prompts, got):
        assert tokens == greedy_alone(model, prompt, 24)
    s, p = spec.stats(), plain.stats()
    assert s["draft_proposed"] > s["draft_accepted"] > 0 and s["steps"] < p["steps"]
    # Every row computes what plain decoding computes, plus its rejected proposals: a row with no proposal costs
    # nothing extra, and accepted tokens are not computed twice.
    assert s["computed_tokens"] == p["computed_tokens"] + s["draft_proposed"] - s["draft_accepted"]
    assert spec.block_manager.num_used_blocks == 0


def test_through_the_fused_step_padded_proposals_give_plain_greedy_tokens():
    """float32, prepared for decoding: checks of different proposal lengths share one fused call, the shorter
    ones padded; a token's logits there do not depend on the batch or the padding."""
    from lmforge.infer.fused import decode_path, prepare_for_decoding

    torch.manual_seed(0)
    model = prepare_for_decoding(Transformer(ModelConfig.from_name("llama-nano", vocab_size=31, block_size=128)).eval())
    prompts = [repetitive(31, n, seed) for seed, n in enumerate([30, 45, 19, 60, 22, 33])]
    params = SamplingParams(max_tokens=30, temperature=0)
    plain = Engine(model, block_size=8, num_blocks=120, max_num_seqs=6)
    spec = Engine(
        model,
        block_size=8,
        num_blocks=120,
        max_num_seqs=6,
        speculative="ngram",
        num_speculative_tokens=6,
        prompt_lookup_min=1,
    )
    assert run(spec, prompts, params) == run(plain, prompts, params)
    assert spec.stats()["draft_accepted"] > 0 and spec.stats()["steps"] < plain.stats()["steps"]
    assert decode_path(model) in ("fused", "packed")


def test_the_engine_with_prompt_lookup_keeps_the_sampled_distribution():
    model = tiny(vocab_size=8)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    n = 1200

    def freqs(engine):
        params = [SamplingParams(max_tokens=4, temperature=0.7, seed=i) for i in range(n)]
        counts = torch.zeros(4, 8)
        for c in engine.generate([prompt] * n, params):
            for pos, t in enumerate(c.tokens):
                counts[pos, t] += 1
        return counts / n

    plain = freqs(Engine(model, max_num_seqs=64, max_num_batched_tokens=512))
    spec_engine = Engine(
        model,
        max_num_seqs=64,
        max_num_batched_tokens=512,
        speculative="ngram",
        num_speculative_tokens=3,
        prompt_lookup_min=1,
    )
    spec = freqs(spec_engine)
    assert spec_engine.stats()["draft_proposed"] > n  # the prompt's pattern was proposed
    assert (plain - spec).abs().max() < 0.06
    proposal = torch.zeros(4, 8)
    proposal[torch.arange(4), torch.tensor([3, 1, 2, 3])] = 1  # what copying the prompt's pattern would give
    assert (plain - proposal).abs().max() > 0.3  # the test could tell the proposals from the model


def test_prompt_lookup_settings_are_checked():
    model = tiny()
    with pytest.raises(SpeculativeError, match="speculative='medusa'"):
        Engine(model, speculative="medusa")
    with pytest.raises(SpeculativeError, match="n_min=3, n_max=2"):
        Engine(model, speculative="ngram", prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(SpeculativeError, match="num_speculative_tokens=0"):
        Engine(model, speculative="ngram", num_speculative_tokens=0)


def test_proposals_shrink_and_pause_where_the_target_rejects_them_and_grow_where_it_keeps_them():
    from lmforge.engine.drafter import NgramProposer
    from lmforge.engine.sequence import Sequence

    proposer = NgramProposer(vocab_size=64, k=6)
    seq = Sequence("r", list(range(1, 41)) + [1, 2], SamplingParams(max_tokens=60, temperature=0))

    def propose():
        drafted, q = proposer.propose([seq], [6])
        assert q == [None]  # greedy: no distributions
        return drafted[0]

    def answer(proposal, kept, restore):
        """The target keeps `kept` tokens and chooses another (0) after them; then two plain steps give the
        tokens `restore`, whose earlier occurrence in the prompt has plenty after it to propose."""
        seq.token_ids += proposal[:kept] + [0] + list(restore)

    assert propose() == [3, 4, 5, 6, 7, 8]  # the first proposal is as long as allowed
    answer([3, 4, 5, 6, 7, 8], 0, (5, 6))
    assert propose() == [7]  # none kept: one token next
    answer([7], 0, (9, 10))
    assert [propose(), propose()] == [[], [11]]  # the shortest rejected: sit out one step
    answer([11], 0, (13, 14))
    assert [propose(), propose(), propose()] == [[], [], [15]]  # rejected again: two steps
    answer([15], 1, (17, 18))
    assert propose() == [19, 20, 21]  # kept whole: two longer
    answer([19, 20, 21], 3, (25, 26))
    assert propose() == [27, 28, 29, 30, 31]
    answer([27, 28, 29, 30, 31], 2, (33, 34))
    assert propose() == [35, 36, 37]  # cut short: one longer than what was kept


def test_rows_without_a_proposal_share_the_proposals_check_instead_of_a_second_forward(monkeypatch):
    from lmforge.engine import forward

    model = tiny("llama-nano", vocab_size=31, block_size=128)
    prompts = [repetitive(31, 40, 3), list(range(25)), repetitive(31, 30, 5)]
    params = SamplingParams(max_tokens=20, temperature=0)
    calls = []
    real = forward.logits
    monkeypatch.setattr(forward, "logits", lambda *a, **kw: calls.append(len(a[3])) or real(*a, **kw))
    spec = Engine(
        model,
        block_size=4,
        num_blocks=120,
        max_num_batched_tokens=128,
        max_num_seqs=3,
        speculative="ngram",
        num_speculative_tokens=4,
    )
    got = run(spec, prompts, params)
    assert got == [greedy_alone(model, p, 20) for p in prompts]
    steps = spec.stats()["steps"]
    assert spec.stats()["draft_proposed"] > 0
    assert len(calls) == steps - 1  # the prompts' step runs none; each decoding step one, whoever proposed
