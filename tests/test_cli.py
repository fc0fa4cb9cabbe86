"""The command line: every verb has working help built from its docstring, and errors are one clear line."""

import subprocess
import sys

import pytest

from lmforge.cli import COMMANDS, load, main, parse_docstring


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_help_of_every_command(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"lmforge {verb}" in out
    summary, args = parse_docstring(load(verb).__doc__)
    assert summary and summary.split("\n")[0][:40] in " ".join(out.split())
    for name in args:  # every documented argument is a flag or positional with its help text
        assert name.replace("_", "-") in out or name in out


def test_every_parameter_is_documented():
    import inspect

    for verb in COMMANDS:
        fn = load(verb)
        _, args = parse_docstring(fn.__doc__)
        missing = set(inspect.signature(fn).parameters) - set(args)
        assert not missing, f"lmforge {verb}: undocumented parameters {sorted(missing)}"


def test_top_level_help_lists_commands_as_a_real_process():
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in COMMANDS:
        assert verb in out


def test_unknown_command_and_bad_input_are_clear(tmp_path, capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "missing" in err


def test_a_list_flag_given_twice_keeps_every_value_and_replaces_its_default():
    import argparse

    from lmforge.cli import add_function_arguments

    def fn(space: list[str] = ["x=1"], sizes: list[int] = [1, 8]) -> int:  # noqa: B006
        """Args:
            space: specs.
            sizes: sizes.
        """
        return 0

    parser = argparse.ArgumentParser()
    add_function_arguments(parser, fn)
    args = parser.parse_args(["--space", "a=1", "b=2", "--space", "c=3", "--sizes", "4"])
    assert args.space == ["a=1", "b=2", "c=3"] and args.sizes == [4]
    assert parser.parse_args([]).sizes == [1, 8]
