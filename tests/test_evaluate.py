"""`lmforge eval` scores only data whose token ids mean to the model what they meant when the data was made: data
prepared with another tokenizer is refused (the issue's case: a smaller vocabulary, which used to print a loss)."""

import json
import shutil

import pytest

from lmforge.cli import main
from lmforge.data import prepare
from lmforge.evaluate import tokenizer_digest
from lmforge.tokenizer import TOKENIZER_FILES, load_tokenizer, train_tokenizer
from lmforge.train.trainer import TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n" * 40


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(
        TrainConfig(
            data=data_dir,
            out=str(out),
            n_layer=1,
            n_head=2,
            n_embd=16,
            block_size=16,
            max_iters=2,
            eval_interval=2,
            eval_iters=1,
            progress=False,
        )
    )
    return out


def test_data_made_with_another_tokenizer_is_refused(run, tmp_path, capsys):
    (tmp_path / "other.txt").write_text("a cab, a bad cab; a dab.\n" * 200, encoding="utf-8")
    other = prepare(tmp_path / "other.txt", tmp_path / "other", tokenizer="char")
    assert other["vocab_size"] < json.loads((run / "best" / "config.json").read_text())["vocab_size"]
    assert main(["eval", str(run), str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert "another tokenizer than the model's" in err and f"--tokenizer-from {run}" in err
    # the same text prepared with the model's own tokenizer is scored
    (tmp_path / "same.txt").write_text(TEXT[::-1], encoding="utf-8")
    prepare(tmp_path / "same.txt", tmp_path / "same", tokenizer_from=run / "best")
    assert main(["eval", str(run), str(tmp_path / "same")]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_a_folder_without_a_tokenizer_is_scored_with_a_note_that_nothing_was_checked(run, data_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(data_dir, bare)
    for name in TOKENIZER_FILES:  # an old data folder, or one whose tokenizer was lost
        (bare / name).unlink(missing_ok=True)
    assert main(["eval", str(run), str(bare)]) == 0
    assert "keeps no tokenizer: cannot check" in capsys.readouterr().err


def test_the_digest_follows_what_ids_mean_not_the_files():
    a = train_tokenizer("bpe", [TEXT], vocab_size=300)
    b = train_tokenizer("bpe", [TEXT.upper()], vocab_size=300)
    assert tokenizer_digest(a) != tokenizer_digest(b)
    assert tokenizer_digest(train_tokenizer("char", [TEXT])) != tokenizer_digest(train_tokenizer("char", ["xyz"]))


def test_a_saved_and_reloaded_tokenizer_keeps_its_digest(tmp_path):
    for kind, size in (("bpe", 300), ("char", None), ("word", None)):
        tok = train_tokenizer(kind, [TEXT], vocab_size=size)
        tok.save(tmp_path / kind)
        assert tokenizer_digest(load_tokenizer(tmp_path / kind)) == tokenizer_digest(tok), kind
