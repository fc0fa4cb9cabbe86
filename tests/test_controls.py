"""Bias and safety controls (lmforge.infer.controls) in generate, the engine and a real server.

The model under test is built by hand to strongly prefer a banned phrase: a bigram model (every block's output
projection zeroed, so the last hidden state is the current token's embedding) whose output head walks the cycle
'c' -> 'a' -> 't' -> ' ' -> 'c' over single-byte tokens, by margins of ~16 nats. Its favourite text " cat cat"
is not spelled with the BPE's canonical tokenization of "cat", so a token-level ban misses it; the text-level
guard must not. Fire counts are checked against a naive greedy loop that recomputes the whole sequence each step.
"""

import json

import httpx
import openai
import pytest
import torch

from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.engine.engine import Engine
from lmforge.infer.controls import Controls, ControlsError, ControlSpec, load_controls
from lmforge.infer.generate import continuation_text, generate
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.serve.process import start_server, stop_server
from lmforge.tokenizer import train_tokenizer

CORPUS = ["the cat sat on the mat. a cat is a cat.\n"] * 50 + ["hello world, how are you?\n"] * 50
CYCLE = ["c", "a", "t", " "]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", CORPUS, 300)


def byte_id(tok, ch: str) -> int:
    return next(i for i in range(tok.vocab_size) if tok.decode([i]) == ch)


def cycle_model(tok, cycle=CYCLE, margin: float = 1.0) -> Transformer:
    """A bigram model: any token -> cycle[0], cycle[i] -> cycle[i + 1] (wrapping), EOS never."""
    C = 16
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=C, bias=True, tie_embeddings=False
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    ids = [byte_id(tok, ch) if len(ch) == 1 else tok.encode(ch)[0] for ch in cycle]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.norm_f):
            norm.weight.fill_(1.0)
        emb = torch.zeros(tok.vocab_size, C)
        emb[:, 0] = 1.0  # every token not in the cycle is state 0
        for i, t in enumerate(ids):
            emb[t] = 0.0
            emb[t, i + 1] = 1.0
        model.tok_emb.weight.copy_(emb)
        ln = torch.nn.functional.layer_norm(torch.eye(C), (C,))  # what norm_f makes of each state
        model.lm_head.weight[ids[0]] = margin * ln[0]
        for i in range(len(ids)):  # logit of the next token: ~16 x margin; of the others: 0 or ~-1 x margin
            model.lm_head.weight[ids[(i + 1) % len(ids)]] += margin * ln[i + 1]
        model.lm_head.bias[tok.eos_id] = -50.0
    return model


def controls_for(tok, banned=(), bias=None, ignore_case=False) -> Controls:
    return Controls(ControlSpec(list(banned), dict(bias or {}), ignore_case).check("test"), tok, tok.vocab_size)


def run(model, tok, prompt: str, params: SamplingParams, controls: Controls | None = None):
    guard = controls.attach(params) if controls else None
    c = generate(model, [tok.encode(prompt)], params, tokenizer=tok)[0]
    return c, guard


# ---------------------------------------------------------------------------------- the model prefers the phrase


def test_the_model_prefers_the_phrase_and_a_token_ban_misses_it(tok):
    model = cycle_model(tok)
    c, _ = run(model, tok, "the", SamplingParams(max_tokens=12, temperature=0))
    assert c.text.startswith("cat cat cat")
    canonical = tok.encode("cat")
    assert canonical != [byte_id(tok, ch) for ch in "cat"]  # the model spells it another way
    c, _ = run(model, tok, "the", SamplingParams(max_tokens=12, temperature=0, banned_sequences=[canonical]))
    assert "cat" in c.text  # so a token-level ban on the canonical tokenization does not stop it


@pytest.mark.parametrize("phrase", ["cat", "t c", "at ca", "CAT"])
def test_banned_phrases_never_appear_greedy_and_sampled(tok, phrase):
    model = cycle_model(tok)
    ignore_case = phrase.isupper()
    controls = controls_for(tok, [phrase], ignore_case=ignore_case)
    outputs = []
    for seed in [None, 0, 1, 2, 3]:
        params = SamplingParams(max_tokens=24, temperature=0 if seed is None else 1.0, seed=seed, n=2)
        guard = controls.attach(params)
        for c in generate(model, [tok.encode("the"), tok.encode("a cat")], params, tokenizer=tok):
            text, needle = (c.text.lower(), phrase.lower()) if ignore_case else (c.text, phrase)
            assert needle not in text, (seed, c.text)
            outputs.append(c.text)
        assert guard.counts()["banned_phrases"][phrase] > 0  # the model kept trying
    assert any(len(o) >= 20 for o in outputs)  # the outputs went on rather than ending at the first refusal


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_path_applies_the_guard(tok, speculative):
    """With a draft model (here the model itself, which proposes "cat" every time) guarded rows do not speculate."""
    model = cycle_model(tok)
    controls = controls_for(tok, ["cat"])
    engine = Engine(model, tok, max_num_seqs=4, draft=cycle_model(tok) if speculative else None)
    params = [SamplingParams(max_tokens=20, temperature=t, seed=s) for t, s in ((0, None), (1.0, 7), (0.7, 8))]
    guards = [controls.attach(p) for p in params]
    for c in engine.generate([tok.encode("the")] * 3, params):
        assert "cat" not in c.text and "cat" not in tok.decode(c.tokens)
    assert all(g.counts()["banned_phrases"]["cat"] > 0 for g in guards)


def test_phrase_inside_merged_tokens(tok):
    """A cycle over multi-character BPE tokens: the banned phrase starts inside one token and ends inside another."""
    cycle = [" the", " cat"]
    if any(len(tok.encode(t)) != 1 for t in cycle):
        pytest.skip("the trained BPE does not hold the merged tokens this test walks")
    model = cycle_model(tok, cycle)
    c, _ = run(model, tok, "on", SamplingParams(max_tokens=12, temperature=0))
    assert c.text.startswith(" the cat the cat")
    for seed in (None, 0, 1):
        params = SamplingParams(max_tokens=12, temperature=0 if seed is None else 1.0, seed=seed)
        c, guard = run(model, tok, "on", params, controls_for(tok, ["e c"]))
        assert "e c" not in c.text and guard.counts()["banned_phrases"]["e c"] > 0


# ---------------------------------------------------------------------------------- fire counts


def naive_greedy(model, tok, prompt: list[int], steps: int, phrases: list[str], bias: dict[int, float]):
    """Greedy decoding with a full forward per step: the first token in logit order whose text adds no banned
    phrase; returns (tokens, fires per phrase, steps where the bias changed the argmax)."""
    out, fires, changed = [], {p: 0 for p in phrases}, []
    vec = torch.zeros(tok.vocab_size)
    for t, b in bias.items():
        vec[t] = b
    for _ in range(steps):
        raw = model(torch.tensor([prompt + out]))[0, -1].float()
        changed.append((int(raw.argmax()), int((raw + vec).argmax())))
        for t in (raw + vec).sort(descending=True, stable=True).indices.tolist():  # ties: lowest id first, as argmax
            before = continuation_text(tok, prompt, out)
            after = continuation_text(tok, prompt, out + [t])
            bad = [p for p in phrases if after.count(p) > before.count(p)]
            for p in bad:
                fires[p] += 1
            if not bad:
                out.append(t)
                break
    return out, fires, changed


@pytest.mark.parametrize(
    "last, banned, bias",
    [(None, ["cat", "t c"], {"hello": 3.0, "mat": -2.0}), ("c", ["at ", "cat"], {"hello": 15.5, "cat": 1.0})],
)
def test_fire_counts_match_a_naive_loop(tok, last, banned, bias):
    """Bias 15.5 lies between the model's margins to 'c' (~14.9) and to 'a' and 't' (16): from a prompt ending in
    'c' the model writes 'at' unchanged by it, is refused ' ' and goes off the cycle, where the bias then changes
    the argmax at every step."""
    model = cycle_model(tok)
    controls = controls_for(tok, banned, bias)
    prompt = tok.encode("the") + ([byte_id(tok, last)] if last else [])
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    guard = controls.attach(params)
    c = generate(model, [prompt], params, tokenizer=tok)[0]
    with torch.no_grad():
        tokens, fires, changed = naive_greedy(model, tok, prompt, 16, banned, controls.token_bias)
    assert c.tokens == tokens
    assert guard.counts()["banned_phrases"] == fires
    expected = dict.fromkeys(bias, 0)
    for top, biased in changed:
        if top != biased:
            for word in dict.fromkeys(controls.token_words.get(top, []) + controls.token_words.get(biased, [])):
                expected[word] += 1
    assert guard.counts()["logit_bias"] == expected
    assert guard.counts()["banned_phrases"][banned[0]] > 0
    assert sum(expected.values()) == 0 if last is None else 0 < expected["hello"] < len(changed)


def test_logit_bias_covers_every_tokenization_of_the_word(tok):
    controls = controls_for(tok, bias={"cat": -100})
    ids = set(tok.encode("cat")) | set(tok.encode(" cat"))
    assert set(controls.word_tokens["cat"]) == {t for t in ids if tok.decode([t]).strip()}
    model = cycle_model(tok, [" cat", " sat"] if len(tok.encode(" cat")) == 1 else CYCLE)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    controls.attach(params)
    c = generate(model, [tok.encode("the")], params, tokenizer=tok)[0]
    assert not set(c.tokens) & set(controls.word_tokens["cat"])


def test_stop_tokens_pass_the_guard(tok):
    """EOS decodes to '<|endoftext|>', which holds 'end'; banning 'end' must not forbid ending."""
    controls = controls_for(tok, ["end"])
    guard = controls.attach(SamplingParams())
    assert not guard.rejects(tok.encode("hello"), 1, tok.eos_id)
    assert guard.rejects(tok.encode("hello"), 1, tok.encode("end")[0]) or len(tok.encode("end")) > 1


def test_dead_end_ends_the_output(tok):
    """When no token can follow without completing a banned phrase, the output ends (EOS) instead of leaking."""
    model = cycle_model(tok)
    words = sorted({tok.decode([t]) for t in range(tok.vocab_size) if t != tok.eos_id})
    params = SamplingParams(max_tokens=5, temperature=0)
    controls_for(tok, [w for w in words if w]).attach(params)
    c = generate(model, [tok.encode("the")], params, tokenizer=tok)[0]
    assert c.tokens == [] and c.finish_reason == "stop"


# ---------------------------------------------------------------------------------- files


def test_json_and_text_files_say_the_same(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(
        json.dumps(
            {"banned_phrases": ["darn", " heck"], "logit_bias": {"cat": 5, "big dog": -2.5}, "ignore_case": True}
        )
    )
    t = tmp_path / "c.txt"
    t.write_text('# controls\n\nban: darn\nban: " heck"\nbias: 5 cat\nbias: -2.5 big dog\nignore_case: true\n')
    assert load_controls(j) == load_controls(t) == ControlSpec(["darn", " heck"], {"cat": 5, "big dog": -2.5}, True)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.json", "{not json", "is not valid JSON"),
        ("c.json", "[1, 2]", "must hold a JSON object"),
        ("c.json", '{"banned": ["x"]}', "unknown keys ['banned']"),
        ("c.json", '{"banned_phrases": "x"}', "banned_phrases must be a list"),
        ("c.json", '{"banned_phrases": [""]}', "must be a non-empty string"),
        ("c.json", '{"logit_bias": {"cat": 500}}', "it must be a number in [-100, 100]"),
        ("c.json", '{"logit_bias": {"cat": "high"}}', "it must be a number"),
        ("c.json", "{}", "holds no controls"),
        ("c.txt", "ban: ok\nbanned: x\n", "line 2: expected 'ban: PHRASE'"),
        ("c.txt", "bias: lots cat\n", "line 1: 'bias:' needs a number then a word"),
        ("c.txt", 'ban: "open\n', "line 1: '\"open' starts with a quote but is not a JSON string"),
        ("c.txt", "ignore_case: maybe\n", "ignore_case must be true or false"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ControlsError) as e:
        load_controls(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_missing_file_and_unknown_words(tmp_path):
    with pytest.raises(ControlsError, match="does not exist"):
        load_controls(tmp_path / "nope.json")
    words = train_tokenizer("word", ["the cat sat"])
    with pytest.raises(ControlsError, match="'zebra' is not in the tokenizer's vocabulary"):
        Controls(ControlSpec([], {"zebra": 1.0}), words, words.vocab_size)


# ---------------------------------------------------------------------------------- the CLI and the server


def test_generate_command_reports_fires(tok, tmp_path, capsys):
    from lmforge.apps.generate import generate_command

    folder = tmp_path / "cyc"
    save_model(folder, cycle_model(tok), tok)
    controls = tmp_path / "controls.txt"
    controls.write_text("ban: cat\nbias: 2 hello\n")
    generate_command(str(folder), prompt="the", max_tokens=12, temperature=0, controls=str(controls))
    out, err = capsys.readouterr()
    assert "cat" not in out
    report = json.loads(err.strip().splitlines()[-1])
    assert report["controls"]["banned_phrases"]["cat"] > 0 and "hello" in report["controls"]["logit_bias"]


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("controls_serve")
    save_model(root / "cyc", cycle_model(tok), tok)
    (root / "controls.json").write_text(json.dumps({"banned_phrases": ["at "], "logit_bias": {"hello": 15.5}}))
    proc, base = start_server(str(root / "cyc"), "--log-level", "warning", "--controls", str(root / "controls.json"))
    yield base
    assert stop_server(proc) in (0, -15)


def _fired(base: str) -> dict[tuple[str, str], float]:
    metrics = httpx.get(base + "/metrics").text
    out = {}
    for line in metrics.splitlines():
        if line.startswith("lmforge_control_fired_total{"):
            labels, value = line[len("lmforge_control_fired_total{") :].split("} ")
            d = dict(kv.split("=", 1) for kv in labels.split(","))
            out[(d["kind"].strip('"'), d["control"].strip('"'))] = float(value)
    return out


def test_server_applies_controls_and_counts_them(server, tok):
    """From a prompt ending in 'c' the model writes 'at', is refused ' ' (banned "at ") and goes off its cycle,
    where the +15.5 on "hello" changes its argmax at every step (see test_fire_counts_match_a_naive_loop)."""
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    key = [("banned_phrase", "at "), ("logit_bias", "hello")]
    before = [_fired(server).get(k, 0.0) for k in key]
    r = client.completions.create(
        model="cyc", prompt=tok.encode("the") + [byte_id(tok, "c")], max_tokens=16, temperature=0
    )
    assert r.choices[0].text.startswith("athello") and "at " not in r.choices[0].text
    fired = r.model_extra["lmforge"]["controls"]
    assert fired["banned_phrases"]["at "] == 1 and fired["logit_bias"]["hello"] > 0
    chat = client.chat.completions.create(
        model="cyc", messages=[{"role": "user", "content": "the"}], max_tokens=16, temperature=1.0, seed=3
    )
    chat_fired = chat.model_extra["lmforge"]["controls"]
    pieces, streamed = [], None
    stream = client.chat.completions.create(
        model="cyc", messages=[{"role": "user", "content": "the"}], max_tokens=16, temperature=0, stream=True
    )
    for chunk in stream:
        pieces += [c.delta.content or "" for c in chunk.choices]
        if chunk.choices and chunk.choices[0].finish_reason:
            streamed = chunk.model_extra["lmforge"]["controls"]  # the finish chunk carries the counts
    after = _fired(server)
    for (kind, name), b in zip(key, before):
        group = "banned_phrases" if kind == "banned_phrase" else "logit_bias"
        assert after[(kind, name)] - b == sum(f[group][name] for f in (fired, chat_fired, streamed))


def test_chat_repl_applies_controls_and_reports_them(tok, tmp_path):
    import io

    from lmforge.serve.chat import ChatSession, ChatSettings, LocalBackend

    folder = tmp_path / "cyc"
    save_model(folder, cycle_model(tok), tok)
    controls = tmp_path / "controls.txt"
    controls.write_text("ban: cat\n")
    out = io.StringIO()
    backend = LocalBackend(str(folder), controls=str(controls))
    ChatSession(backend, settings=ChatSettings(temperature=0, max_tokens=12), out=out).run(
        io.StringIO("the\n/controls\n")
    )
    answer = next(line for line in out.getvalue().splitlines() if line.startswith("assistant> "))
    assert "cat" not in answer and "ca" in answer  # the model kept starting it
    report = json.loads(out.getvalue().splitlines()[-1])
    assert report["banned_phrases"]["cat"] == backend.control_counts["banned_phrases"]["cat"] > 0


def test_unsupported_combinations_are_refused(tmp_path):
    from lmforge.apps.generate import generate_command
    from lmforge.serve.chat import ChatError, chat_command

    controls = tmp_path / "c.txt"
    controls.write_text("ban: cat\n")
    with pytest.raises(ControlsError, match="not with --draft, --speculative or --beam-width"):
        generate_command("gpt2", prompt="x", beam_width=2, controls=str(controls))
    with pytest.raises(ChatError, match="lmforge serve --controls FILE"):
        chat_command(url="http://127.0.0.1:9", controls=str(controls))
    with pytest.raises(ControlsError, match="need the model's tokenizer"):
        Controls(load_controls(controls), None, 10)


def test_a_requests_own_banned_phrase_holds_on_the_text_and_stays_out_of_metrics(server, tok):
    # The server's +15.5 bias pushes "hello"; the request bans "hel", a piece of that word.
    import httpx

    prompt = tok.encode("the") + [byte_id(tok, "c")]
    before = _fired(server)
    r = httpx.post(
        server + "/v1/completions",
        json={"model": "cyc", "prompt": prompt, "max_tokens": 16, "temperature": 0, "banned_phrases": ["hel"]},
    ).json()
    text = r["choices"][0]["text"]
    assert "hel" not in text and r["lmforge"]["controls"]["banned_phrases"]["hel"] > 0
    assert not any(name == "hel" for _, name in _fired(server)) and _fired(server) != before  # operator's still count
