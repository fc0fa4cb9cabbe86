"""Fixtures shared by several test modules."""

import pytest
import torch

from lmforge.data import prepare

TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n" * 40


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A char-level data folder prepared from TEXT (read-only: tests write their runs elsewhere)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    prepare(folder / "corpus.txt", folder / "prepared", tokenizer="char")
    return str(folder / "prepared")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine spinning thread pools make them slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        help="also run the tests marked slow (minutes in all); `make test` and CI pass it",
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are opt-in locally: skipped, with the reason, unless --run-slow is given."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run it (make test and CI do)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
