"""Generation against plain references: the uncached model, each prompt alone, brute-force search, log_softmax."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.infer.generate import beam_search, generate, stream
from lmforge.infer.sampling import SamplingParams
from lmforge.model import KVCache, Transformer
from lmforge.tokenizer import CharTokenizer

VOCAB = "".join(sorted("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"))  # 50 characters, one id each


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=50, n_layer=2)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init, so greedy paths wander instead of repeating
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(list(VOCAB))


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def uncached_greedy(model, prompt, n):
    """The reference: rerun the whole sequence through the model without a cache for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_cached_greedy_equals_uncached(model):
    outs = generate(model, PROMPTS, GREEDY)
    for prompt, c in zip(PROMPTS, outs):
        assert c.tokens == uncached_greedy(model, prompt, 12)
        assert c.finish_reason == "length"
    assert len({tuple(c.tokens) for c in outs}) == len(PROMPTS)  # the model does not just repeat itself


def test_batched_equals_each_alone_with_per_row_settings(model, tok):
    alone_outputs = [generate(model, [p], GREEDY, tokenizer=tok)[0] for p in PROMPTS]
    params = [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=3, temperature=0),  # finishes early and leaves the batch
        SamplingParams(max_tokens=12, temperature=0, stop=[alone_outputs[2].text[4:6]]),
        SamplingParams(max_tokens=7, temperature=0, stop_token_ids=[alone_outputs[3].tokens[5]]),
    ]
    batched = generate(model, PROMPTS, params, tokenizer=tok)
    assert batched[0].tokens == alone_outputs[0].tokens
    assert batched[1].tokens == alone_outputs[1].tokens[:3] and batched[1].finish_reason == "length"
    stop = params[2].stop[0]
    assert batched[2].text == alone_outputs[2].text[: alone_outputs[2].text.index(stop)]
    assert batched[2].finish_reason == "stop"
    cut = alone_outputs[3].tokens.index(params[3].stop_token_ids[0])
    assert batched[3].tokens == alone_outputs[3].tokens[:cut] and batched[3].finish_reason == "stop"
    for prompt, p, c in zip(PROMPTS, params, batched):  # each alone with its own settings gives the same again
        alone = generate(model, [prompt], p, tokenizer=tok)[0]
        assert (alone.tokens, alone.text, alone.finish_reason) == (c.tokens, c.text, c.finish_reason)


def test_stream_yields_text_deltas_that_add_up(model, tok):
    params = SamplingParams(max_tokens=10, temperature=0)
    events = list(stream(model, [PROMPTS[0], PROMPTS[1]], params, tokenizer=tok))
    for row in (0, 1):
        mine = [e for e in events if e.row == row]
        assert len(mine) == 10 and mine[-1].finish_reason == "length"
        assert "".join(e.text for e in mine) == tok.decode([e.token for e in mine])


def test_same_seed_same_sample_whatever_else_is_in_the_batch(model):
    p = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=7)
    alone = generate(model, [PROMPTS[1]], p)[0].tokens
    others = [SamplingParams(max_tokens=5, temperature=0.8, seed=1), SamplingParams(max_tokens=20, temperature=1.2)]
    batched = generate(model, [PROMPTS[0], PROMPTS[1], PROMPTS[3]], [others[0], p, others[1]])
    assert batched[1].tokens == alone
    other_seed = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=8)
    assert generate(model, [PROMPTS[1]], other_seed)[0].tokens != alone


def test_n_samples_share_the_prompt_and_differ(model):
    p = SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=3)
    outs = generate(model, [PROMPTS[0], PROMPTS[2]], p)
    assert [(c.prompt_index, c.sample_index) for c in outs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(c.tokens) for c in outs[:3]}) == 3
    single = SamplingParams(max_tokens=10, temperature=1.0, seed=3)
    assert outs[0].tokens == generate(model, [PROMPTS[0]], single)[0].tokens


def test_logprobs_equal_log_softmax_of_the_model(model):
    p = SamplingParams(max_tokens=6, temperature=0.9, seed=0, logprobs=3)
    c = generate(model, [PROMPTS[1]], p)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPTS[1] + c.tokens]))[0], -1)  # (T, V)
    start = len(PROMPTS[1]) - 1
    for i, (token, lp) in enumerate(zip(c.tokens, c.logprobs)):
        assert lp.token == token
        assert lp.logprob == pytest.approx(ref[start + i, token].item(), abs=1e-4)
        assert list(lp.top) == ref[start + i].topk(3).indices.tolist()


def test_banned_sequence_never_appears_even_when_preferred(model):
    favourite = 17
    biased = SamplingParams(max_tokens=12, temperature=0, logit_bias={favourite: 100.0})
    assert generate(model, [PROMPTS[0]], biased)[0].tokens == [favourite] * 12  # the model now wants it always
    banned = SamplingParams(
        max_tokens=12,
        temperature=0,
        logit_bias={favourite: 100.0},
        banned_sequences=[[favourite, favourite], [3, favourite]],
    )
    out = PROMPTS[0] + generate(model, [PROMPTS[0]], banned)[0].tokens
    pairs = list(zip(out, out[1:]))
    assert (favourite, favourite) not in pairs and (3, favourite) not in pairs
    assert out[3:].count(favourite) >= 5  # it still takes the favourite whenever allowed


def test_prompt_too_long_names_the_context(model):
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1] * 60], SamplingParams(max_tokens=10))


def test_stop_strings_need_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1]], SamplingParams(stop=["x"]))


# ------------------------------------------------------------------ beam search


class TableModel(nn.Module):
    """A model whose next-token log-probabilities depend only on the last token: table[last] (V, V)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = ModelConfig.from_name("gpt-nano", vocab_size=table.shape[0], n_layer=1)
        self.table = nn.Parameter(table, requires_grad=False)

    def new_cache(self, batch_size, max_len=None, pad=None):
        return KVCache(self.config, batch_size, max_len, pad=pad)

    def hidden(self, tokens, positions=None, kv_cache=None):
        kv_cache.advance(tokens.shape[1])
        return F.one_hot(tokens, self.table.shape[0]).float()

    def logits(self, h):
        return h @ self.table

    def forward(self, tokens, positions=None, kv_cache=None):
        return self.logits(self.hidden(tokens, positions, kv_cache))


def test_beam_finds_a_better_sequence_than_greedy():
    p = torch.full((5, 5), 1e-3)
    p[0, 1], p[0, 2] = 0.6, 0.4  # greedy takes 1 ...
    p[1] = 0.2  # ... after which every token is unlikely,
    p[2, 3] = 0.97  # while 2 leads to a near-certain 3
    logp = torch.log(p / p.sum(-1, keepdim=True))
    m = TableModel(logp)
    greedy = generate(m, [[0]], SamplingParams(max_tokens=2, temperature=0, logprobs=0))[0]
    greedy_score = sum(lp.logprob for lp in greedy.logprobs)
    (tokens, score), *_ = beam_search(m, [0], beam_width=2, max_tokens=2, length_penalty=0.0)
    assert greedy.tokens[0] == 1 and tokens == [2, 3]
    assert score == pytest.approx(float(logp[0, 2] + logp[2, 3]), abs=1e-5) and score > greedy_score


def test_beam_width_one_is_greedy(model):
    for prompt in PROMPTS[:2]:
        ((tokens, _),) = beam_search(model, prompt, beam_width=1, max_tokens=10)
        assert tokens == generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0))[0].tokens


def test_full_width_beam_is_exhaustive_search(model):
    prompt, V = PROMPTS[0], model.config.vocab_size
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
        second = torch.log_softmax(model(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], -1)  # (V, V)
    best = max(itertools.product(range(V), range(V)), key=lambda ab: first[ab[0]] + second[ab[0], ab[1]])
    results = beam_search(model, prompt, beam_width=V, max_tokens=2, length_penalty=0.0)
    assert results[0][0] == list(best)
    assert results[0][1] == pytest.approx(float(first[best[0]] + second[best]), abs=1e-4)
    assert [s for _, s in results] == sorted((s for _, s in results), reverse=True)


def test_beam_stops_at_eos(model):
    prompt = PROMPTS[0]
    eos = generate(model, [prompt], SamplingParams(max_tokens=3, temperature=0))[0].tokens[2]
    results = beam_search(model, prompt, beam_width=1, max_tokens=10, eos_id=eos)
    assert results[0][0] == uncached_greedy(model, prompt, 2)


def test_beam_stops_at_any_of_several_end_tokens(model):
    """A model with several end tokens (Llama 3's generation_config.json, llama2.c's BOS) ends a beam at any."""
    prompt = PROMPTS[0]
    greedy = uncached_greedy(model, prompt, 6)
    k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])  # its first time
    unused = next(t for t in range(model.config.vocab_size) if t not in greedy)
    results = beam_search(model, prompt, beam_width=1, max_tokens=10, eos_id=[unused, greedy[k]])
    assert results[0][0] == greedy[:k]


# ------------------------------------------------------------------ the command


def test_generate_help_lists_the_settings(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--top-p", "--temperature", "--stop", "--beam-width", "--batch-file", "--no-stream"):
        assert flag in help_text


def test_generate_command_end_to_end(model, tok, tmp_path, capsys):
    from lmforge.checkpoint import save_model
    from lmforge.cli import main

    save_model(tmp_path / "m", model, tok)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "bcd", "--temperature", "0", "--max-tokens", "8"]) == 0
    expected = tok.decode(generate(model, [tok.encode("bcd")], SamplingParams(max_tokens=8, temperature=0))[0].tokens)
    assert capsys.readouterr().out == expected + "\n"
    (tmp_path / "prompts.txt").write_text("bcd\nefgh\n")
    assert (
        main(
            [
                "generate",
                str(tmp_path / "m"),
                "--batch-file",
                str(tmp_path / "prompts.txt"),
                "--temperature",
                "0",
                "--max-tokens",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.index(expected) > out.index("prompt 0") and "prompt 1" in out
    assert main(["generate", str(tmp_path / "m"), "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err


def test_bench_command_prints_a_line_per_case_and_a_summary(capsys):
    import json

    from lmforge.apps.bench import bench_command

    assert bench_command("gpt-nano", batch_sizes=[1, 2], prompt_len=4, new_tokens=3, repeats=1) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(c["batch"], c["dtype"]) for c in lines[:2]] == [(1, "float32"), (2, "float32")]
    assert all(c["decode_tok_s"] > 0 and c["prefill_tok_s"] > 0 for c in lines[:2])
    assert lines[0]["decode_path"] in ("fused", "packed")  # fused where the extension builds
    assert lines[2]["summary"] and lines[2]["cases"] == 2
    with pytest.raises(ValueError, match="batch_sizes"):
        bench_command("gpt-nano", batch_sizes=[0])


def test_generate_command_draft_and_quantize(model, tok, tmp_path, capsys):
    """--draft (speculative decoding) prints the same greedy text as plain decoding; --quantize int8 and int4 run."""
    from lmforge.checkpoint import save_model
    from lmforge.cli import main

    save_model(tmp_path / "m", model, tok)
    argv = [
        "generate",
        str(tmp_path / "m"),
        "--prompt",
        "bcd",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--no-stream",
    ]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--draft", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "acceptance_rate" in captured.err
    assert main(argv + ["--speculative", "ngram", "--num-speculative-tokens", "3"]) == 0  # prompt lookup
    captured = capsys.readouterr()
    assert captured.out == plain and "acceptance_rate" in captured.err
    assert main(argv + ["--speculative", "ngram", "--draft", str(tmp_path / "m")]) == 1
    assert "--speculative" in capsys.readouterr().err
    for mode in ("int8", "int4"):
        assert main(argv + ["--quantize", mode]) == 0
        assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit):  # argparse rejects the choice, naming the allowed ones
        main(argv + ["--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
