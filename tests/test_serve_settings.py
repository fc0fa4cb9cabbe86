"""`lmforge serve`'s settings are declared once, in ServeSettings: its flags, help and --config come from the
dataclass (lmforge.cli, lmforge.settings)."""

import dataclasses

import pytest
import yaml

from lmforge.cli import call_arguments, main, parse_command
from lmforge.serve.settings import ServeSettings, ServeSettingsError
from lmforge.settings import field_docs, to_yaml


def settings_of(argv: list[str]) -> ServeSettings:
    _, _, fn, args = parse_command(argv)
    return call_arguments(fn, args)[1]["settings"]


def test_every_setting_is_a_documented_flag(capsys):
    docs = field_docs(ServeSettings)
    assert set(docs) == {f.name for f in dataclasses.fields(ServeSettings)}
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(ServeSettings):
        assert "--" + f.name.replace("_", "-") in help_text or f.name == "model", f.name
        assert docs[f.name][:40] in help_text, f.name


def test_config_file_plus_flags_equals_the_same_flags_alone(tmp_path):
    alone = [
        "serve",
        "runs/x",
        "--max-batch",
        "3",
        "--kv-dtype",
        "float16",
        "--allowed-hosts",
        "a.example",
        "b.example",
        "--api-key",
        "k",
    ]
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": "runs/x", "max_batch": 8, "kv_dtype": "float16", "api_key": "k", "allowed_hosts": ["c.example"]}
        ),
        encoding="utf-8",
    )
    expected = settings_of(alone)
    assert expected == ServeSettings(
        model="runs/x", max_batch=3, kv_dtype="float16", api_key="k", allowed_hosts=["a.example", "b.example"]
    )
    with_file = ["serve", "--config", str(config), "--max-batch", "3", "--allowed-hosts", "a.example", "b.example"]
    assert settings_of(with_file) == expected
    assert settings_of(with_file[:3]) != expected  # the flags did override the file
    (tmp_path / "saved.yaml").write_text(to_yaml(expected), encoding="utf-8")
    assert settings_of(["serve", "--config", str(tmp_path / "saved.yaml")]) == expected


@pytest.mark.parametrize(
    "name, value", [("max_batch", 0), ("max_queue", -1), ("max_model_len", 1), ("rate_limit_tpm", -5)]
)
def test_settings_out_of_range_are_refused_by_name(name, value, capsys):
    with pytest.raises(ServeSettingsError) as e:
        ServeSettings(model="m", **{name: value})
    assert e.value.param == name and f"{name}={value}" in str(e.value)
    assert main(["serve", "m", f"--{name.replace('_', '-')}", str(value)]) == 1  # before any model is loaded
    assert f"--{name.replace('_', '-')}={value}" in capsys.readouterr().err


def test_a_missing_api_key_file_is_named(tmp_path):
    with pytest.raises(ServeSettingsError) as e:
        ServeSettings(model="m", api_key_file=str(tmp_path / "nope")).api_keys()
    assert e.value.param == "api_key_file"
    (tmp_path / "keys").write_text("a\n\nb\n")
    assert ServeSettings(model="m", api_key="k", api_key_file=str(tmp_path / "keys")).api_keys() == ["k", "a", "b"]
