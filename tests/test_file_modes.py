"""Every file and folder lmforge writes follows the user's umask, like the files beside it: no 0600 weights among
0644 configs (safetensors' save_file writes through a temporary file of its own, mode 0600).

The commands run as a user with umask 027 would run them, so a mode that merely happens to be 0644 fails too."""

import os
import stat
import subprocess
import sys

LMFORGE = [sys.executable, "-m", "lmforge"]
UMASK = 0o027
TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n" * 40


def lmforge(*args, cwd):
    run = subprocess.run(
        LMFORGE + [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(UMASK),
    )
    assert run.returncode == 0, f"{args}\n{run.stderr[-2000:]}"


def wrong_modes(folder):
    """Paths under folder whose permission bits are not what open()/mkdir() give under UMASK."""
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~UMASK
        if stat.S_IMODE(path.stat().st_mode) != want:
            wrong.append(f"{path.relative_to(folder.parent)}: {stat.S_IMODE(path.stat().st_mode):o}, not {want:o}")
    return wrong


def test_prepared_data_a_training_run_and_an_export_follow_the_umask(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    lmforge("prepare", "corpus.txt", "--tokenizer", "char", "--out", "data", cwd=tmp_path)
    lmforge(
        "train",
        "data",
        "run",
        "--max-iters",
        2,
        "--eval-interval",
        1,
        "--eval-iters",
        1,
        "--batch-size",
        2,
        "--block-size",
        16,
        "--no-progress",
        cwd=tmp_path,
    )
    lmforge("export", "run", "hf", cwd=tmp_path)
    for written in ("run/best/model.safetensors", "run/loss.png", "hf/model.safetensors"):
        assert (tmp_path / written).exists(), written
    assert wrong_modes(tmp_path / "data") + wrong_modes(tmp_path / "run") + wrong_modes(tmp_path / "hf") == []
