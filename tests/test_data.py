"""Data: corpora and splits, prepare's files and errors, downloads, and batches against their references."""

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import corpus
from lmforge import data as data_mod
from lmforge.corpus import DataError, Document, download, read_text
from lmforge.data import (
    encode_documents,
    eval_windows,
    load_meta,
    load_split,
    prepare,
    random_batch,
    sequential_batches,
)
from lmforge.tokenizer import load_tokenizer, train_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


def read_all(out_dir):
    """Every split decoded back to text, through the files prepare wrote."""
    tok = load_tokenizer(out_dir)
    return {s: tok.decode(load_split(out_dir, s).tolist()) for s in load_meta(out_dir)["splits"]}


# ---------------------------------------------------------------------------------------- reading


def test_read_text_invalid_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"bad\.txt.*byte offset 6.*--errors replace"):
        read_text(path)
    assert read_text(path, errors="replace") == "hello \ufffd world"


def test_read_text_missing_file_and_newlines(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "crlf.txt").write_bytes(b"a\r\nb\rc\n")
    assert read_text(tmp_path / "crlf.txt") == "a\nb\nc\n"  # as open() in text mode


# ---------------------------------------------------------------------------------------- prepare


def test_prepare_file_char_tail_split(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    meta = prepare(src, tmp_path / "out")
    n = len(TEXT)
    assert meta["splits"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == len(set(TEXT))
    assert load_meta(tmp_path / "out") == meta
    train = np.memmap(tmp_path / "out" / "train.bin", dtype=np.uint16, mode="r")
    assert len(train) == int(n * 0.9)
    assert read_all(tmp_path / "out") == {"train": TEXT[: int(n * 0.9)], "val": TEXT[int(n * 0.9) :]}


def test_prepare_bpe_separates_documents_with_eos(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT)
    meta = prepare(src, tmp_path / "out", tokenizer="bpe", vocab_size=300)
    train = load_split(tmp_path / "out", "train")
    assert meta["eos_id"] is not None and train[-1] == meta["eos_id"]
    assert read_all(tmp_path / "out")["train"] == TEXT[: int(len(TEXT) * 0.9)] + "<|endoftext|>"


def test_encoding_in_chunks_equals_encoding_whole(monkeypatch):
    tok = train_tokenizer("bpe", [TEXT], 300)
    text = TEXT + "\n\n  indented\n\tcode\n" * 50
    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 64)
    monkeypatch.setattr(data_mod, "BATCH_CHARS", 200)
    assert len(data_mod._chunks(text)) > 10
    ids = encode_documents(tok, [Document("a", text), Document("b", "x")])
    assert ids.tolist() == tok.encode(text) + [tok.eos_id] + tok.encode("x") + [tok.eos_id]


def make_folder(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"text of {name}\n" * 5)


def test_prepare_folder_holds_out_whole_files_stably(tmp_path):
    names = [f"doc{i:02d}.txt" for i in range(30)] + ["sub/inner.txt"]
    make_folder(tmp_path / "corpus", names)
    (tmp_path / "corpus" / ".hidden.txt").write_text("SECRET")
    (tmp_path / "corpus" / ".git").mkdir()
    (tmp_path / "corpus" / ".git" / "config").write_text("SECRET")
    (tmp_path / "corpus" / "blob.bin").write_bytes(b"\x00\x01binary")
    meta = prepare(tmp_path / "corpus", tmp_path / "out", tokenizer="bpe", vocab_size=300)
    assert meta["split_method"] == "file-hash"
    texts = read_all(tmp_path / "out")
    assert "SECRET" not in texts["train"] + texts["val"] and "binary" not in texts["train"]
    held_out = {n for n in names if f"text of {n}" in texts["val"]}
    assert held_out and all(f"text of {n}" not in texts["train"] for n in held_out)
    assert meta["documents"] == {"train": len(names) - len(held_out), "val": len(held_out)}

    # Adding files does not move existing ones between splits.
    make_folder(tmp_path / "corpus", [f"new{i}.txt" for i in range(10)])
    prepare(tmp_path / "corpus", tmp_path / "out2", tokenizer="char")
    val2 = read_all(tmp_path / "out2")["val"]
    assert {n for n in names if f"text of {n}" in val2} == held_out


def test_prepare_small_folder_falls_back_to_tail_split(tmp_path):
    make_folder(tmp_path / "corpus", ["only.txt"])
    meta = prepare(tmp_path / "corpus", tmp_path / "out")
    assert meta["split_method"] == "tail" and meta["splits"]["val"] > 0


def test_prepare_given_splits_word(tmp_path):
    corpus = tmp_path / "wiki"
    corpus.mkdir()
    (corpus / "train.txt").write_text(" = A = \n the cat sat \n the dog sat \n")
    (corpus / "valid.txt").write_text(" the cat ran \n")
    (corpus / "test.txt").write_text(" a dog \n")
    meta = prepare(corpus, tmp_path / "out", tokenizer="word")
    assert meta["split_method"] == "given" and meta["val_fraction"] is None
    assert meta["splits"] == {"train": 12, "val": 4, "test": 3}  # words + one <eos> per line
    assert read_all(tmp_path / "out") == {
        "train": "= A =\nthe cat sat\nthe dog sat\n",
        "val": "the cat <unk>\n",  # trained on train only
        "test": "<unk> dog\n",
    }


def test_prepare_given_splits_needs_validation_file(tmp_path):
    (tmp_path / "train.txt").write_text("abc\n")
    with pytest.raises(DataError, match="valid.txt or val.txt"):
        prepare(tmp_path, tmp_path / "out")


def test_prepare_python_stdlib_with_max_chars(tmp_path):
    meta = prepare("python-stdlib", tmp_path / "out", max_chars=20_000)
    assert sum(meta["splits"].values()) == 20_000  # char: one token per character
    texts = read_all(tmp_path / "out")
    assert "import" in texts["train"] + texts["val"]
    root, names = corpus.python_stdlib_files()
    assert len(set(names)) == len(names) and all(n.endswith(".py") for n in names)
    assert names == corpus.python_stdlib_files()[1]  # a stable order
    assert names[:50] != sorted(names)[:50]  # not alphabetical: a capped corpus samples the whole library
    assert not any(
        part in ("site-packages", "test", "tests", "idle_test", "encodings") for n in names for part in n.split("/")
    )


def test_prepare_invalid_utf8_and_replace(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("café au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match=r"latin1\.txt.*byte offset 3"):
        prepare(src, tmp_path / "out")
    meta = prepare(src, tmp_path / "out", errors="replace")
    assert "\ufffd" in load_tokenizer(tmp_path / "out").vocab
    assert meta["errors"] == "replace"


def test_prepare_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(DataError, match="train split of .*one.txt has no tokens"):
        prepare(tmp_path / "one.txt", tmp_path / "out")
    with pytest.raises(DataError, match="missing.txt.*not an existing file"):
        prepare(tmp_path / "missing.txt", tmp_path / "out")
    with pytest.raises(DataError, match="val_fraction"):
        prepare(tmp_path / "one.txt", tmp_path / "out", val_fraction=1.5)
    assert not (tmp_path / "out").exists()


def test_failed_prepare_leaves_earlier_folder_intact(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(TEXT)
    prepare(good, tmp_path / "out", tokenizer="bpe", vocab_size=300)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xfe" * 100)
    with pytest.raises(DataError):
        prepare(bad, tmp_path / "out", tokenizer="char")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_prepare_with_tokenizer_from_and_stale_files(tmp_path):
    corpus = tmp_path / "wiki"
    corpus.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):
        (corpus / name).write_text(TEXT)
    prepare(corpus, tmp_path / "tok", tokenizer="char")
    src = tmp_path / "other.txt"
    src.write_text(TEXT[:500])
    prepare(src, tmp_path / "tok2", tokenizer_from=tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok2").vocab == load_tokenizer(tmp_path / "tok").vocab
    # re-preparing a folder without a test split removes the old test.bin
    prepare(src, tmp_path / "tok")
    assert not (tmp_path / "tok" / "test.bin").exists()
    with pytest.raises(DataError, match=r"test\.bin.*lmforge prepare"):
        load_split(tmp_path / "tok", "test")


def test_load_split_without_prepare(tmp_path):
    with pytest.raises(DataError, match=r"meta\.json.*lmforge prepare"):
        load_split(tmp_path, "train")


# ---------------------------------------------------------------------------------------- download


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_good_bad_and_missing(http_root, tmp_path):
    root, base = http_root
    payload = b"some corpus\n" * 1000
    (root / "c.txt").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "cache" / "c.txt"

    with pytest.raises(DataError, match=f"sha256 {good}, expected {'0' * 64}"):
        download(f"{base}/c.txt", dest, "0" * 64, timeout=10)
    assert list(dest.parent.iterdir()) == []

    with pytest.raises(DataError, match="HTTP 404"):
        download(f"{base}/missing.txt", dest, good, timeout=10)
    assert list(dest.parent.iterdir()) == []

    assert download(f"{base}/c.txt", dest, good, timeout=10) == dest
    assert dest.read_bytes() == payload
    assert list(dest.parent.iterdir()) == [dest]


def test_tinyshakespeare_from_file_with_wrong_checksum(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    with pytest.raises(DataError, match="sha256 .* but tiny Shakespeare"):
        prepare("tinyshakespeare", tmp_path / "out", from_file=fake, cache_dir=tmp_path / "cache")


def test_tinyshakespeare_from_shared_copy(tmp_path):
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"shared tiny Shakespeare copy not found at {path}")
    meta = prepare("tinyshakespeare", tmp_path / "out", from_file=path, cache_dir=tmp_path / "cache")
    n = len(path.read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 65
    assert meta["splits"] == {"train": int(n * 0.9), "val": n - int(n * 0.9)}


# ---------------------------------------------------------------------------------------- batches


def test_random_batch_matches_nanogpt_get_batch():
    data = np.arange(1000, dtype=np.uint16) % 777
    x, y = random_batch(data, 4, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    ix = torch.randint(len(data) - 16, (4,), generator=torch.Generator().manual_seed(1))
    ref_x = torch.stack([torch.from_numpy(data[i : i + 16].astype(np.int64)) for i in ix])
    ref_y = torch.stack([torch.from_numpy(data[i + 1 : i + 17].astype(np.int64)) for i in ix])
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    with pytest.raises(DataError, match="block_size"):
        random_batch(data[:10], 2, 10, torch.Generator())


def test_sequential_batches_match_pytorch_batchify_get_batch():
    data = np.arange(103, dtype=np.uint16)
    bsz, bptt = 4, 7
    # pytorch/examples word_language_model: batchify + get_batch, (T, B) layout
    nbatch = len(data) // bsz
    source = torch.from_numpy(data[: nbatch * bsz].astype(np.int64)).view(bsz, -1).t().contiguous()
    ref = []
    for i in range(0, source.size(0) - 1, bptt):
        seq_len = min(bptt, len(source) - 1 - i)
        ref.append((source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]))
    got = list(sequential_batches(data, bsz, bptt))
    assert len(got) == len(ref) and got[-1][0].shape == (4, 3)  # 25 per stream: windows of 7, 7, 7, 3
    for (x, y), (rx, ry) in zip(got, ref):
        assert torch.equal(x, rx.t()) and torch.equal(y, ry.t())
        assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("stride", [None, 8, 3])
def test_eval_windows_score_every_target_once(stride):
    data = np.arange(50, dtype=np.uint16)
    scored = []
    for x, y, mask in eval_windows(data, block_size=8, stride=stride, batch_size=3):
        assert x.shape == y.shape == mask.shape and x.shape[1] == 8
        assert torch.equal(y, x + 1)  # data is arange, so targets are inputs shifted by one
        scored.extend(y[mask].tolist())
        if stride is not None and stride < 8:
            first_scored = mask.float().argmax(dim=1)
            assert (first_scored[1:] >= 8 - stride).all()  # later windows keep >= T - stride context
    assert sorted(scored) == list(range(1, 50))
    short = list(eval_windows(data[:5], block_size=8))
    assert short[0][0].shape == (1, 4) and short[0][2].all()
    with pytest.raises(DataError, match="stride"):
        next(eval_windows(data, block_size=8, stride=9))
