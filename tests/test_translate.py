"""Translation: the split, the prompt format in the model folder, decoding against a naive loop, scoring against
hand-computed BLEU and sacrebleu, and `lmforge translate` end to end on a model trained here to memorise pairs."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

from lmforge.apps.translate import (
    FORMAT_FILE,
    Pair,
    PromptFormat,
    TranslationDataError,
    clean_output,
    format_texts,
    load_translator,
    pair_example,
    read_pairs,
    score,
    split_pairs,
    train_translator,
    translate,
)
from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
CMN = SHARED / "data" / "translation" / "cmn.txt"

PAIRS = [Pair("Hi.", "你好。"), Pair("Run!", "快跑！"), Pair("I'm cold.", "我冷。"), Pair("Thank you.", "谢谢你。")]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ data


def synthetic_pairs(n_sources: int = 300) -> list[Pair]:
    rng = random.Random(0)
    pairs = []
    for i in range(n_sources):
        for j in range(rng.choice([1, 1, 1, 2, 3])):  # some sources have several translations
            pairs.append(Pair(f"sentence {i}.", f"句子{i}-{j}。", f"CC-BY #{i}", len(pairs) + 1))
    return pairs


def test_split_is_deterministic_disjoint_and_exact():
    pairs = synthetic_pairs()
    split = split_pairs(pairs, n_test=50, n_val=30, seed=0)
    assert (len(split.test), len(split.val)) == (50, 30)
    assert len(split.train) == len(pairs) - 80
    sources = [{p.src for p in part} for part in (split.train, split.val, split.test)]
    assert not (sources[0] & sources[1]) and not (sources[0] & sources[2]) and not (sources[1] & sources[2])
    assert sorted(p.line for part in (split.train, split.val, split.test) for p in part) == [p.line for p in pairs]
    assert split == split_pairs(pairs, n_test=50, n_val=30, seed=0)
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)  # membership comes from a hash of the source, not from file order
    again = split_pairs(shuffled, n_test=50, n_val=30, seed=0)
    assert {p.line for p in again.test} == {p.line for p in split.test}
    assert {p.line for p in split_pairs(pairs, 50, 30, seed=1).test} != {p.line for p in split.test}
    with pytest.raises(ValueError, match="leaves no training pairs"):
        split_pairs(pairs[:10], n_test=5, n_val=5)


def test_split_of_the_shared_corpus():
    if not CMN.is_file():
        pytest.skip(f"translation corpus not found at {CMN}")
    pairs = read_pairs(CMN)
    assert len(pairs) == 29155 and all(p.attribution.startswith("CC-BY") for p in pairs)
    split = split_pairs(pairs)
    assert (len(split.test), len(split.val), len(split.train)) == (1000, 500, 27655)
    assert not {p.src for p in split.test} & {p.src for p in split.train}


def test_bad_pairs_files_name_the_line(tmp_path):
    missing = tmp_path / "missing_column.txt"
    missing.write_text("Hi.\t你好。\tCC-BY\n\nRun!\t快跑！\nno tab here\n", encoding="utf-8")
    with pytest.raises(TranslationDataError, match=r"missing_column\.txt:4: expected 'source<TAB>target.*one column"):
        read_pairs(missing)
    empty_target = tmp_path / "empty_target.txt"
    empty_target.write_text("Hi.\t你好。\nRun!\t \n", encoding="utf-8")
    with pytest.raises(TranslationDataError, match=r"empty_target\.txt:2: .*an empty target"):
        read_pairs(empty_target)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Hi.\t你好。\n".encode() + "Café\tcafé\n".encode("latin-1"))
    with pytest.raises(TranslationDataError, match=r"latin1\.txt:2: not valid UTF-8 \(byte 0xe9"):
        read_pairs(latin1)
    with pytest.raises(FileNotFoundError, match="pairs file not found"):
        read_pairs(tmp_path / "nope.txt")
    ok = tmp_path / "ok.txt"
    ok.write_text("Hi.\t你好。\tCC-BY 2.0 #1\r\nRun!\t快跑！\n", encoding="utf-8")
    assert read_pairs(ok) == [Pair("Hi.", "你好。", "CC-BY 2.0 #1", 1), Pair("Run!", "快跑！", "", 2)]


# ------------------------------------------------------------------------------------------------ format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model folder (weights scaled up so greedy paths vary) with a BPE tokenizer and a format."""
    fmt = PromptFormat(template="English: {src}\nChinese:")
    tok = train_tokenizer("bpe", format_texts(synthetic_pairs(50) + PAIRS, fmt), 300)
    fmt = fmt.with_end_for(tok)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig.from_name("gpt-nano", vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2)
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_model(folder, model, tok)
    fmt.save(folder)
    return folder, model, tok, fmt


def test_prompt_format_round_trips_through_the_model_folder(tiny, tmp_path):
    folder, _, tok, fmt = tiny
    assert fmt.end == "<|endoftext|>" and fmt.end_id(tok) == tok.eos_id
    _, _, loaded = load_translator(str(folder))
    assert loaded == fmt
    assert loaded.prompt("Hi.") == "English: Hi.\nChinese:"
    ex = pair_example(tok, loaded, "Hi.", "你好。")
    n_prompt = len(tok.encode("English: Hi.\nChinese:"))
    assert ex.ids[:n_prompt] == tok.encode("English: Hi.\nChinese:") and ex.ids[-1] == tok.eos_id
    assert ex.mask == [False] * n_prompt + [True] * (len(ex.ids) - n_prompt)
    assert tok.decode(ex.ids[n_prompt:-1]) == "你好。"
    with pytest.raises(ValueError, match="must hold '{src}' exactly once"):
        PromptFormat(template="no placeholder")
    with pytest.raises(ValueError, match="encodes to 2 tokens"):
        PromptFormat(end="ab").end_id(train_tokenizer("char", ["abc"]))
    bare = tmp_path / "bare"
    save_model(bare, tiny[1], tok)
    with pytest.raises(FileNotFoundError, match=f"holds no {FORMAT_FILE}: not a translation model"):
        load_translator(str(bare))


# ------------------------------------------------------------------------------------------------ decoding


def naive_greedy(model, tokenizer, fmt, source: str, max_new_tokens: int) -> str:
    """Token-by-token argmax over the whole sequence each step: no cache, no batch, no padding."""
    ids = tokenizer.encode(fmt.prompt(source))
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == fmt.end_id(tokenizer):
            break
        out.append(nxt)
    return clean_output(tokenizer.decode(out))


def test_greedy_batch_equals_naive_argmax_and_beam_1(tiny):
    _, model, tok, fmt = tiny
    sources = ["Hi.", "I'm cold, very cold today.", "Run!", "sentence 12.", "Thank you."]
    greedy = translate(model, tok, fmt, sources, max_tokens=12, batch_size=3)
    assert greedy == [naive_greedy(model, tok, fmt, s, 12) for s in sources]
    assert translate(model, tok, fmt, sources, beam=1, max_tokens=12) == greedy
    assert len(translate(model, tok, fmt, sources, beam=3, max_tokens=12)) == len(sources)
    with pytest.raises(ValueError, match="beam=-1 must be >= 0"):
        translate(model, tok, fmt, sources, beam=-1)
    with pytest.raises(ValueError, match="source 0 .* makes a prompt of .* context is 64"):
        translate(model, tok, fmt, ["word " * 80])


# ------------------------------------------------------------------------------------------------ scoring


def test_scores_match_hand_computed_bleu_and_sacrebleu():
    # tokenize="zh" makes each CJK character a word: 5 vs 5 characters, one wrong at the end, so the 1..4-gram
    # precisions are 4/5, 3/4, 2/3, 1/2 and the brevity penalty is 1.
    assert score(["我们都爱你"], ["我们都爱他"])["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    hyps = ["我们都爱你。", "他在家。", "今天很冷", "Tom游泳。"]
    refs = ["我们都爱他。", "他在家里。", "今天很冷。", "汤姆在游泳。"]
    got = score(hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.metrics.BLEU(tokenize="zh").corpus_score(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.metrics.CHRF().corpus_score(hyps, [refs]).score)
    assert score(refs, refs) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    with pytest.raises(ValueError, match="2 translations but 1 references"):
        score(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (through lmforge.apps.finetune) until it has memorised four pairs."""
    out = tmp_path_factory.mktemp("run") / "translator"
    summary = train_translator(
        PAIRS,
        PAIRS[:2],
        out,
        vocab_size=300,
        preset="gpt-nano",
        model_overrides=dict(n_layer=1, n_embd=32, n_head=2, block_size=32),
        lr=1e-2,
        batch_size=4,
        epochs=80,
        warmup_iters=5,
        eval_interval=50,
    )
    return out, summary


def test_lmforge_translate_end_to_end(trained, tmp_path, capsys):
    out, summary = trained
    assert summary["model_dir"] == str(out / "best") and not (out / "init").exists()
    assert PromptFormat.load(out / "best") == PromptFormat(end="<|endoftext|>")
    model, tok, fmt = load_translator(str(out))
    assert translate(model, tok, fmt, [p.src for p in PAIRS]) == [p.tgt for p in PAIRS]
    assert translate(model, tok, fmt, [p.src for p in PAIRS], beam=4) == [p.tgt for p in PAIRS]
    run = subprocess.run(
        [sys.executable, "-m", "lmforge", "translate", str(out), "--text", "I'm cold.", "--beam", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "我冷。\n"
    sources = tmp_path / "sources.txt"
    sources.write_text("Run!\n\nThank you.\n", encoding="utf-8")
    assert main(["translate", str(out), "--file", str(sources)]) == 0
    assert capsys.readouterr().out == "快跑！\n谢谢你。\n"


def test_lmforge_translate_errors_are_clear(trained, tmp_path, capsys):
    out, _ = trained
    assert main(["translate", str(out)]) == 1
    assert "nothing to translate: pass --text SENTENCE or --file PATH" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Café\n".encode("latin-1"))
    assert main(["translate", str(out), "--file", str(bad)]) == 1
    assert "latin1.txt is not valid UTF-8" in capsys.readouterr().err
    assert main(["translate", str(tmp_path / "nowhere"), "--text", "Hi."]) == 1
    assert "model folder not found" in capsys.readouterr().err
