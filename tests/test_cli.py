"""The command line: every verb has working help built from one place per setting (a settings dataclass or the
function's docstring), `--config FILE.yaml` plus flags equals the flags alone, switches are pairs whose help says
what they turn on, errors are one clear line that spells settings as flags, and renamed flags still work."""

import argparse
import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import yaml

from lmforge.cli import (
    COMMANDS,
    Switch,
    add_function_arguments,
    call_arguments,
    load,
    main,
    parse_command,
    parse_docstring,
    settings_parameter,
)
from lmforge.settings import field_docs

VERBS = [(verb, None) for verb, target in COMMANDS.items() if isinstance(target, str)] + [
    (verb, action) for verb, target in COMMANDS.items() if isinstance(target, dict) for action in target
]
IDS = [f"{verb} {action}" if action else verb for verb, action in VERBS]


def documented(fn) -> dict[str, str]:
    """{setting: its help} of a verb's function, from wherever it is written."""
    settings = settings_parameter(fn)
    if settings is not None:
        return field_docs(settings[1])
    return parse_docstring(fn.__doc__)[1]


def settings_names(fn) -> list[str]:
    settings = settings_parameter(fn)
    if settings is not None:
        return [f.name for f in dataclasses.fields(settings[1])]
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("verb, action", VERBS, ids=IDS)
def test_help_of_every_command(verb, action, capsys):
    argv = [verb] + ([action] if action else []) + ["--help"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"lmforge {verb}" in out
    fn = load(verb, action)
    summary, _ = parse_docstring(fn.__doc__)
    flat = " ".join(out.split())
    assert summary and summary.split("\n")[0][:40] in flat
    for name, text in documented(fn).items():  # every setting is a flag or positional with its help text
        assert name.replace("_", "-") in out or name.upper() in out, name
        assert " ".join(text.split())[:30] in flat, name


@pytest.mark.parametrize("verb, action", VERBS, ids=IDS)
def test_every_setting_is_documented_once(verb, action):
    fn = load(verb, action)
    missing = set(settings_names(fn)) - set(documented(fn))
    assert not missing, f"lmforge {verb}: undocumented settings {sorted(missing)}"
    if settings_parameter(fn) is not None:  # a settings verb documents its settings in the dataclass only
        assert "Args:" not in (fn.__doc__ or "")


NEGATIVE = ("no ", "not ", "don't", "do not", "skip", "disable", "without", "drop", "omit", "turn off")


@pytest.mark.parametrize("verb, action", VERBS, ids=IDS)
def test_every_no_flag_is_the_off_side_of_a_switch_whose_help_says_what_it_turns_on(verb, action):
    parser = argparse.ArgumentParser()
    add_function_arguments(parser, load(verb, action))
    for act in parser._actions:
        offs = [o for o in act.option_strings if o.startswith("--no-")]
        if not offs:
            continue
        on = "--" + offs[0][len("--no-") :]
        assert isinstance(act, Switch) and on in act.option_strings, f"{offs[0]} is not paired with {on}"
        text = act.help.lower()
        assert not text.startswith(NEGATIVE), f"lmforge {verb} {on}: help describes turning it off: {act.help!r}"
        shown = dataclasses.MISSING
        for default, mark in ((True, "(default: on"), (False, "(default: off)")):
            if mark in act.help:
                shown = default
        if shown is True:
            assert f"{offs[0]} turns it off" in act.help
        for option, value in ((on, True), (offs[0], False)):
            namespace = argparse.Namespace()
            act(parser, namespace, [], option)
            assert getattr(namespace, act.dest) is value


def settings_of(argv: list[str]):
    """The settings dataclass a command line gives its verb."""
    _, _, fn, args = parse_command(argv)
    _, kwargs = call_arguments(fn, args)
    return next(iter(kwargs.values()))


# Per long-running verb: the command line alone; a config file that sets the same settings, some differently;
# and the command line that, with --config FILE, sets the differing ones back by flags.
CONFIG_CASES = {
    "train": (
        [
            "train",
            "DATA",
            "RUN",
            "--n-layer",
            "1",
            "--lr",
            "3e-3",
            "--max-iters",
            "50",
            "--no-progress",
            "--no-bias",
            "--logger",
            "tensorboard",
            "--batch-mode",
            "sequential",
        ],
        {
            "data": "DATA",
            "out": "RUN",
            "n_layer": 2,
            "lr": "1e-3",
            "max_iters": 50,
            "progress": True,
            "bias": True,
            "logger": None,
            "batch_mode": "sequential",
        },
        [
            "train",
            "--config",
            "FILE",
            "--n-layer",
            "1",
            "--lr",
            "3e-3",
            "--no-progress",
            "--no-bias",
            "--logger",
            "tensorboard",
        ],
    ),
    "finetune": (
        [
            "finetune",
            "BASE",
            "--data",
            "d.jsonl",
            "--out",
            "OUT",
            "--method",
            "full",
            "--lora-targets",
            "attn.qkv",
            "mlp.fc",
            "--max-iters",
            "8",
            "--merge",
            "--val-fraction",
            "0.2",
        ],
        {
            "base": "BASE",
            "data": "d.jsonl",
            "out": "elsewhere",
            "method": "lora",
            "lora_targets": ["lm_head"],
            "max_iters": 8,
            "merge": False,
            "val_fraction": 0.2,
        },
        [
            "finetune",
            "--config",
            "FILE",
            "--out",
            "OUT",
            "--method",
            "full",
            "--lora-targets",
            "attn.qkv",
            "mlp.fc",
            "--merge",
        ],
    ),
    "tune": (
        [
            "tune",
            "DATA",
            "OUT",
            "--space",
            "lr=1e-4:1e-2:log",
            "n_layer=1,2",
            "--fixed",
            "max_iters=20",
            "num_threads=1",
            "--trials",
            "3",
            "--no-prune",
            "--sampler",
            "random",
        ],
        {
            "data": "DATA",
            "out": "OUT",
            "space": {"lr": "1e-4:1e-2:log", "n_layer": "1,2"},
            "fixed": {"max_iters": 20, "num_threads": 1},
            "trials": 10,
            "prune": True,
            "sampler": "random",
        },
        ["tune", "--config", "FILE", "--trials", "3", "--no-prune"],
    ),
    "classify train": (
        [
            "classify",
            "train",
            "BASE",
            "--data",
            "a.txt",
            "b.txt",
            "--out",
            "OUT",
            "--epochs",
            "2",
            "--pooling",
            "mean",
            "--head-only",
            "--labels",
            "neg",
            "pos",
            "--no-select",
        ],
        {
            "base": "BASE",
            "data": ["a.txt"],
            "out": "OUT",
            "epochs": 5,
            "pooling": "last",
            "head_only": False,
            "labels": ["neg", "pos"],
            "select": True,
        },
        [
            "classify",
            "train",
            "--config",
            "FILE",
            "--data",
            "a.txt",
            "b.txt",
            "--epochs",
            "2",
            "--pooling",
            "mean",
            "--head-only",
            "--no-select",
        ],
    ),
}


@pytest.mark.parametrize("verb", sorted(CONFIG_CASES))
def test_config_file_plus_flags_equals_the_same_flags_alone(verb, tmp_path):
    alone, file_settings, with_file = CONFIG_CASES[verb]
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(file_settings), encoding="utf-8")
    with_file = [str(config) if a == "FILE" else a for a in with_file]
    expected = settings_of(alone)
    assert settings_of(with_file) == expected
    assert settings_of(with_file[: with_file.index("--config") + 2]) != expected  # the flags did override it
    # and a run folder's saved settings (the same YAML) read back to the same settings
    from lmforge.settings import to_yaml

    (tmp_path / "saved.yaml").write_text(to_yaml(expected), encoding="utf-8")
    head = alone[:2] if verb == "classify train" else alone[:1]
    assert settings_of([*head, "--config", str(tmp_path / "saved.yaml")]) == expected


def test_an_old_run_folders_train_args_json_is_read_by_config(tmp_path):
    from lmforge.train.trainer import TrainConfig

    settings = TrainConfig(data="d", out="o", max_iters=5, n_layer=2, bias=False)
    old = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("logger", "overwrite")}  # 0.1's fields
    (tmp_path / "train_args.json").write_text(json.dumps(old, indent=2), encoding="utf-8")
    assert settings_of(["train", "--config", str(tmp_path / "train_args.json")]) == settings


def test_config_file_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: d\nout: o\nmax_iter: 5\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown setting 'max_iter'" in err and "did you mean 'max_iters'" in err and str(bad) in err
    bad.write_text("data: d\nout: o\nmax_iters: many\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 1
    assert f"config file {bad}: max_iters takes an int, not 'many'" in capsys.readouterr().err
    bad.write_text("out: o\nmax_iters: 5\n", encoding="utf-8")
    assert main(["train", "--config", str(bad)]) == 1
    assert "DATA is required" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml not found" in capsys.readouterr().err


def test_errors_spell_settings_as_flags(data_dir, tmp_path, capsys):
    assert main(["train", data_dir, str(tmp_path / "r"), "--max-iters", "-5"]) == 1
    err = capsys.readouterr().err
    assert "lmforge train: error: --max-iters=-5 must be > 0" in err and "max_iters" not in err
    assert main(["train", data_dir, str(tmp_path / "r"), "--max-iters", "5", "--dropout", "1.5"]) == 1
    assert "--dropout=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert main(["classify", "eval", str(tmp_path)]) == 1
    assert "classify eval needs --data FILE" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "needs --data FILE" in capsys.readouterr().err
    assert (
        main(["prepare", "tinyshakespeare", "--from-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d")])
        == 1
    )
    assert f"--from-file {tmp_path / 'none.txt'} does not exist" in capsys.readouterr().err
    from lmforge.corpus import fetch_tinyshakespeare

    with pytest.raises(ValueError, match="^from_file .* does not exist"):  # the Python API spells it as Python
        fetch_tinyshakespeare(tmp_path, from_file=tmp_path / "none.txt")


def test_version_and_top_level_help_as_a_real_process():
    import lmforge

    version = subprocess.run(
        [sys.executable, "-m", "lmforge", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.strip() == f"lmforge {lmforge.__version__}"
    out = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in COMMANDS:
        assert verb in out


def test_unknown_command_and_bad_input_are_clear(tmp_path, capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error" in err and "missing" in err


def test_renamed_flags_still_work_for_a_release_with_a_line_on_stderr(capsys):
    new = settings_or_args(["generate", "gpt-nano", "--max-tokens", "7", "--n", "2", "--num-speculative-tokens", "3"])
    old = settings_or_args(["generate", "gpt-nano", "--max-new-tokens", "7", "--num-samples=2", "--speculative-k", "3"])
    assert old == new and (new["max_tokens"], new["n"], new["num_speculative_tokens"]) == (7, 2, 3)
    err = capsys.readouterr().err
    for old_flag, new_flag in (
        ("--max-new-tokens", "--max-tokens"),
        ("--num-samples", "--n"),
        ("--speculative-k", "--num-speculative-tokens"),
    ):
        assert f"{old_flag} is deprecated" in err and f"use {new_flag}" in err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--max-new-tokens" not in capsys.readouterr().out  # hidden


def settings_or_args(argv: list[str]) -> dict:
    _, _, fn, args = parse_command(argv)
    return call_arguments(fn, args)[1]


def test_a_list_flag_given_twice_keeps_every_value_and_replaces_its_default():
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


def test_a_verb_whose_extra_is_not_installed_names_the_extra_instead_of_a_traceback():
    """`pip install lmforge` without [serve]: `lmforge serve` says which extra installs what is missing."""
    code = (
        "import sys; sys.modules['fastapi'] = None\n"  # `import fastapi` now raises ModuleNotFoundError
        "from lmforge.cli import main; raise SystemExit(main(['serve', 'gpt-nano']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install 'lmforge[serve]'" in done.stderr and "fastapi" in done.stderr
