"""`lmforge demo` on a small slice of its corpus, as a user runs it: it says when its time cap cut training and
where the loss plot is, and every command it suggests next works as printed, the README's copy of them included."""

import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.demo import DEMO_RECIPE, demo, next_commands

LMFORGE = [sys.executable, "-m", "lmforge"]
README = Path(__file__).resolve().parent.parent / "README.md"


def suggestions(text: str) -> list[str]:
    """The commands listed under "next, try:" (two-space indented lines)."""
    after = text.split("next, try:\n", 1)[1]
    return [line.strip() for line in re.match(r"((?:  lmforge .*\n?)+)", after).group(1).splitlines()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A demo-like run in seconds: the demo itself on 60,000 characters, a small BPE and a small preset, capped at
    6 seconds of training long before its step budget."""
    root = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        LMFORGE
        + [
            "demo",
            "--out",
            str(root / "demo"),
            "--iters",
            "100000",
            "--minutes",
            "0.1",
            "--preset",
            "gpt-nano",
            "--max-chars",
            "60000",
            "--vocab-size",
            "300",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return root, run.stdout


def test_the_demo_says_that_its_time_cap_cut_training_and_where_the_loss_plot_is(demo_run):
    root, out = demo_run
    assert re.search(r"stopped at the 0\.1-minute cap after \d+ of 100000 steps", out), out
    [plot] = re.findall(r"loss curve: (.*)", out)
    assert Path(plot) == root / "demo" / "run" / "loss.png" and Path(plot).stat().st_size > 0


def test_every_command_the_demo_suggests_works_as_printed(demo_run):
    root, out = demo_run
    commands = suggestions(out)
    assert len(commands) >= 3
    for command in commands:
        for part in command.split(" && "):
            argv = shlex.split(part)
            assert argv[0] == "lmforge", command
            run = subprocess.run(LMFORGE + argv[1:], cwd=root, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{part}\n{run.stderr[-2000:]}"
            assert run.stdout.strip() or "train" in argv[1], part  # every command but train prints its result


def test_the_readme_suggests_exactly_what_the_demo_prints():
    defaults = {name: p.default for name, p in inspect.signature(demo).parameters.items()}
    out = Path(defaults["out"])
    expected = next_commands(out / "run", out / "data", out, DEMO_RECIPE["block_size"], defaults["minutes"])
    assert suggestions(README.read_text(encoding="utf-8")) == expected
