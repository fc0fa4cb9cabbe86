"""Fixtures shared by the training tests (trainer, torchrun, tuning)."""

import pytest

from lmforge.data import prepare

TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n" * 40


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A char-level data folder prepared from TEXT (read-only: tests write their runs elsewhere)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    prepare(folder / "corpus.txt", folder / "prepared", tokenizer="char")
    return str(folder / "prepared")
