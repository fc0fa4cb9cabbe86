"""Each sampling stage against a plain-loop reference, the composed step, settings validation, stop strings."""

import math

import pytest
import torch

from lmforge.infer.sampling import (
    REPETITION_PENALTY_RANGE,
    SamplingError,
    SamplingParams,
    StopStrings,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    argmax,
    ban_sequences,
    make_generator,
    min_p_filter,
    process_logits,
    sample_next,
    token_counts,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

NEG = -math.inf


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, 30) * 3


# ------------------------------------------------------------------ naive references, one row at a time


def ref_top_p(row: list[float], p: float) -> list[float]:
    """Sort, walk down accumulating probability, keep tokens until the mass before a token reaches p."""
    probs = torch.tensor(row).softmax(-1).tolist()
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep, mass = set(), 0.0
    for i in order:
        if mass >= p and keep:
            break
        keep.add(i)
        mass += probs[i]
    return [x if i in keep else NEG for i, x in enumerate(row)]


def ref_top_k(row: list[float], k: int) -> list[float]:
    if k == 0:
        return row
    kth = sorted(row, reverse=True)[k - 1]
    return [x if x >= kth else NEG for x in row]


def ref_min_p(row: list[float], m: float) -> list[float]:
    probs = torch.tensor(row).softmax(-1).tolist()
    return [x if probs[i] >= m * max(probs) else NEG for i, x in enumerate(row)]


def ref_penalties(row, context, prompt_len, rep, pres, freq):
    out = list(row)
    for t in set(context):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    generated = context[prompt_len:]
    for t in set(generated):
        out[t] -= pres + freq * generated.count(t)
    return out


def assert_rows(actual: torch.Tensor, expected: list[list[float]]):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ each filter vs its reference


def test_top_p_matches_sorted_loop(logits):
    ps = [0.1, 0.5, 0.9, 1.0]
    out = top_p_filter(logits, torch.tensor(ps))
    assert_rows(out, [ref_top_p(r, p) for r, p in zip(logits.tolist(), ps)])
    assert (out[:3] == NEG).any(dim=-1).all()  # the filter really removed something


def test_top_k_matches_sort(logits):
    ks = [0, 1, 5, 29]
    out = top_k_filter(logits, torch.tensor(ks))
    assert_rows(out, [ref_top_k(r, k) for r, k in zip(logits.tolist(), ks)])
    assert (out[1] > NEG).sum() == 1


def test_min_p_matches_loop(logits):
    ms = [0.0, 0.05, 0.3, 1.0]
    out = min_p_filter(logits, torch.tensor(ms))
    assert_rows(out, [ref_min_p(r, m) for r, m in zip(logits.tolist(), ms)])


def test_penalties_match_loop_over_history(logits):
    contexts = [[1, 2, 2, 3, 5, 5, 5], [0, 0, 7], [4], [9, 8, 9, 8, 9]]
    prompt_lens = [2, 1, 1, 0]
    rep, pres, freq = [1.3, 1.0, 2.0, 0.7], [0.5, -0.5, 0.0, 1.0], [0.2, 1.5, 0.0, -0.3]
    V = logits.shape[1]
    out = apply_penalties(
        logits,
        token_counts(contexts, [0] * 4, V),
        token_counts(contexts, prompt_lens, V),
        torch.tensor(rep),
        torch.tensor(pres),
        torch.tensor(freq),
    )
    expected = [ref_penalties(*a) for a in zip(logits.tolist(), contexts, prompt_lens, rep, pres, freq)]
    assert_rows(out, expected)


def test_logit_bias_temperature_and_bans(logits):
    out = apply_logit_bias(logits, [{3: 5.0, 4: -100.0}, {}, {0: 1.0}, {}])
    expected = logits.clone()
    expected[0, 3] += 5
    expected[0, 4] -= 100
    expected[2, 0] += 1
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        apply_temperature(logits, torch.tensor([0.5, 1.0, 0.0, 2.0])),
        logits / torch.tensor([[0.5], [1.0], [1.0], [2.0]]),
    )
    banned = ban_sequences(logits, [[1, 2, 3], [1, 2], [], [5]], [[[2, 3, 7], [9]], [[2, 3, 7]], [[4]], [[6, 1]]])
    assert banned[0, 7] == NEG and banned[0, 9] == NEG  # context ends with [2, 3]; [9] is banned outright
    assert banned[1, 7] > NEG  # context ends with [1, 2], not [2, 3]
    assert banned[2, 4] == NEG and banned[3, 1] > NEG
    assert (banned[:, :] == NEG).sum() == 3


# ------------------------------------------------------------------ the composed step


def test_greedy_is_argmax_of_processed_logits(logits):
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, logit_bias={5: 100.0}),
        SamplingParams(temperature=0, banned_sequences=[[int(logits[2].argmax())]]),
        SamplingParams(temperature=0, top_k=3),
    ]
    tokens = sample_next(logits, params, [[0]] * 4, [1] * 4, [None] * 4)
    assert tokens[0] == logits[0].argmax() and tokens[1] == 5 and tokens[3] == logits[3].argmax()
    assert tokens[2] == logits[2].topk(2).indices[1]


@pytest.mark.parametrize("shape", [(32, 8192), (9, 1000), (8, 515), (3, 2, 8192), (40, 65), (2, 50257)])
def test_fast_argmax_equals_torchs(shape):
    """First maximum on ties, NaN as the maximum, rows of -inf, a maximum in the last column, strided rows."""
    g = torch.Generator().manual_seed(0)
    for trial in range(12):
        x = torch.randn(shape, generator=g)
        rows = x.view(-1, shape[-1])
        if trial % 4 == 1:
            x = x.round()
        elif trial % 4 == 2:
            rows[::2, torch.randint(0, shape[-1], (3,), generator=g)] = float("nan")
        elif trial % 4 == 3:
            rows[0] = NEG
            rows[-1, -1] = 50.0
            rows[1 % len(rows), [3, shape[-1] // 2]] = 50.0
        assert torch.equal(argmax(x), x.argmax(-1)), trial
    strided = torch.randn(16, 2 * 8192, generator=g)[:, ::2]
    assert torch.equal(argmax(strided), strided.argmax(-1))


def test_process_logits_composes_the_stages(logits):
    p = SamplingParams(
        temperature=0.7,
        top_k=10,
        top_p=0.8,
        min_p=0.05,
        repetition_penalty=1.2,
        presence_penalty=0.3,
        frequency_penalty=0.1,
        logit_bias={2: 1.5},
    )
    ctx = [[1, 2, 2, 9]] * 4
    out = process_logits(logits, [p] * 4, ctx, [2] * 4)
    row = ref_penalties(logits[0].tolist(), ctx[0], 2, 1.2, 0.3, 0.1)
    row[2] += 1.5
    row = [x / 0.7 for x in row]
    row = ref_min_p(ref_top_p(ref_top_k(row, 10), 0.8), 0.05)
    assert_rows(out[:1], [row])


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    gen = make_generator(0)
    p = SamplingParams(temperature=1.0)
    draws = torch.stack([sample_next(logits, [p], [[0]], [1], [gen]) for _ in range(3000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.04, rtol=0)


def test_a_batch_draws_each_row_from_its_own_distribution_in_one_pass():
    """Sampled rows are drawn together (inverse transform, lmforge.infer.sampling.sample): each row's frequencies
    follow its own distribution, tokens of probability 0 never come, greedy rows in the same batch take their
    argmax."""
    probs = torch.tensor(
        [[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0, 0.9], [0.1, 0.2, 0.3, 0.4, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]
    )
    logits = torch.log(probs)
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0),
    ]
    gens = [make_generator(b) for b in range(4)]
    draws = torch.stack([sample_next(logits, params, [[0]] * 4, [1] * 4, gens) for _ in range(2000)])  # (N, 4)
    assert (draws[:, 1] == 4).all()  # greedy
    for b in (0, 2, 3):
        freq = torch.bincount(draws[:, b], minlength=5).float() / len(draws)
        torch.testing.assert_close(freq, probs[b], atol=0.04, rtol=0)
        assert (freq[probs[b] == 0] == 0).all()


def test_top_p_and_top_k_on_long_rows_match_the_loops():
    """The vocabulary-sized rows the engine filters (values sorted by numpy), against the one-row references."""
    torch.manual_seed(1)
    rows = torch.randn(3, 3000) * 2
    ps, ks = [0.3, 0.9, 0.99], [1, 50, 2999]
    assert_rows(top_p_filter(rows, torch.tensor(ps)), [ref_top_p(r, p) for r, p in zip(rows.tolist(), ps)])
    assert_rows(top_k_filter(rows, torch.tensor(ks)), [ref_top_k(r, k) for r, k in zip(rows.tolist(), ks)])


def test_same_seed_same_samples_whatever_the_batch(logits):
    p = SamplingParams(temperature=1.0, seed=123)
    others = [SamplingParams(temperature=1.5, seed=s) for s in range(3)]

    def run(batch_params, row):  # p's row always holds logits[0]; the other rows hold other logits
        gens = [make_generator(q.seed) for q in batch_params]
        batch = torch.roll(logits[: len(batch_params)], row, dims=0)
        return [
            int(sample_next(batch, batch_params, [[0]] * len(batch_params), [1] * len(batch_params), gens)[row])
            for _ in range(20)
        ]

    alone = run([p], 0)
    assert run([others[0], p, others[1]], 1) == alone
    assert run([p] + others, 0) == alone
    assert len(set(alone)) > 1  # it really sampled
    assert make_generator(5, 0).initial_seed() != make_generator(5, 1).initial_seed()


def test_logprobs_are_raw_log_softmax(logits):
    tokens = torch.tensor([0, 3, 7, 1])
    out = token_logprobs(logits, tokens, [2, None, 0, 5])
    ref = torch.log_softmax(logits, -1)
    assert out[1] is None and out[2].top == {}
    assert out[0].logprob == pytest.approx(ref[0, 0].item(), abs=1e-6)
    assert list(out[3].top) == ref[3].topk(5).indices.tolist()
    assert list(out[3].top.values()) == pytest.approx(ref[3].topk(5).values.tolist(), abs=1e-6)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "setting, value",
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("temperature", -0.1),
        ("top_k", -1),
        ("min_p", 1.1),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("n", 0),
        ("logprobs", 21),
        ("logit_bias", {1: 200.0}),
        ("banned_sequences", [[]]),
        ("stop", [""]),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", 1e300),
        ("top_p", float("nan")),
        ("repetition_penalty", 1e-40),
        ("repetition_penalty", 1e40),
        ("repetition_penalty", float("nan")),
        ("min_p", float("nan")),
        ("presence_penalty", float("nan")),
        ("logit_bias", {1: float("nan")}),
    ],
)
def test_bad_settings_name_the_setting(setting, value):
    with pytest.raises(SamplingError, match=setting) as err:
        SamplingParams(**{setting: value})
    assert isinstance(err.value, ValueError) and err.value.param == setting


def test_extreme_settings_that_can_be_honoured_are_their_limits(logits):
    """A top_k beyond any int64 keeps every token, as top_k 0 does; a temperature too small to divide by is
    greedy; the range ends of the repetition penalty keep the logits finite."""
    contexts, lens = [[1, 2, 3]] * logits.shape[0], [1] * logits.shape[0]
    huge = process_logits(logits, [SamplingParams(top_k=2**64, temperature=0.7)] * len(contexts), contexts, lens)
    torch.testing.assert_close(
        huge, process_logits(logits, [SamplingParams(temperature=0.7)] * len(contexts), contexts, lens)
    )
    tiny = SamplingParams(temperature=1e-40)
    assert tiny.greedy and not SamplingParams(temperature=1e-5).greedy
    generators = [torch.Generator().manual_seed(b) for b in range(len(contexts))]
    assert (
        sample_next(logits, [tiny] * len(contexts), contexts, lens, generators).tolist() == logits.argmax(-1).tolist()
    )
    for r in REPETITION_PENALTY_RANGE:
        out = process_logits(
            logits * 1e4, [SamplingParams(repetition_penalty=r, temperature=1e-5)] * len(contexts), contexts, lens
        )
        assert torch.isfinite(out).all()


def test_vocab_check_names_the_token():
    with pytest.raises(SamplingError, match="logit_bias.*99.*0..49"):
        SamplingParams(logit_bias={99: 1.0}).check_vocab(50)
    with pytest.raises(SamplingError, match="logprobs") as err:
        SamplingParams(logprobs=20).check_vocab(12)
    assert err.value.param == "logprobs"


# ------------------------------------------------------------------ stop strings


def feed(stop, pieces, final=True):
    s, full, deltas = StopStrings(stop), "", []
    for i, piece in enumerate(pieces):
        full += piece
        deltas.append(s.update(full, final=final and i == len(pieces) - 1))
        if s.stopped:
            break
    return deltas, s


def test_stop_string_split_across_tokens_truncates_before_it():
    deltas, s = feed(["\n\n", "END"], ["Hello", " E", "N", "D and more"])
    assert "".join(deltas) == "Hello " and s.stopped and s.text == "Hello "
    assert deltas[1] == " "  # "E" held back: it may start "END"
    deltas, s = feed(["END"], ["ab", " EN", "x"])
    assert "".join(deltas) == "ab ENx" and not s.stopped  # held-back text released once it can't match


def test_incomplete_character_is_held_back():
    s = StopStrings([])
    assert s.update("caf") == "caf"
    assert s.update("caf\ufffd") == ""  # half of a two-byte character decodes to U+FFFD: wait for the rest
    assert s.update("café") == "é"
