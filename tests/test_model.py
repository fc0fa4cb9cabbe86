"""The model against independent references: torch.nn.TransformerEncoder for `seed`, itself uncached for the cache."""

import math

import pytest
import torch
import torch.nn as nn

from lmforge.config import PRESETS, ModelConfig
from lmforge.model import Transformer


class ReferenceTransformerModel(nn.Module):
    """pytorch/examples word_language_model `TransformerModel`, written from torch.nn parts (batch-first here)."""

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout):
        super().__init__()
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.embed = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        self.ninp = ninp
        pe = torch.zeros(5000, ninp)
        position = torch.arange(0, 5000, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, ninp, 2).float() * (-math.log(10000.0) / ninp))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, src):
        T = src.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T)
        x = self.embed(src) * math.sqrt(self.ninp) + self.pe[:T]
        return self.decoder(self.encoder(x, mask=mask, is_causal=True))


def copy_seed_weights(ours: Transformer, ref: ReferenceTransformerModel) -> None:
    sd = {"embed.weight": ours.tok_emb.weight, "decoder.weight": ours.lm_head.weight, "decoder.bias": ours.lm_head.bias}
    for i, b in enumerate(ours.blocks):
        p = f"encoder.layers.{i}."
        sd.update(
            {
                p + "self_attn.in_proj_weight": b.attn.qkv.weight,
                p + "self_attn.in_proj_bias": b.attn.qkv.bias,
                p + "self_attn.out_proj.weight": b.attn.proj.weight,
                p + "self_attn.out_proj.bias": b.attn.proj.bias,
                p + "linear1.weight": b.mlp.fc.weight,
                p + "linear1.bias": b.mlp.fc.bias,
                p + "linear2.weight": b.mlp.proj.weight,
                p + "linear2.bias": b.mlp.proj.bias,
                p + "norm1.weight": b.norm1.weight,
                p + "norm1.bias": b.norm1.bias,
                p + "norm2.weight": b.norm2.weight,
                p + "norm2.bias": b.norm2.bias,
            }
        )
    ref.load_state_dict(sd, strict=False)


def test_seed_matches_torch_transformer_encoder():
    torch.manual_seed(0)
    c = ModelConfig.from_name("seed", vocab_size=100)
    ours = Transformer(c).eval()
    ref = ReferenceTransformerModel(100, c.n_embd, c.n_head, c.intermediate_size, c.n_layer, c.dropout).eval()
    copy_seed_weights(ours, ref)
    tokens = torch.randint(0, 100, (3, 35))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens), atol=1e-5, rtol=1e-5)


def test_seed_init_is_the_examples():
    c = ModelConfig.from_name("seed", vocab_size=1000)
    m = Transformer(c)
    assert m.tok_emb.weight.abs().max() <= 0.1 and m.lm_head.weight.abs().max() <= 0.1
    assert m.lm_head.weight.abs().max() > 0.09  # uniform over the whole range, not a tiny normal
    assert torch.all(m.lm_head.bias == 0)
    assert m.lm_head.weight.data_ptr() != m.tok_emb.weight.data_ptr()


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt-nano"):
        ModelConfig.from_name("gpt-5")


def test_config_json_round_trip(tmp_path):
    for name in PRESETS:
        c = ModelConfig.from_name(name)
        (tmp_path / "c.json").write_text(c.to_json())
        assert ModelConfig.from_file(tmp_path / "c.json") == c


def test_real_shapes_have_real_parameter_counts():
    with torch.device("meta"):
        assert Transformer(ModelConfig.from_name("gpt2")).num_params() == 124_439_808
        assert Transformer(ModelConfig.from_name("gpt2-medium")).num_params() == 354_823_168
        assert Transformer(ModelConfig.from_name("llama2-7b")).num_params() == 6_738_415_616


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano", "seed"])
def test_cached_decoding_equals_uncached(name):
    torch.manual_seed(0)
    c = ModelConfig.from_name(name, vocab_size=50, dropout=0.0)
    m = Transformer(c).eval()
    tokens = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = m(tokens)
        cache = m.new_cache(2, 32)
        parts = [m(tokens[:, :7], kv_cache=cache)]
        parts.append(m(tokens[:, 7:12], kv_cache=cache))  # a chunk against a non-empty cache
        parts += [m(tokens[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano"])
def test_left_padded_batch_equals_each_row_alone(name):
    torch.manual_seed(0)
    c = ModelConfig.from_name(name, vocab_size=50)
    m = Transformer(c).eval()
    rows = [torch.randint(0, 50, (n,)) for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    pad = torch.tensor([width - len(r) for r in rows])
    batch = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pad, rows)])
    with torch.no_grad():
        cache = m.new_cache(3, 16, pad=pad)
        out = m(batch, kv_cache=cache)[:, -1]
        nxt = torch.tensor([[1], [2], [3]])
        out2 = m(nxt, kv_cache=cache)[:, -1]
        for b, r in enumerate(rows):
            alone = m(r[None])[0, -1]
            torch.testing.assert_close(out[b], alone, atol=1e-5, rtol=1e-5)
            alone2 = m(torch.cat([r, nxt[b]])[None])[0, -1]
            torch.testing.assert_close(out2[b], alone2, atol=1e-5, rtol=1e-5)


def test_context_overflow_is_a_clear_error():
    m = Transformer(ModelConfig.from_name("gpt-nano"))
    with pytest.raises(ValueError, match="context of 64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m.new_cache(1, 100)
