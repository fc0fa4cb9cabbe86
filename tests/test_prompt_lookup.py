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
    # the prompt's pattern was proposed: about one request in three, once lookup had predicted a token right
    assert spec_engine.stats()["draft_proposed"] > n / 4
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


def drive(proposer, text, prompt_len, k):
    """Decode `text` (the target's greedy tokens) from its first prompt_len tokens with `proposer`, as the
    engine would: each step the target keeps the proposal's prefix that matches the text, then adds its own
    token. (tokens proposed, tokens kept, steps, each step's proposal length)."""
    from lmforge.engine.sequence import Sequence

    seq = Sequence("r", list(text[:prompt_len]), SamplingParams(max_tokens=10_000, temperature=0))
    proposed = kept = 0
    lengths = []
    while len(seq.token_ids) < len(text):
        drafted, q = proposer.propose([seq], [k])
        assert q == [None]  # greedy: no distributions
        at, d = len(seq.token_ids), drafted[0]
        n = next((i for i, t in enumerate(d) if at + i >= len(text) or text[at + i] != t), len(d))
        seq.token_ids += text[at : at + n + 1]
        proposed, kept = proposed + len(d), kept + n
        lengths.append(len(d))
    return proposed, kept, len(lengths), lengths


def test_proposals_grow_as_lookup_keeps_predicting_the_targets_tokens():
    from lmforge.engine.drafter import NgramProposer

    text = list(range(1, 12)) * 20  # the target repeats its prompt
    proposed, kept, steps, lengths = drive(NgramProposer(vocab_size=64, k=6), text, 11, 6)
    # Nothing is proposed before lookup has been right; then the rate grows and so do the proposals, to k.
    assert lengths[:8] == [0, 0, 0, 1, 2, 4, 6, 6] and set(lengths[6:]) == {6}
    assert kept == proposed and steps < (len(text) - 11) / 5


@pytest.mark.parametrize("keep", [0.0, 0.7])
def test_where_lookup_rarely_predicts_the_targets_tokens_few_proposals_are_checked(keep):
    """Text that repeats nothing (a 6-token vocabulary drawn at random: its n-grams recur, what follows them does
    not), or repeats with 30% of its tokens replaced: the rate lookup is right at stays below what a check costs,
    so (almost) nothing is proposed. The rule this replaced (proposals shortened after a rejection, paused after
    a rejected single token, by what was checked alone) checked 36 and 78 tokens here, 2 and 21 of them kept."""
    from lmforge.engine.drafter import NgramProposer

    rng = random.Random(0)
    if keep:
        text = [t if rng.random() < keep else rng.randrange(20, 40) for t in list(range(1, 12)) * 20]
    else:
        text = [rng.randrange(6) for _ in range(300)]
    proposed, kept, steps, _ = drive(NgramProposer(vocab_size=64, k=6, check_cost=0.5), text, 11, 6)
    assert proposed - kept <= 20 and proposed <= 2 * kept + 10


def test_the_check_cost_sets_how_sure_a_proposal_must_be():
    from lmforge.engine.drafter import NgramProposer

    rng = random.Random(1)
    text = [t if rng.random() < 0.8 else rng.randrange(20, 40) for t in list(range(1, 12)) * 20]
    cheap = drive(NgramProposer(vocab_size=64, k=6, check_cost=0.1), text, 11, 6)
    dear = drive(NgramProposer(vocab_size=64, k=6, check_cost=0.7), text, 11, 6)
    assert cheap[0] > 2 * dear[0] and cheap[2] < dear[2]  # more proposed, fewer steps
    assert dear[0] - dear[1] < cheap[0] - cheap[1]  # fewer checked for nothing
    with pytest.raises(SpeculativeError, match="check_cost"):
        NgramProposer(vocab_size=64, k=6, check_cost=1.0)


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


def test_only_rows_lookup_expects_to_propose_for_hold_lookahead_slots():
    """The scheduler reserves lookahead slots (and budget) for a row only where prompt lookup expects to propose:
    random sampled text gets (almost) none, a greedy row that repeats its prompt gets them, and each reservation
    is a proposal checked. The rows without slots keep their lookup's rate current (its `mirror`), so the repeating
    row starts proposing as soon as lookup has been right."""
    model = tiny("llama-nano", vocab_size=31, block_size=128)
    spec = Engine(model, block_size=4, num_blocks=160, max_num_seqs=4, speculative="ngram", num_speculative_tokens=4)
    prompts = [list(range(20)), list(range(5, 28)), repetitive(31, 40, 3)]
    row = {tuple(p): i for i, p in enumerate(prompts)}
    reserved, proposed = [0, 0, 0], [0, 0, 0]  # per row: steps it held lookahead slots, steps it proposed
    schedule, propose = spec.scheduler.schedule, spec.drafter.propose

    def spy_schedule():
        out = schedule()
        for seq, _ in out.scheduled:
            reserved[row[tuple(seq.token_ids[: seq.prompt_len])]] += seq.seq_id in out.lookahead
        return out

    def spy_propose(seqs, ks):
        drafted, q = propose(seqs, ks)
        for seq, d in zip(seqs, drafted):
            proposed[row[tuple(seq.token_ids[: seq.prompt_len])]] += bool(d)
        return drafted, q

    spec.scheduler.schedule, spec.drafter.propose = spy_schedule, spy_propose
    params = [SamplingParams(max_tokens=40, temperature=1.5, seed=i) for i in range(2)]
    params.append(SamplingParams(max_tokens=40, temperature=0))
    got = run(spec, prompts, params)
    assert got[2] == greedy_alone(model, prompts[2], 40)
    assert reserved[0] + reserved[1] <= 4  # random text (39 decoding steps a row): (almost) no slots held
    assert reserved[2] >= 3 and proposed[2] >= 3  # the repeating row proposes
    assert sum(reserved) <= sum(proposed) + 2  # a reservation is (nearly always) a proposal checked
