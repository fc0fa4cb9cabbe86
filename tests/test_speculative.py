"""Speculative decoding against plain decoding: identical greedy tokens, the target's distribution when sampling."""

import math
from types import SimpleNamespace

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import SpeculativeError, accept_greedy, accept_reject, speculative_generate
from lmforge.model import Transformer


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads gain nothing and, on a loaded machine, their wake-ups dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str, seed: int, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig.from_name(name, **{"vocab_size": 31, "block_size": 64, **overrides})
    return Transformer(config).eval()


def plain_greedy(model, prompt, max_tokens, eos_id=None):
    return generate(model, [prompt], SamplingParams(temperature=0, max_tokens=max_tokens), eos_id=eos_id)[0].tokens


# ---------------------------------------------------------------------------------- real (random) models


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_is_identical_to_plain_greedy(name, k):
    target = tiny(name, 0, n_layer=2)
    draft = tiny(name, 1, n_layer=1, n_embd=32, n_head=2, **({"n_kv_head": 1} if name == "llama-nano" else {}))
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens, stats = speculative_generate(target, draft, prompt, SamplingParams(temperature=0, max_tokens=40), k=k)
    assert tokens == plain_greedy(target, prompt, 40)
    assert stats["rounds"] < 40 or stats["acceptance_rate"] == 0  # rounds <= tokens, fewer once drafts land


def test_greedy_with_penalties_sees_each_positions_own_context():
    # penalties depend on the tokens before each verified position: a wrong context per row changes the output
    target, draft = tiny("gpt-nano", 0, n_layer=2), tiny("gpt-nano", 1, n_layer=1)
    params = SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.5, frequency_penalty=0.5)
    prompt = [4, 4, 8]
    tokens, _ = speculative_generate(target, draft, prompt, params, k=4)
    assert tokens == generate(target, [prompt], params)[0].tokens
    assert tokens != plain_greedy(target, prompt, 30)  # the penalties did change the output


def test_draft_equal_to_target_accepts_everything():
    target = tiny("gpt-nano", 0, n_layer=2)
    prompt = [1, 2, 3]
    tokens, stats = speculative_generate(target, target, prompt, SamplingParams(temperature=0, max_tokens=21), k=4)
    assert tokens == plain_greedy(target, prompt, 21)
    assert stats["acceptance_rate"] == 1.0 and stats["rounds"] == 5  # 4 rounds of 5 tokens, then 1 alone


def test_stop_token_ends_output_like_plain_greedy():
    target, draft = tiny("gpt-nano", 0, n_layer=2), tiny("gpt-nano", 1, n_layer=1)
    prompt = [5, 6, 7]
    reference = plain_greedy(target, prompt, 30)
    eos = reference[7]  # a token the target produces: the output must end just before its first occurrence
    tokens, stats = speculative_generate(
        target, draft, prompt, SamplingParams(temperature=0, max_tokens=30), k=3, eos_id=eos
    )
    assert tokens == reference[: reference.index(eos)] and stats["finish_reason"] == "stop"


def test_bad_requests_are_clear_errors():
    target = tiny("gpt-nano", 0)
    with pytest.raises(SpeculativeError, match="vocabulary"):
        speculative_generate(target, tiny("gpt-nano", 1, vocab_size=40), [1], SamplingParams(max_tokens=3))
    with pytest.raises(SpeculativeError, match="k=0"):
        speculative_generate(target, target, [1], SamplingParams(max_tokens=3), k=0)
    with pytest.raises(SpeculativeError, match="n=2"):
        speculative_generate(target, target, [1], SamplingParams(max_tokens=3, n=2))


# ---------------------------------------------------------------------------------- stub models with fixed logits


class StubCache:
    """Records the tokens fed, so the test can check that rollbacks leave exactly the accepted context."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def crop(self, length: int) -> None:
        del self.tokens[length:]


class FixedLM(torch.nn.Module):
    """A 'model' whose next-token logits are the same vector whatever the context."""

    def __init__(self, logits):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=len(self.scores), block_size=10**6)
        self.caches = []

    def new_cache(self, batch_size, max_len):
        self.caches.append(StubCache())
        return self.caches[-1]

    def hidden(self, tokens, positions=None, kv_cache=None):
        kv_cache.tokens += tokens[0].tolist()
        return torch.zeros(*tokens.shape, 1)

    def logits(self, hidden):
        return self.scores.expand(*hidden.shape[:-1], -1)


NEG = -math.inf


def test_stub_target_never_accepts():
    draft = FixedLM([0.0, NEG, NEG, NEG])  # proposes only token 0 ...
    target = FixedLM([NEG, 0.0, 1.0, 0.0])  # ... which the target never produces
    tokens, stats = speculative_generate(target, draft, [1], SamplingParams(max_tokens=30, seed=0), k=4)
    assert stats["acceptance_rate"] == 0 and stats["accepted"] == 0
    assert len(tokens) == 30 and stats["rounds"] == 30 and 0 not in tokens
    assert target.caches[0].tokens == ([1] + tokens)[: len(target.caches[0].tokens)]


def test_stub_target_always_accepts():
    logits = [0.3, 1.0, -0.5, 2.0, 0.0]
    target, draft = FixedLM(logits), FixedLM(logits)  # q == p: every ratio is 1
    tokens, stats = speculative_generate(target, draft, [2, 2], SamplingParams(max_tokens=25, seed=1), k=4)
    assert stats["acceptance_rate"] == 1.0 and stats["rounds"] == 5 and len(tokens) == 25
    assert stats["tokens_per_round"] == 5.0
    context = [2, 2] + tokens
    for model in (target, draft):  # each cache holds a prefix of the final context: nothing rejected stays
        fed = model.caches[0].tokens
        assert fed == context[: len(fed)]


def test_stub_target_sometimes_accepts_at_the_predicted_rate():
    q = torch.tensor([0.5, 0.3, 0.1, 0.1])
    p = torch.tensor([0.1, 0.3, 0.3, 0.3])
    k = 3
    draft, target = FixedLM(q.log()), FixedLM(p.log())
    tokens, stats = speculative_generate(target, draft, [0], SamplingParams(max_tokens=2000, seed=2), k=k)
    alpha = float(torch.minimum(p, q).sum())  # chance that one draft token is accepted (Leviathan et al. eq. 1)
    expected = sum(alpha**i for i in range(1, k + 1)) / k  # accepted prefix length / k, over full rounds
    assert abs(stats["acceptance_rate"] - expected) < 0.03
    assert 0 < stats["accepted"] < stats["proposed"]
    fed = target.caches[0].tokens
    assert fed == ([0] + tokens)[: len(fed)]


def test_stub_greedy_takes_the_target_argmax():
    draft = FixedLM([0.0, 3.0, 1.0])  # argmax 1
    target = FixedLM([0.0, 1.0, 3.0])  # argmax 2
    tokens, stats = speculative_generate(target, draft, [0], SamplingParams(temperature=0, max_tokens=12), k=3)
    assert tokens == [2] * 12 and stats["accepted"] == 0


# ---------------------------------------------------------------------------------- the sampled distribution


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token with zero target probability was sampled"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52}  # chi-square 0.999 quantiles by degrees of freedom


def test_accept_greedy_is_accept_reject_with_one_hot_distributions():
    """The greedy shortcut against the general rule it stands for, on one-hot q and p."""
    gen = torch.Generator().manual_seed(3)
    V = 5
    for _ in range(200):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        drafted = torch.randint(0, V, (k,), generator=gen).tolist()
        best = torch.randint(0, V, (k + 1,), generator=gen).tolist()
        best[:k] = [d if torch.rand((), generator=gen) < 0.6 else b for d, b in zip(drafted, best[:k])]
        q = torch.nn.functional.one_hot(torch.tensor(drafted), V).float()
        p = torch.nn.functional.one_hot(torch.tensor(best), V).float()
        assert accept_greedy(drafted, best) == accept_reject(drafted, q, p, gen)


def test_accept_reject_first_token_follows_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    V, k = 5, 3
    q = torch.softmax(torch.randn(k, V, generator=gen) * 2, -1)
    p = torch.softmax(torch.randn(k + 1, V, generator=gen) * 2, -1)
    counts = torch.zeros(V)
    for _ in range(3000):
        drafted = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        counts[accept_reject(drafted, q, p, gen)[0]] += 1
    assert chi_square(counts, p[0]) < CHI2_999[V - 1]
    assert chi_square(counts, q[0]) > 100  # and clearly not the draft's


def test_sampled_tokens_follow_the_processed_target_distribution():
    draft = FixedLM([2.0, 1.5, 0.0, -1.0, 0.5, 1.0])
    target = FixedLM([0.0, 1.0, 0.5, 1.5, -0.5, 0.2])
    params = SamplingParams(max_tokens=2000, temperature=0.8, top_k=4, seed=3)
    tokens, stats = speculative_generate(target, draft, [0], params, k=4)
    expected = torch.softmax(target.scores / 0.8, -1)
    expected[expected < expected.sort(descending=True).values[3]] = 0  # top_k=4
    expected /= expected.sum()
    counts = torch.bincount(torch.tensor(tokens), minlength=6).float()
    assert chi_square(counts, expected) < CHI2_999[3]
    assert 0 < stats["acceptance_rate"] < 1
