"""Tokenizers: round trips on hard text, the PyTorch word-LM reference, save/load, and clear errors."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from lmforge.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    TokenizerError,
    WordTokenizer,
    load_tokenizer,
    train_tokenizer,
)

HARD_TEXT = "Hello, wörld!\n\t日本語のテキスト 中文 🤖👍🏽 e\u0301 (combining)\r\nend  two  spaces\n\n"
ENGLISH = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40

WIKI_LIKE = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing video game . \n"
    " The game began development in 2010 , carrying over a large portion of the work . \n"
    " It met with positive sales in Japan , and was praised by both Japanese and western critics . \n"
)


def pytorch_word_lm_reference(path):
    """pytorch/examples word_language_model/data.py: Dictionary + Corpus.tokenize, as written there."""
    word2idx, idx2word = {}, []
    with open(path, encoding="utf8") as f:
        for line in f:
            for word in line.split() + ["<eos>"]:
                if word not in word2idx:
                    idx2word.append(word)
                    word2idx[word] = len(idx2word) - 1
    ids = []
    with open(path, encoding="utf8") as f:
        for line in f:
            ids.extend(word2idx[w] for w in line.split() + ["<eos>"])
    return idx2word, ids


def test_char_round_trips_arbitrary_utf8():
    tok = train_tokenizer("char", [HARD_TEXT])
    assert tok.vocab == sorted(set(HARD_TEXT))
    assert tok.vocab_size == len(set(HARD_TEXT))
    ids = tok.encode(HARD_TEXT)
    assert len(ids) == len(HARD_TEXT)
    assert tok.decode(ids) == HARD_TEXT
    assert (tok.eos_id, tok.bos_id, tok.kind) == (None, None, "char")


def test_char_unknown_character_names_it_and_its_position():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match="position 0"):
        tok.encode("🤖")


def test_char_takes_no_vocab_size():
    with pytest.raises(TokenizerError, match="char"):
        train_tokenizer("char", ["abc"], vocab_size=10)


def test_bpe_round_trips_text_it_never_saw():
    tok = train_tokenizer("bpe", [ENGLISH], vocab_size=300)
    assert tok.vocab_size == 300
    assert tok.eos_id == tok.tok.token_to_id("<|endoftext|>")
    for text in (HARD_TEXT, ENGLISH, "\x00\x7f tabs\tand\nnewlines", "a<|endoftext|>b", ""):
        assert tok.decode(tok.encode(text)) == text
    # byte-level: the special token is one id, not bytes, when it appears in the text
    assert tok.eos_id in tok.encode("a<|endoftext|>b")
    # merges were learned: common English is shorter than its bytes
    assert len(tok.encode(ENGLISH)) < len(ENGLISH.encode("utf-8")) / 2


def test_bpe_encode_batch_equals_encode():
    tok = train_tokenizer("bpe", [ENGLISH], vocab_size=300)
    texts = [ENGLISH[:500], HARD_TEXT, "x"]
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t) for t in texts]


def test_bpe_vocab_size_too_small_is_clear():
    with pytest.raises(TokenizerError, match="at least 257"):
        train_tokenizer("bpe", [ENGLISH], vocab_size=100)


def test_bpe_saved_file_loads_in_hugging_face(tmp_path):
    tok = train_tokenizer("bpe", [ENGLISH], vocab_size=300)
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json"
    hf = HFTokenizer.from_file(str(path))
    assert hf.encode(HARD_TEXT, add_special_tokens=False).ids == tok.encode(HARD_TEXT)
    assert hf.decode(tok.encode(HARD_TEXT)) == HARD_TEXT


def test_bpe_saved_file_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer("bpe", [ENGLISH], vocab_size=300)
    tok.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(HARD_TEXT, add_special_tokens=False)["input_ids"] == tok.encode(HARD_TEXT)


def test_bpe_from_file_finds_llama_style_special_tokens(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    # a tokenizer_config.json beside it names the tokens explicitly, as HF model folders do
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert BPETokenizer.from_file(tmp_path / "tokenizer.json").eos_id == 0


def test_bpe_from_file_rejects_garbage(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        BPETokenizer.from_file(tmp_path / "tokenizer.json")


def test_word_matches_pytorch_word_language_model(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(WIKI_LIKE, encoding="utf-8")
    ref_vocab, ref_ids = pytorch_word_lm_reference(path)
    tok = train_tokenizer("word", [WIKI_LIKE])
    assert tok.vocab == ref_vocab  # <unk> is in the text, so nothing is appended
    assert tok.encode(WIKI_LIKE) == ref_ids
    assert tok.eos_id == ref_vocab.index("<eos>")


def test_word_unknown_words_and_decode():
    tok = WordTokenizer.train(["the cat sat\n"])
    assert tok.vocab == ["the", "cat", "sat", "<eos>", "<unk>"]
    assert tok.encode("the dog  sat") == [0, 4, 2, 3]
    assert tok.decode([0, 1, 3, 3, 2, 3]) == "the cat\n\nsat\n"
    text = "the cat\n\nsat\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("  the\tcat  \r\nsat")) == "the cat\nsat\n"  # whitespace normalised


def test_word_vocab_cap_keeps_most_frequent_ties_by_first_appearance():
    text = "c b a a\nb d e a\n"  # a:3, b:2, then c, d, e once each (first seen in that order)
    tok = train_tokenizer("word", [text], vocab_size=5)  # <eos>, <unk> + 3 words
    assert tok.vocab_size == 5
    assert set(tok.vocab) == {"a", "b", "c", "<eos>", "<unk>"}
    assert tok.vocab == ["c", "b", "a", "<eos>", "<unk>"]  # ids still in order of first appearance
    assert tok.decode(tok.encode("d e a")) == "<unk> <unk> a\n"
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer("word", [text], vocab_size=1)


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    vocab_size = 300 if kind == "bpe" else None
    tok = train_tokenizer(kind, [ENGLISH, HARD_TEXT], vocab_size)
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(tok)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id, loaded.bos_id) == (
        tok.kind,
        tok.vocab_size,
        tok.eos_id,
        tok.bos_id,
    )
    assert loaded.encode(HARD_TEXT) == tok.encode(HARD_TEXT)


def test_saving_one_kind_replaces_the_other(tmp_path):
    train_tokenizer("bpe", [ENGLISH], 300).save(tmp_path)
    train_tokenizer("char", [ENGLISH]).save(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert load_tokenizer(tmp_path).kind == "char"


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "lmforge_tokenizer.json").write_text('{"kind": "char"')
    with pytest.raises(TokenizerError, match="lmforge_tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "lmforge_tokenizer.json").write_text('{"kind": "char", "vocab": ["b", "a"]}')
    with pytest.raises(TokenizerError, match="lmforge_tokenizer.json is corrupt"):
        load_tokenizer(tmp_path)


def test_unknown_kind_and_bad_ids():
    with pytest.raises(TokenizerError, match="'sentencepiece'"):
        train_tokenizer("sentencepiece", ["abc"])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        train_tokenizer("char", ["abc"]).decode([3])


def _sentencepiece_style(tmp_path):
    """A Llama-2-style tokenizer.json (Metaspace pre-tokenizer and decoder: the leading space of a decode's first
    token is dropped), trained here by `tokenizers`."""
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([ENGLISH, HARD_TEXT], vocab_size=300, show_progress=False)
    sp.save(str(tmp_path / "tokenizer.json"))
    return BPETokenizer.from_file(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("kind", ["char", "word", "bpe", "sentencepiece", "llama2c"])
def test_incremental_decoding_gives_the_whole_decode_after_every_push(kind, tmp_path):
    """What a stream shows is IncrementalDecoder's text: after every push it must be the whole decode of the ids so
    far (or that decode less an unfinished multi-byte character), and exactly the whole decode at the end, for
    random ids in random chunks, invalid byte sequences included."""
    import random

    from lmforge.tokenizer import IncrementalDecoder

    if kind == "sentencepiece":
        tok = _sentencepiece_style(tmp_path)
    elif kind == "llama2c":
        from pathlib import Path

        path = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K" / "tok512.bin"
        if not path.is_file():
            pytest.skip(f"llama2c tokenizer not found at {path} (shared models folder absent)")
        from lmforge.tokenizer import Llama2cTokenizer

        tok = Llama2cTokenizer.from_file(path)
    else:
        tok = train_tokenizer(kind, [ENGLISH + HARD_TEXT], vocab_size=400 if kind == "bpe" else None)
    rng = random.Random(0)
    for trial in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        if trial % 2:  # real text too: multi-byte characters split over byte tokens
            ids = tok.encode(HARD_TEXT)[: rng.randrange(1, 40)] + ids[:5]
        decoder, n = IncrementalDecoder(tok), 0
        while n < len(ids):
            step = rng.randrange(1, 4)
            final = n + step >= len(ids)
            text = decoder.push(ids[n : n + step], final=final)
            n += step
            whole = tok.decode(ids[:n])
            if final or not whole.endswith("\ufffd"):
                assert text == whole, (kind, trial, ids[:n])
            else:
                assert whole.startswith(text)


def test_a_byte_level_tokenizer_is_read_a_token_at_a_time_and_still_gives_the_whole_decode(tmp_path):
    """Byte-level BPE decodes to its tokens' bytes read as UTF-8, so IncrementalDecoder reads its bytes a token at
    a time (BPETokenizer.utf8_pieces); Metaspace's leading-space rule is not that, so it keeps the windowed
    decodes. The byte reading must equal the Rust decoder's whole decode on random ids (lone continuation bytes,
    split characters, the special end token) after every final push, and be a prefix of it before."""
    import random

    from lmforge.tokenizer import IncrementalDecoder

    tok = train_tokenizer("bpe", [ENGLISH + HARD_TEXT], vocab_size=400)
    assert tok.utf8_pieces is not None and _sentencepiece_style(tmp_path).utf8_pieces is None
    rng = random.Random(1)
    hard = tok.encode(HARD_TEXT)
    for trial in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        if trial % 3 == 0:
            start = rng.randrange(len(hard))
            ids = hard[start : start + rng.randrange(1, 30)] + ids[: rng.randrange(3)] + [tok.eos_id]
        decoder = IncrementalDecoder(tok)
        assert decoder.utf8 is not None
        for n in range(1, len(ids) + 1):
            text = decoder.push(ids[n - 1 : n], final=n == len(ids))
            whole = tok.decode(ids[:n])
            assert text == whole if n == len(ids) else whole.startswith(text), (trial, ids[:n])
