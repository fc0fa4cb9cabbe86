"""GGUF export, read back with llama.cpp's own gguf.GGUFReader.

References that do not go through the exporter's code: the raw llama2.c file (llama.cpp's convert-llama2c-to-ggml
stores its q/k rows unpermuted, so our attn_q/attn_k must equal them), a numpy forward of the GGUF tensors as
llama.cpp's "llama" graph computes it (adjacent-pair RoPE), a Hugging Face `tokenizers` BPE rebuilt from the
file's tokens and merges, and, when llama-cpp-python is importable, llama.cpp itself generating greedily.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.apps.convert import export_command
from lmforge.checkpoint import save_model
from lmforge.config import ModelConfig
from lmforge.infer.generate import generate
from lmforge.infer.quantize import quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.interop.gguf import export_gguf, int4_from_q4_0_rows, q4_0_rows
from lmforge.interop.hf import UnsupportedModelError
from lmforge.loader import read as read_model
from lmforge.model import Transformer
from lmforge.tokenizer import BPETokenizer, CharTokenizer

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
needs_stories = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file(),
    reason=f"stories260K not found at {STORIES} (shared models folder absent)",
)
Q = gguf.GGMLQuantizationType
TEXT = ["the quick brown fox jumps over the lazy dog. ", "a stitch in time saves nine! ", "héllo wörld 123 "] * 20


# ------------------------------------------------------------------------------------------ helpers


def read(path):
    """(metadata dict, tensors dict name -> ReaderTensor) of a GGUF file."""
    r = gguf.GGUFReader(path)
    meta = {}
    for name, f in r.fields.items():
        if not name.startswith("GGUF."):
            meta[name] = f.contents()
    return meta, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A tensor's values as float32 in numpy (row-major, (out, in)) order, Q8_0 / Q4_0 dequantized by gguf.quants."""
    if t.tensor_type in (Q.Q8_0, Q.Q4_0):
        return gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(t.data, dtype=np.float32)


def tiny_llama(vocab_size: int, tie: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig.from_name(
        "llama-nano",
        vocab_size=vocab_size,
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_kv_head=2,
        intermediate_size=96,
        block_size=32,
        rope_base=5000.0,
        norm_eps=1e-6,
        tie_embeddings=tie,
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_gpt2(vocab_size: int, seed: int = 1, mlp: str = "gelu_tanh") -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig.from_name(
        "gpt-nano", vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, block_size=16, mlp=mlp
    )
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=300)


def gguf_llama_logits(tensors, meta, tokens) -> np.ndarray:
    """llama.cpp's "llama" graph in numpy (float64) on the GGUF tensors: RMSNorm, RoPE on adjacent pairs
    (x[2i], x[2i+1]) with theta = base^(-2i/n_rot), GQA (query head h reads kv head h // group), SwiGLU."""
    w = {k: values(t).astype(np.float64) for k, t in tensors.items()}
    C, L = meta["llama.embedding_length"], meta["llama.block_count"]
    nh, nkv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base, hs = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"], C // nh
    T = len(tokens)

    def rms(x, g):
        return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    def rope(x):  # (T, n, hs)
        i = np.arange(hs // 2)
        angle = np.arange(T)[:, None] * base ** (-2 * i / hs)  # (T, hs/2)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        return out

    x = w["token_embd.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(L):
        lw = {k.split(".")[2]: v for k, v in w.items() if k.startswith(f"blk.{layer}.")}  # "attn_q" -> weight
        h = rms(x, lw["attn_norm"])
        q = rope((h @ lw["attn_q"].T).reshape(T, nh, hs))
        k = rope((h @ lw["attn_k"].T).reshape(T, nkv, hs))
        v = (h @ lw["attn_v"].T).reshape(T, nkv, hs)
        heads = []
        for hd in range(nh):
            kv = hd // (nh // nkv)
            s = q[:, hd] @ k[:, kv].T / np.sqrt(hs) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            heads.append((p / p.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ lw["attn_output"].T
        h = rms(x, lw["ffn_norm"])
        g, u = h @ lw["ffn_gate"].T, h @ lw["ffn_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ lw["ffn_down"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


def read_llama2c_raw(path):
    """stories260K's tensors as run.c maps them: original layout, q/k rows not permuted."""
    dim, hidden, L, nh, nkv, vocab, _ = np.fromfile(path, dtype="<i4", count=7).tolist()
    V, kv = abs(vocab), nkv * (dim // nh)
    f = np.fromfile(path, dtype="<f4", offset=28)
    shapes = [
        ("emb", (V, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv, dim)),
        ("wv", (L, kv, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
    ]
    w, o = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = f[o : o + n].reshape(shape)
        o += n
    return w


# -------------------------------------------------------------------------------------- tiny Llama


@pytest.mark.parametrize("tie", [False, True])
def test_llama_f32_tensors_metadata_and_forward(tmp_path, bpe, tie):
    model = tiny_llama(bpe.vocab_size, tie=tie)
    c = model.config
    out = export_gguf(model, bpe, tmp_path / "m.gguf", "f32")
    meta, tensors = read(out.path)

    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    hp = {
        "context_length": c.block_size,
        "embedding_length": c.n_embd,
        "block_count": c.n_layer,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.n_head,
        "attention.head_count_kv": c.n_kv_head,
        "rope.dimension_count": c.head_dim,
        "vocab_size": c.vocab_size,
    }
    assert {k: meta[f"llama.{k}"] for k in hp} == hp
    assert meta["llama.rope.freq_base"] == np.float32(5000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-6)

    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tie else set())
    expected |= {
        f"blk.{i}.{n}.weight"
        for i in range(c.n_layer)
        for n in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(tensors) == expected
    assert all(t.tensor_type == Q.F32 for t in tensors.values())
    shapes = {
        "attn_q": (c.n_embd, c.n_embd),
        "attn_k": (c.kv_dim, c.n_embd),
        "attn_v": (c.kv_dim, c.n_embd),
        "ffn_gate": (96, c.n_embd),
        "ffn_up": (96, c.n_embd),
        "ffn_down": (c.n_embd, 96),
    }
    for n, shape in shapes.items():
        assert values(tensors[f"blk.1.{n}.weight"]).shape == shape
        assert tuple(tensors[f"blk.1.{n}.weight"].shape) == shape[::-1]  # GGUF stores ne (in, out)

    # values that need no permutation are bit-equal to the fused source rows
    sd = model.state_dict()
    qkv, fc = sd["blocks.1.attn.qkv.weight"].numpy(), sd["blocks.1.mlp.fc.weight"].numpy()
    np.testing.assert_array_equal(values(tensors["blk.1.attn_v.weight"]), qkv[c.n_embd + c.kv_dim :])
    np.testing.assert_array_equal(values(tensors["blk.1.ffn_gate.weight"]), fc[:96])
    np.testing.assert_array_equal(values(tensors["blk.1.ffn_up.weight"]), fc[96:])
    np.testing.assert_array_equal(values(tensors["blk.1.ffn_down.weight"]), sd["blocks.1.mlp.proj.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["blk.0.ffn_norm.weight"]), sd["blocks.0.norm2.weight"].numpy())
    # q/k are a row permutation of the source rows, per head
    q = values(tensors["blk.0.attn_q.weight"])
    assert not np.array_equal(q, qkv[: c.n_embd])  # reordered for llama.cpp's RoPE
    source_q = sd["blocks.0.attn.qkv.weight"].numpy()[: c.n_embd]
    np.testing.assert_array_equal(np.sort(q, axis=0), np.sort(source_q, axis=0))

    # llama.cpp's computation on the file gives our logits: the RoPE layout, GQA and head are right
    tokens = [3, 17, 42, 5, 99, 7, 1, 250]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    np.testing.assert_allclose(gguf_llama_logits(tensors, meta, tokens), ours, atol=1e-4, rtol=1e-4)


def test_llama_f16_and_q8_0_within_their_rounding(tmp_path, bpe):
    model = tiny_llama(bpe.vocab_size)
    f32 = {k: values(t) for k, t in read(export_gguf(model, bpe, tmp_path / "a.gguf", "f32").path)[1].items()}
    meta16, t16 = read(export_gguf(model, bpe, tmp_path / "b.gguf", "f16").path)
    assert meta16["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    for name, ref in f32.items():
        t = t16[name]
        assert t.tensor_type == (Q.F32 if ref.ndim == 1 else Q.F16), name  # norms stay f32
        np.testing.assert_array_equal(values(t), ref if ref.ndim == 1 else ref.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(values(t), ref, rtol=2**-11, atol=6e-8)

    export = export_gguf(model, bpe, tmp_path / "c.gguf", "q8_0")
    meta8, t8 = read(export.path)
    assert meta8["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, ref in f32.items():
        t = t8[name]
        if ref.ndim == 1:
            assert t.tensor_type == Q.F32, name
            np.testing.assert_array_equal(values(t), ref)
            continue
        assert t.tensor_type == Q.Q8_0, name
        got = values(t)
        assert got.shape == ref.shape
        # per block of 32: scale d = max|x| / 127 stored in fp16; error <= d/2 (rounding) + 127 |d - fp16(d)|
        blocks, err = ref.reshape(-1, 32), np.abs(got - ref).reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert (err <= d * (0.5 + 127 * 2**-11) + 1e-9).all(), name
        assert err.max() > 0  # really quantized
    # logits stay close to the float model's
    tokens = [5, 9, 200, 31]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    assert np.abs(gguf_llama_logits(t8, meta8, tokens) - ours).max() < 0.05 * np.abs(ours).max() + 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_int4_model_exports_as_q4_0_byte_for_byte(tmp_path, bpe, arch):
    """lmforge's int4 is Q4_0: an int4 model's file holds exactly what gguf's own Q4_0 quantizer makes of the float
    model's matrices (split and RoPE-permuted as for a float export); norms and biases f32, embeddings f16, and a
    tied head quantized on its own, written as `output`."""
    model = tiny_llama(bpe.vocab_size, tie=True) if arch == "llama" else tiny_gpt2(bpe.vocab_size)
    _, ref = read(export_gguf(model, bpe, tmp_path / "f.gguf", "f32").path)
    export = export_gguf(quantize_model(copy.deepcopy(model), "int4"), bpe, tmp_path / "q.gguf")  # its own type
    meta, tensors = read(export.path)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0 and not export.notes
    embeddings = {"token_embd.weight", "position_embd.weight"}
    assert set(tensors) == set(ref) | {"output.weight"}
    for name, t in tensors.items():
        want = values(ref.get(name, ref["token_embd.weight"]))  # llama's tied head: the embedding
        if name in embeddings:
            assert t.tensor_type == Q.F16
            np.testing.assert_array_equal(values(t), want.astype(np.float16).astype(np.float32))
        elif want.ndim == 1:
            assert t.tensor_type == Q.F32
            np.testing.assert_array_equal(values(t), want)
        else:
            assert t.tensor_type == Q.Q4_0, name
            np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(want, Q.Q4_0), err_msg=name)


def test_int8_model_exports_as_q8_0_within_a_rounding_step(tmp_path, bpe, capsys):
    model = tiny_llama(bpe.vocab_size)
    q = quantize_model(copy.deepcopy(model), "int8")
    save_model(tmp_path / "int8", q, bpe)
    export_command(str(tmp_path / "int8"), str(tmp_path / "q.gguf"), format="gguf")
    assert "q8_0" in capsys.readouterr().out
    meta, tensors = read(tmp_path / "q.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    ours = values(read(export_gguf(q, bpe, tmp_path / "f.gguf", "f32").path)[1]["blk.0.ffn_down.weight"])
    got = values(tensors["blk.0.ffn_down.weight"])  # the int8 weights re-blocked: one Q8_0 step at most apart
    d = np.abs(ours).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert (np.abs(got - ours).reshape(-1, 32) <= d * (0.5 + 127 * 2**-11) + 1e-9).all()


def test_q4_0_rows_round_trip_to_lmforge_int4():
    from lmforge.infer.quantize import quantize_int4

    torch.manual_seed(0)
    packed, scales = quantize_int4(torch.randn(7, 96))
    rows = q4_0_rows(packed, scales)
    assert rows.shape == (7, 3 * 18) and rows.dtype == torch.uint8
    back_packed, back_scales = int4_from_q4_0_rows(rows)
    assert torch.equal(back_packed, packed) and torch.equal(back_scales, scales)


@pytest.mark.parametrize("quantized", [False, True])
def test_q4_0_export_of_rows_not_in_blocks_of_32_falls_back_to_f16(tmp_path, bpe, quantized):
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("llama-nano", vocab_size=bpe.vocab_size, n_layer=1, n_embd=64, intermediate_size=72)
    ).eval()  # ffn_down reads 72 inputs
    if quantized:  # int4 gives that layer int8; exported dequantized
        model = quantize_model(model, "int4")
    export = export_gguf(model, bpe, tmp_path / "q.gguf", "q4_0")
    meta, tensors = read(export.path)
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16 and "blk.0.ffn_down.weight" in export.notes[-1]
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q4_0
    assert tensors["token_embd.weight"].tensor_type == (Q.F16 if quantized else Q.Q4_0)


def test_bpe_tokenizer_metadata_rebuilds_the_same_tokenizer(tmp_path, bpe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    model = tiny_llama(bpe.vocab_size + 3)  # three embedding rows beyond the vocabulary
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    save_model(
        tmp_path / "folder",
        model,
        bpe,
        extra_files={"tokenizer_config.json": json.dumps({"chat_template": template}).encode()},
    )
    export_command(str(tmp_path / "folder"), str(tmp_path / "m.gguf"), format="gguf")
    meta, tensors = read(tmp_path / "m.gguf")
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16  # f16 is the default type
    assert meta["tokenizer.chat_template"] == template
    vocab = bpe.tok.get_vocab(with_added_tokens=True)
    n = len(vocab)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[:n] == sorted(vocab, key=vocab.get)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    types = meta["tokenizer.ggml.token_type"]
    eos = bpe.eos_id
    assert types[eos] == gguf.TokenType.CONTROL and tokens[eos] == "<|endoftext|>"
    assert types[n:] == [gguf.TokenType.UNUSED] * 3
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(n) if i != eos)
    assert meta["tokenizer.ggml.eos_token_id"] == eos and meta["tokenizer.ggml.bos_token_id"] == eos
    assert meta["tokenizer.ggml.add_bos_token"] is False
    merges = json.loads(bpe.tok.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]

    # a tokenizer built from nothing but the file's tokens and merges encodes as the source does
    rebuilt = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens[:n])},
            merges=[tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]],
        )
    )
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rebuilt.decoder = decoders.ByteLevel()
    for text in ("the lazy fox saves time", "héllo wörld 123!", "unseen: qzx ✓"):
        assert rebuilt.encode(text).ids == bpe.encode(text)


# -------------------------------------------------------------------------------------- stories260K


@needs_stories
def test_stories260K_matches_the_llama2c_file(tmp_path):
    out = tmp_path / "stories.gguf"
    export_command(str(STORIES / "stories260K.bin"), str(out), format="gguf", gguf_type="f32")
    meta, tensors = read(out)
    raw = read_llama2c_raw(STORIES / "stories260K.bin")

    assert meta["general.architecture"] == "llama"
    hp = {
        "context_length": 512,
        "embedding_length": 64,
        "block_count": 5,
        "feed_forward_length": 172,
        "attention.head_count": 8,
        "attention.head_count_kv": 4,
        "rope.dimension_count": 8,
    }
    assert {k: meta[f"llama.{k}"] for k in hp} == hp
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)
    assert "output.weight" not in tensors  # tied: llama.cpp falls back to token_embd

    # llama.cpp's convert-llama2c-to-ggml copies llama2.c's matrices as they are: so must we
    pairs = {"token_embd.weight": raw["emb"], "output_norm.weight": raw["rms_final"]}
    for i in range(5):
        for ours, theirs in (
            ("attn_norm", "rms_att"),
            ("attn_q", "wq"),
            ("attn_k", "wk"),
            ("attn_v", "wv"),
            ("attn_output", "wo"),
            ("ffn_norm", "rms_ffn"),
            ("ffn_gate", "w1"),
            ("ffn_down", "w2"),
            ("ffn_up", "w3"),
        ):
            pairs[f"blk.{i}.{ours}.weight"] = raw[theirs][i]
    assert set(tensors) == set(pairs)
    for name, ref in pairs.items():
        np.testing.assert_array_equal(values(tensors[name]), ref, err_msg=name)

    # tokenizer: tok512.bin's pieces, scores and types, as convert-llama2c-to-ggml writes them
    tok = read_model(STORIES / "stories260K.bin").tokenizer
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "llama" and len(tokens) == 512
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("unknown", "bos", "eos")] == [0, 1, 2]
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_space_prefix"] is True
    assert [t.replace("\u2581", " ").encode() for t in tokens[3:]] == tok.pieces[3:]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    np.testing.assert_array_equal(np.float32(meta["tokenizer.ggml.scores"]), np.float32(tok.scores))
    T = gguf.TokenType
    assert types == [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * 253


@needs_stories
def test_stories260K_q8_0_falls_back_to_f16_for_odd_rows(tmp_path):
    stories = read_model(STORIES / "stories260K.bin")
    m, tok = stories.model, stories.tokenizer
    export = export_gguf(m, tok, tmp_path / "q.gguf", "q8_0")
    _, tensors = read(export.path)
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # 172 inputs: not whole Q8_0 blocks
    assert tensors["blk.0.ffn_up.weight"].tensor_type == Q.Q8_0
    assert any("ffn_down" in note for note in export.notes)


# ---------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_fused_tensors_and_metadata(tmp_path, bpe):
    model = tiny_gpt2(bpe.vocab_size)
    config = model.config
    export = export_gguf(model, bpe, tmp_path / "g.gguf", "f32")
    meta, tensors = read(export.path)
    assert export.notes == []
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.context_length"] == 16
    assert meta["gpt2.embedding_length"] == 32 and meta["gpt2.block_count"] == 2
    assert meta["gpt2.attention.head_count"] == 2 and meta["gpt2.feed_forward_length"] == 128
    assert meta["gpt2.attention.layer_norm_epsilon"] == np.float32(config.norm_eps)
    sd = model.state_dict()
    pairs = {
        "token_embd.weight": "tok_emb.weight",
        "position_embd.weight": "pos_emb.weight",
        "output.weight": "tok_emb.weight",
        "output_norm.weight": "norm_f.weight",
        "output_norm.bias": "norm_f.bias",
    }
    for i in range(2):
        for theirs, ours in (
            ("attn_norm", "norm1"),
            ("attn_qkv", "attn.qkv"),
            ("attn_output", "attn.proj"),
            ("ffn_norm", "norm2"),
            ("ffn_up", "mlp.fc"),
            ("ffn_down", "mlp.proj"),
        ):
            for s in ("weight", "bias"):
                pairs[f"blk.{i}.{theirs}.{s}"] = f"blocks.{i}.{ours}.{s}"
    assert set(tensors) == set(pairs)
    for name, ours in pairs.items():
        np.testing.assert_array_equal(values(tensors[name]), sd[ours].numpy(), err_msg=name)

    exact = tiny_gpt2(bpe.vocab_size, mlp="gelu")
    assert any("GELU" in n for n in export_gguf(exact, bpe, tmp_path / "e.gguf", "f16").notes)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_gives_clear_errors(tmp_path, bpe):
    seed = Transformer(ModelConfig.from_name("seed", vocab_size=50, n_embd=16, n_head=2, intermediate_size=16))
    with pytest.raises(UnsupportedModelError, match="neither a GPT-2 nor a Llama"):
        export_gguf(seed, None, tmp_path / "s.gguf")

    model = tiny_llama(bpe.vocab_size)
    with pytest.raises(ValueError, match="unknown GGUF tensor type 'q5_1'.*f32, f16, q8_0, q4_0"):
        export_gguf(model, bpe, tmp_path / "t.gguf", "q5_1")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        export_gguf(model, bpe, tmp_path)

    save_model(tmp_path / "float", model, bpe)
    with pytest.raises(ValueError, match="applies to --format gguf only"):
        export_command(str(tmp_path / "float"), str(tmp_path / "x"), format="hf", gguf_type="q8_0")

    small = tiny_llama(bpe.vocab_size - 1)
    with pytest.raises(UnsupportedModelError, match="do not belong together"):
        export_gguf(small, bpe, tmp_path / "v.gguf")


def test_failed_export_leaves_the_old_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    spm_like = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], byte_fallback=True))
    spm_like.pre_tokenizer = pre_tokenizers.Metaspace()
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(UnsupportedModelError, match="byte fallback"):
        export_gguf(tiny_llama(3), BPETokenizer(spm_like), out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_char_tokenizer_exports_without_vocabulary(tmp_path):
    tok = CharTokenizer.train(["abcdefgh"])
    export = export_gguf(tiny_llama(tok.vocab_size), tok, tmp_path / "c.gguf", "f32")
    meta, _ = read(export.path)
    assert meta["tokenizer.ggml.model"] == "none" and "tokenizer.ggml.tokens" not in meta
    assert any("char tokenizer has no GGUF form" in n for n in export.notes)


# ------------------------------------------------------------------------------ llama.cpp itself


F32_CACHE = 0  # GGML_TYPE_F32: llama.cpp keeps keys/values in f32, as lmforge does (its default is f16)
NO_LLAMA_CPP = "llama-cpp-python is not installed (it compiles llama.cpp from source; see README 'GGUF export')"


@needs_stories
def test_llama_cpp_generates_what_lmforge_generates(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    path = tmp_path / "stories.gguf"
    stories = read_model(STORIES / "stories260K.bin")
    m, tok = stories.model, stories.tokenizer
    export_gguf(m, tok, path, "f32")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=1,
        n_batch=64,
        logits_all=True,
        verbose=False,
        type_k=F32_CACHE,
        type_v=F32_CACHE,
    )
    prompt = "Once upon a time, there was a little girl"
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    assert ids == tok.encode(prompt)  # llama.cpp's SentencePiece tokenizer agrees with llama2.c's

    n = 48
    ours = generate(m, [ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].tokens
    llm.reset()
    llm.eval(ids)
    theirs, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits.append(row)
        theirs.append(int(row.argmax()))
        llm.eval([theirs[-1]])
    assert theirs == ours
    with torch.no_grad():
        ref = m(torch.tensor([ids + ours[:-1]]))[0, len(ids) - 1 :].double().numpy()
    np.testing.assert_allclose(np.stack(logits), ref, atol=2e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_llama_cpp_runs_bpe_exports(tmp_path, bpe, arch):
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    model = tiny_llama(bpe.vocab_size) if arch == "llama" else tiny_gpt2(bpe.vocab_size)
    path = export_gguf(model, bpe, tmp_path / f"{arch}.gguf", "f32").path
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=model.config.block_size,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=F32_CACHE,
        type_v=F32_CACHE,
    )
    for text in ("the lazy fox saves time", "héllo wörld 123!", "unseen: qzx"):
        assert llm.tokenize(text.encode(), add_bos=False) == bpe.encode(text)
    ids = bpe.encode("the quick brown fox jumps")
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-2 * np.abs(ours).max())


def test_llama_cpp_runs_int4_exports_with_lmforges_weights(tmp_path, bpe):
    """llama.cpp on the Q4_0 file of an int4 model: its logits sit far closer to the int4 model's than the float
    model's do (llama.cpp rounds activations to 8 bits for its Q4_0 products; the weights are the same)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=NO_LLAMA_CPP)
    model = tiny_llama(bpe.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    q = quantize_model(copy.deepcopy(model), "int4")
    path = export_gguf(q, bpe, tmp_path / "q.gguf").path
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=model.config.block_size,
        n_threads=1,
        logits_all=True,
        verbose=False,
        type_k=F32_CACHE,
        type_v=F32_CACHE,
    )
    ids = bpe.encode("the quick brown fox jumps")
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    with torch.no_grad():
        ours, flt = (m(torch.tensor([ids]))[0].double().numpy() for m in (q, model))
    int4_error = np.abs(flt - ours).max()
    assert int4_error > 0.05 * np.abs(ours).max()  # 4-bit rounding shows
    assert np.abs(theirs - ours).max() < 0.25 * int4_error
