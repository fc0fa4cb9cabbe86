"""Embeddings against plain references: each input alone through the model's own forward, pooled by hand."""

import json

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer.embed import EmbeddingError, embed
from lmforge.model import Transformer
from lmforge.tokenizer import CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(preset):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(preset, vocab_size=40, block_size=48)).eval()


def inputs_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 40, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def alone(model, ids, pooling):
    """The reference: the input alone, no padding, pooled with a plain mean or index."""
    h = model.hidden(torch.tensor([ids]))[0]  # (T, C)
    v = h.mean(0) if pooling == "mean" else h[-1]
    return v / v.norm()


@pytest.mark.parametrize("preset", ["gpt-nano", "llama-nano"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_batch_embeds_each_input_as_it_embeds_alone(preset, pooling):
    model = tiny(preset)
    inputs = inputs_of([5, 1, 48, 17, 2, 30, 9, 9])
    batched = embed(model, inputs, pooling)
    assert batched.shape == (8, model.config.n_embd) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(8))
    for i, ids in enumerate(inputs):
        torch.testing.assert_close(batched[i], alone(model, ids, pooling), atol=2e-6, rtol=1e-5)
    # Small batches (several forwards) give the same vectors as one big one.
    torch.testing.assert_close(embed(model, inputs, pooling, max_batch_tokens=40), batched, atol=2e-6, rtol=1e-5)


def test_the_pooling_choice_changes_the_vectors():
    model = tiny("llama-nano")
    inputs = inputs_of([12, 5], seed=3)
    assert (embed(model, inputs, "mean") - embed(model, inputs, "last")).abs().max() > 1e-2


def test_bad_inputs_name_the_input_and_the_reason():
    model = tiny("gpt-nano")
    with pytest.raises(EmbeddingError, match="input 1 is empty"):
        embed(model, [[1, 2], []])
    with pytest.raises(EmbeddingError, match="input 0 has 49 tokens but the model's context is 48"):
        embed(model, [[1] * 49])
    with pytest.raises(EmbeddingError, match="outside the vocabulary 0..39"):
        embed(model, [[1, 40]])
    with pytest.raises(EmbeddingError, match="pooling='max'"):
        embed(model, [[1]], "max")
    with pytest.raises(EmbeddingError, match="no inputs"):
        embed(model, [])


def test_embed_verb_prints_the_python_functions_vectors(tmp_path, capsys):
    from lmforge.apps.embed import embed_texts
    from lmforge.checkpoint import save_model
    from lmforge.cli import main

    tok = CharTokenizer(sorted("abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHI"))
    model = tiny("gpt-nano")
    save_model(tmp_path / "m", model, tok)
    (tmp_path / "more.txt").write_text("a third line\n\nand a fourth\n", encoding="utf-8")
    assert (
        main(
            [
                "embed",
                str(tmp_path / "m"),
                "--input",
                "hello there",
                "b",
                "--file",
                str(tmp_path / "more.txt"),
                "--pooling",
                "last",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    texts = ["hello there", "b", "a third line", "and a fourth"]
    assert [(r["index"], r["tokens"], r["pooling"]) for r in lines] == [
        (i, len(t), "last") for i, t in enumerate(texts)
    ]
    expected = embed_texts(model, tok, texts, "last")
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in lines]), expected, atol=1e-6, rtol=1e-5)
    assert main(["embed", str(tmp_path / "m")]) == 1
    assert "--input" in capsys.readouterr().err
