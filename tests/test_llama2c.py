"""llama2.c import: the real stories260K against an independent numpy transcription of run.c's forward, and the
tokenizer against hand-computed cases and a plain transcription of run.c's merge loop."""

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.apps.convert import export_command, import_command
from lmforge.checkpoint import CheckpointError
from lmforge.interop.llama2c import read_llama2c_model
from lmforge.loader import load
from lmforge.tokenizer import Llama2cTokenizer, TokenizerError

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = MODELS / "stories260K"
needs_stories = pytest.mark.skipif(
    not (STORIES / "stories260K.bin").is_file(),
    reason=f"stories260K not found in {STORIES} (shared models folder absent)",
)


# ------------------------------------------------------------------------------ independent reference


def read_raw(path):
    """The file's tensors as run.c's memory_map_weights sees them: original layout, nothing permuted."""
    dim, hidden, L, nh, nkv, vocab, seq = np.fromfile(path, dtype="<i4", count=7).tolist()
    V, hs = abs(vocab), dim // nh
    f = np.fromfile(path, dtype="<f4", offset=28).astype(np.float64)
    shapes = [
        ("emb", (V, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, nkv * hs, dim)),
        ("wv", (L, nkv * hs, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden, dim)),
        ("w2", (L, dim, hidden)),
        ("w3", (L, hidden, dim)),
        ("rms_final", (dim,)),
        ("rope", (seq * hs,)),
    ]
    w, o = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        w[name] = f[o : o + n].reshape(shape)
        o += n
    w["wcls"] = w["emb"] if vocab > 0 else f[o : o + V * dim].reshape(V, dim)
    return w, dict(dim=dim, L=L, nh=nh, nkv=nkv, hs=hs)


def llama2c_forward(w, h, tokens):
    """run.c's forward(), one position at a time, interleaved RoPE on the original weights (float64)."""
    dim, L, nh, nkv, hs = h["dim"], h["L"], h["nh"], h["nkv"], h["hs"]

    def rmsnorm(x, g):
        return g * x / np.sqrt(np.mean(x * x) + 1e-5)

    kc, vc = np.zeros((L, len(tokens), nkv, hs)), np.zeros((L, len(tokens), nkv, hs))
    out = []
    for pos, tok in enumerate(tokens):
        x = w["emb"][tok].copy()
        for layer in range(L):
            xb = rmsnorm(x, w["rms_att"][layer])
            q, k, v = w["wq"][layer] @ xb, w["wk"][layer] @ xb, w["wv"][layer] @ xb
            for vec in (q, k):  # pairs (2i, 2i+1): frequency 10000^(-(2i mod hs)/hs)
                i = np.arange(0, len(vec), 2)
                angle = pos * 10000.0 ** (-(i % hs) / hs)
                v0, v1 = vec[i].copy(), vec[i + 1].copy()
                vec[i], vec[i + 1] = v0 * np.cos(angle) - v1 * np.sin(angle), v0 * np.sin(angle) + v1 * np.cos(angle)
            kc[layer, pos], vc[layer, pos] = k.reshape(nkv, hs), v.reshape(nkv, hs)
            att_out = np.zeros(dim)
            for head in range(nh):
                kv = head // (nh // nkv)
                scores = kc[layer, : pos + 1, kv] @ q[head * hs : (head + 1) * hs] / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                att_out[head * hs : (head + 1) * hs] = (p / p.sum()) @ vc[layer, : pos + 1, kv]
            x = x + w["wo"][layer] @ att_out
            xb = rmsnorm(x, w["rms_ffn"][layer])
            gate = w["w1"][layer] @ xb
            x = x + w["w2"][layer] @ (gate / (1 + np.exp(-gate)) * (w["w3"][layer] @ xb))
        out.append(w["wcls"] @ rmsnorm(x, w["rms_final"]))
    return np.stack(out)


def write_llama2c(path, dim=32, hidden=48, L=2, nh=4, nkv=2, vocab=40, seq=16, shared=False, seed=0):
    """A random llama2.c legacy file, written field by field as export.py's legacy_export does."""
    rng = np.random.default_rng(seed)
    hs = dim // nh

    def t(*shape):
        return rng.normal(0, 0.3, shape).astype("<f4").tobytes()

    parts = [
        struct.pack("<7i", dim, hidden, L, nh, nkv, vocab if shared else -vocab, seq),
        t(vocab, dim),
        (1 + rng.random((L, dim))).astype("<f4").tobytes(),
        t(L, dim, dim),
        t(L, nkv * hs, dim),
        t(L, nkv * hs, dim),
        t(L, dim, dim),
        (1 + rng.random((L, dim))).astype("<f4").tobytes(),
        t(L, hidden, dim),
        t(L, dim, hidden),
        t(L, hidden, dim),
        t(dim),
        t(seq * hs),
    ]
    if not shared:
        parts.append(t(vocab, dim))
    path.write_bytes(b"".join(parts))
    return path


def naive_merge(tok, tokens):
    """run.c's merge loop as written: rescan every adjacent pair each round."""
    tokens = list(tokens)
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            m = tok.lookup.get(tok.pieces[tokens[i]] + tok.pieces[tokens[i + 1]])
            if m is not None and tok.scores[m] > best_score:
                best_score, best_id, best_idx = tok.scores[m], m, i
        if best_idx == -1:
            return tokens
        tokens[best_idx : best_idx + 2] = [best_id]


# ------------------------------------------------------------------------------------------- model


def logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].double().numpy()


@pytest.mark.parametrize("shared", [False, True])
def test_synthetic_file_matches_llama2c_forward(tmp_path, shared):
    path = write_llama2c(tmp_path / "tiny.bin", shared=shared)
    model = read_llama2c_model(path)
    assert model.config.tie_embeddings == shared and model.config.n_kv_head == 2
    tokens = [1, 5, 39, 7, 7, 0, 22, 3, 12, 30]
    np.testing.assert_allclose(logits(model, tokens), llama2c_forward(*read_raw(path), tokens), atol=1e-4)


@needs_stories
def test_stories260k_matches_llama2c_forward():
    model = read_llama2c_model(STORIES / "stories260K.bin")
    c = model.config
    assert (c.n_embd, c.intermediate_size, c.n_layer, c.n_head, c.n_kv_head, c.vocab_size, c.block_size) == (
        64,
        172,
        5,
        8,
        4,
        512,
        512,
    ) and c.tie_embeddings
    tokens = [1, 403, 407, 261, 378, 11, 300, 420]
    np.testing.assert_allclose(
        logits(model, tokens), llama2c_forward(*read_raw(STORIES / "stories260K.bin"), tokens), atol=1e-4
    )


def greedy(model, prompt, steps, cached=True):
    ids = list(prompt)
    with torch.no_grad():
        if not cached:
            for _ in range(steps):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            return ids
        cache = model.new_cache(1, 256)
        out = model(torch.tensor([ids]), kv_cache=cache)  # prefill
        for _ in range(steps):
            ids.append(int(out[0, -1].argmax()))
            out = model(torch.tensor([ids[-1:]]), kv_cache=cache)
    return ids


@pytest.fixture
def one_thread():
    """A 260K-parameter model decodes fastest on one thread (several only contend on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@needs_stories
def test_stories260k_greedy_story_is_deterministic_and_english(one_thread):
    loaded = load(STORIES / "stories260K.bin", prepare=False)  # finds tok512.bin beside it
    model, tok = loaded.model, loaded.tokenizer
    assert isinstance(tok, Llama2cTokenizer)
    first, second = greedy(model, [tok.bos_id], 100), greedy(model, [tok.bos_id], 100)
    assert first == second
    assert greedy(model, [tok.bos_id], 30, cached=False) == first[:31]
    text = tok.decode(first)
    print(text)
    assert text.startswith("Once upon a time")
    words = set(text.lower().replace(",", " ").replace(".", " ").split())
    assert len(words & {"there", "was", "a", "little", "she", "he", "the", "to", "play", "day"}) >= 6


@needs_stories
def test_import_command_writes_a_folder_that_loads(tmp_path):
    import_command(str(STORIES / "stories260K.bin"), str(tmp_path / "m"))
    assert (tmp_path / "m" / "llama2c_tokenizer.bin").read_bytes() == (STORIES / "tok512.bin").read_bytes()
    loaded = load(tmp_path / "m", prepare=False)
    model, tok = loaded.model, loaded.tokenizer
    direct = read_llama2c_model(STORIES / "stories260K.bin")
    assert tok.kind == "llama2c" and tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert np.array_equal(logits(model, [1, 403, 407]), logits(direct, [1, 403, 407]))


@needs_stories
def test_stories260k_exports_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    export_command(str(STORIES / "stories260K.bin"), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = [1, 403, 407, 261, 378, 11]
    with torch.no_grad():
        theirs = hf(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(theirs, llama2c_forward(*read_raw(STORIES / "stories260K.bin"), tokens), atol=1e-4)


def test_missing_tokenizer_says_pass_tokenizer(tmp_path):
    path = write_llama2c(tmp_path / "tiny.bin")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load(path)


# --------------------------------------------------------------------------------------- bad files


def test_truncated_and_overlong_files_name_sizes(tmp_path):
    path = write_llama2c(tmp_path / "tiny.bin")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=rf"tiny\.bin is truncated.*implies {size} bytes, the file has {size - 100}"
    ):
        read_llama2c_model(path)
    write_llama2c(path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(
        CheckpointError, match=rf"longer than its header implies.*{size} bytes, the file has {size + 8}"
    ):
        read_llama2c_model(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(struct.pack("<7i", 64, 172, 5, 7, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(CheckpointError, match="n_heads=7"):
        read_llama2c_model(path)


@needs_stories
def test_shuffled_known_file_is_refused_unless_verify_false(tmp_path):
    data = bytearray((STORIES / "stories260K.bin").read_bytes())
    floats = np.frombuffer(bytes(data[28:]), dtype="<f4").copy()
    wq = slice(512 * 64 + 5 * 64, 512 * 64 + 5 * 64 + 5 * 64 * 64)  # after embedding and attention norms
    floats[wq] = np.random.default_rng(0).permutation(floats[wq])  # same values, same size, same header
    copy = tmp_path / "stories260K.bin"
    copy.write_bytes(bytes(data[:28]) + floats.tobytes())
    with pytest.raises(CheckpointError, match="shuffled"):
        read_llama2c_model(copy)
    read_llama2c_model(copy, verify=False)  # the caller may insist


@needs_stories
def test_tokenizer_file_checks(tmp_path):
    data = (STORIES / "tok512.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-10])
    with pytest.raises(TokenizerError, match="512 tokens"):
        Llama2cTokenizer.from_file(tmp_path / "t.bin", 512)
    (tmp_path / "t.bin").write_bytes(data)
    with pytest.raises(TokenizerError, match="32000 tokens"):  # tok512.bin paired with a 32000-token model
        Llama2cTokenizer.from_file(tmp_path / "t.bin", 32000)
    assert Llama2cTokenizer.from_file(tmp_path / "t.bin").vocab_size == 512  # size from the file's length


# ---------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    if not (STORIES / "tok512.bin").is_file():
        pytest.skip(f"tok512.bin not found in {STORIES} (shared models folder absent)")
    return Llama2cTokenizer.from_file(STORIES / "tok512.bin", 512)


def test_vocabulary_layout(tok):
    assert tok.pieces[:3] == [b"<unk>", b"\n<s>\n", b"\n</s>\n"] and tok.pieces[3 + 0x41] == b"<0x41>"
    assert tok.pieces[259] == b" t" and tok.scores[259] == 0 and tok.scores[511] == -252


def test_encode_hand_computed_cases(tok):
    assert tok.encode("") == [1]
    assert tok.encode("", bos=False) == []
    assert tok.encode("", eos=True) == [1, 2]
    space = tok.lookup[b" "]
    assert tok.encode("t", bos=False) == [tok.lookup[b" t"]]  # dummy prefix " " + "t" merge into " t"
    # "the": " "+"t" -> " t" (score 0, the best merge), "h"+"e" -> "he" (-1), then " t"+"he" -> " the"
    assert tok.encode("the") == [1, tok.lookup[b" the"]]
    # "你" is not a piece: its three UTF-8 bytes fall back to byte tokens (id = byte + 3), nothing merges
    assert tok.encode("你") == [1, space] + [b + 3 for b in "你".encode()]
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert [tok.pieces[i] for i in tok.encode("Once upon a time")[1:]] == [b" Once", b" upon", b" a", b" time"]


def test_decode_conventions(tok):
    assert tok.decode([1, tok.lookup[b" Once"]]) == "Once"  # leading space dropped after BOS only
    assert tok.decode([tok.lookup[b" Once"]]) == " Once"
    assert tok.decode([1, 0xE4 + 3, 0xBD + 3, 0xA0 + 3, 2]) == "你"  # bytes joined across pieces, EOS is no text
    assert tok.decode([1, 0xE4 + 3]) == "\ufffd"  # an incomplete character decodes to U+FFFD, not an error


@pytest.mark.parametrize(
    "text",
    [
        "Once upon a time, there was a little girl named Lily.",
        "Hello  world!\n\tTabs",
        "naïve café — “quoted” 你好 🙂",
        "a",
        " leading space",
        "<0x41> and <s>",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_heap_merge_equals_run_c_loop(tok):
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz     ,.!'\"TLSOH\n") + ["é", "你", "🙂"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        unmerged = [1] + ([tok.space_id] if text else [])
        for ch in text:
            b = ch.encode()
            unmerged += [tok.lookup[b]] if b in tok.lookup else [x + 3 for x in b]
        assert tok.merge(unmerged) == naive_merge(tok, unmerged) == tok.encode(text)


def test_save_writes_the_same_bytes(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "llama2c_tokenizer.bin" and path.read_bytes() == (STORIES / "tok512.bin").read_bytes()
    again = Llama2cTokenizer.from_file(path, 512)
    assert again.encode("Once upon a time") == tok.encode("Once upon a time")


@needs_stories
def test_stories260k_stops_at_bos_as_run_c_does(one_thread):
    """llama2.c's data starts every story with BOS, and run.c stops when the model samples it. Greedy from BOS:
    the output is the plain loop's tokens up to the next BOS, not a second story; ignore_eos goes on past it."""
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams

    plain = load(STORIES / "stories260K.bin", prepare=False).model
    loaded = load(STORIES / "stories260K.bin")  # as `lmforge generate` loads it: the fast decode path
    model, tok = loaded.model, loaded.tokenizer
    steps = 400
    reference = greedy(plain, [tok.bos_id], steps, cached=False)[1:]
    assert tok.bos_id in reference, "the model starts another story within 400 tokens"
    [c] = generate(model, [[tok.bos_id]], SamplingParams(max_tokens=steps, temperature=0), tokenizer=tok)
    assert c.tokens == reference[: reference.index(tok.bos_id)] and c.finish_reason == "stop"
    assert c.text.startswith("Once upon a time") and c.text.count("Once upon a time") == 1
    [c] = generate(
        model, [[tok.bos_id]], SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True), tokenizer=tok
    )
    assert c.tokens == reference
