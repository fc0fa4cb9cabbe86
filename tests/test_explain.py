"""`lmforge explain`: the numbers it writes are the model's own.

For tiny random models of each family (GPT-2, Llama with RoPE and grouped-query attention, the classic "seed"
model), the command runs on a saved model folder; the test then reloads the folder and checks
- every token's probability and surprisal, in explain.json and in tokens.html, against the softmax of the
  model's logits at the previous position;
- the attention weights: rows are causal distributions, and weights @ V, through the output projection, equal
  the output of the model's own attention (scaled_dot_product_attention) captured from a forward hook;
- one PNG per layer, a standalone HTML page (no external references).
"""

import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from lmforge.apps.explain import explain_command, forward_with_attention
from lmforge.checkpoint import load_model, save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import load_tokenizer, train_tokenizer

CORPUS = ["the cat sat on the mat. the dog ate the bone.\n"] * 40 + ["hello world, how are you?\n"] * 40
TEXT = "the cat ate the mat, hello"

FAMILIES = {
    "gpt2": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "llama": dict(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        block_size=64,
        norm="rmsnorm",
        mlp="swiglu",
        pos="rope",
        bias=False,
        tie_embeddings=False,
        multiple_of=16,
    ),
    "seed": dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        intermediate_size=32,
        block_size=64,
        norm_placement="post",
        mlp="relu",
        pos="sinusoidal",
        tie_embeddings=False,
        embed_scale=True,
        final_norm=False,
        dropout=0.2,
        init="seed",
    ),
    # Gemma 2/3's pieces: a window of 4 on the first layer (with its own RoPE base), soft-capped scores at their own
    # scale, per-head q/k norms, heads wider than n_embd / n_head, sandwich norms, GeGLU.
    "gemma": dict(
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        head_size=12,
        block_size=64,
        norm="rmsnorm",
        mlp="geglu_tanh",
        pos="rope",
        bias=False,
        norm_placement="sandwich",
        embed_scale=True,
        qk_norm="head",
        attn_scale=0.3,
        attn_softcap=3.0,
        logit_softcap=5.0,
        sliding_window=4,
        window_layers=[0],
        rope_local_base=100.0,
        multiple_of=16,
    ),
}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("bpe", CORPUS, 300)


def model_folder(tmp_path, tok, family):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **FAMILIES[family])
    model = Transformer(cfg)
    with torch.no_grad():  # sharper attention than a fresh init, so that the checks see non-uniform weights
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    folder = tmp_path / family
    save_model(folder, model, tok)
    return folder


class Spans(HTMLParser):
    """Collects the data-* attributes of the token spans and every src/href (there must be none)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.tokens.append(a)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_explain_writes_the_models_own_numbers(tmp_path, tok, family, capsys):
    folder = model_folder(tmp_path, tok, family)
    out = tmp_path / "out"
    assert explain_command(str(folder), text=TEXT, out=str(out), top_k=3) == 0
    terminal = capsys.readouterr().out
    assert "mean surprisal" in terminal and "hello" in terminal

    result = json.loads((out / "explain.json").read_text())
    model = load_model(folder)[0].eval()
    ids = [tok.eos_id] + tok.encode(TEXT)  # this BPE has no BOS, so its EOS starts the text
    assert [t["id"] for t in result["tokens"]] == ids and result["bos"]
    with torch.no_grad():
        probs = model(torch.tensor([ids]))[0].softmax(-1)
    expected = [float(probs[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert result["tokens"][0]["prob"] is None
    got = [t["prob"] for t in result["tokens"][1:]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        [t["surprisal_bits"] for t in result["tokens"][1:]], [-math.log2(p) for p in expected], rtol=1e-4
    )
    for t, info in enumerate(result["tokens"][1:], 1):
        best = probs[t - 1].topk(3)
        assert [a["id"] for a in info["top"]] == best.indices.tolist()
        np.testing.assert_allclose([a["prob"] for a in info["top"]], best.values.tolist(), rtol=1e-4)

    page = (out / "tokens.html").read_text()
    spans = Spans()
    spans.feed(page)
    assert not spans.links  # standalone: no external stylesheet, script or image
    assert [int(s["data-id"]) for s in spans.tokens] == ids
    np.testing.assert_allclose([float(s["data-p"]) for s in spans.tokens[1:]], expected, rtol=1e-4, atol=1e-7)

    att = np.load(out / "attention.npy")
    assert att.shape == (model.config.n_layer, model.config.n_head, len(ids), len(ids))
    np.testing.assert_allclose(np.array(result["attention"]), att, atol=1e-6)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(att, k=1) == 0)  # causal
    for layer in range(model.config.n_layer):  # a windowed layer's queries see their last `window` tokens only
        window = model.config.layer_window(layer)
        if window is not None:
            assert np.all(np.tril(att[layer], k=-window) == 0) and np.any(np.tril(att[layer], k=-window + 1) > 0)
    assert att.max(-1).mean() > 1.5 / len(ids)  # not uniform: the check below is not trivially true

    pngs = sorted(p.name for p in out.glob("attention_layer*.png"))
    assert pngs == [f"attention_layer{i:02d}.png" for i in range(model.config.n_layer)]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_times_v_is_the_models_attention_output(tmp_path, tok, family):
    """weights @ V (grouped-query heads sharing V) through the output projection = the attention module's output."""
    model = load_model(model_folder(tmp_path, tok, family))[0].eval()
    ids = tok.encode(TEXT)
    seen = {}

    def grab(attn, args, output):
        seen[args[1]] = (args[0], args[2], output)  # x, rope, y

    handles = [b.attn.register_forward_hook(grab) for b in model.blocks]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    _, weights = forward_with_attention(model, ids)
    for layer, block in enumerate(model.blocks):
        x, rope, y = seen[layer]
        with torch.no_grad():
            q, _, v = block.attn.project(x, rope)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (1, nh, T, hs)
            mixed = weights[layer][None] @ v  # (1, nh, T, hs)
            B, nh, T, hs = mixed.shape
            torch.testing.assert_close(
                block.attn.proj(mixed.transpose(1, 2).reshape(B, T, nh * hs)), y, rtol=1e-4, atol=1e-5
            )


def test_attention_weights_match_a_naive_loop():
    """Attention.weights, which explain reports: grouped-query heads, the layer's scale, soft-cap and window."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=10, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, attn_scale=0.5, attn_softcap=2.0, sliding_window=3
    )
    attn = Transformer(config).blocks[0].attn
    q, k = torch.randn(1, 4, 6, 8) * 3, torch.randn(1, 2, 6, 8)
    w = attn.weights(q, k)
    for h in range(4):
        for i in range(6):
            seen = range(max(0, i - 2), i + 1)
            scores = [2.0 * math.tanh(float(q[0, h, i] @ k[0, h // 2, j]) * 0.5 / 2.0) for j in seen]
            m = max(scores)
            e = [math.exp(x - m) for x in scores]
            expect = [0.0] * seen.start + [x / sum(e) for x in e] + [0.0] * (5 - i)
            np.testing.assert_allclose(w[0, h, i].tolist(), expect, rtol=1e-5, atol=1e-7)


def test_explain_errors(tmp_path, tok):
    folder = model_folder(tmp_path, tok, "gpt2")
    with pytest.raises(ValueError, match="give the text to explain"):
        explain_command(str(folder), out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        explain_command(str(folder), file=str(tmp_path / "nope.txt"), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="context is 64"):
        explain_command(str(folder), text="hello world " * 40, out=str(tmp_path / "o"))


def test_cli_runs_explain(tmp_path, tok):
    from lmforge.cli import main

    folder = model_folder(tmp_path, tok, "llama")
    assert main(["explain", str(folder), "--text", "hello world", "--out", str(tmp_path / "o"), "--no-heatmaps"]) == 0
    assert (tmp_path / "o" / "tokens.html").is_file() and not list((tmp_path / "o").glob("*.png"))
    assert load_tokenizer(folder).encode("hello world")  # the folder's tokenizer did the encoding
