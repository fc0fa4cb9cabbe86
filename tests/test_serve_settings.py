"""`lmforge serve`'s settings are declared once, in ServeSettings: its flags and help come from the dataclass."""

import dataclasses

import pytest

from lmforge.cli import build_parser
from lmforge.serve.settings import ServeSettings, ServeSettingsError, attribute_docs


def test_every_setting_is_a_documented_flag_with_its_default():
    docs = attribute_docs(ServeSettings)
    parser = build_parser(["serve"])
    serve = parser._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(ServeSettings):
        assert docs.get(f.name), f"{f.name} has no attribute docstring"
        action = actions[f.name]
        assert docs[f.name] in " ".join(action.help.split()), f.name
        if f.name != "model":  # MODEL is positional
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert action.default == default, f.name
    args = vars(parser.parse_args(["serve", "runs/x", "--max-batch", "3", "--kv-dtype", "float16"]))
    args.pop("verb")
    assert ServeSettings(**args) == ServeSettings(model="runs/x", max_batch=3, kv_dtype="float16")


@pytest.mark.parametrize("name, value", [("max_batch", 0), ("max_queue", -1), ("max_model_len", 1),
                                         ("rate_limit_tpm", -5)])
def test_settings_out_of_range_are_refused_by_name(name, value):
    with pytest.raises(ServeSettingsError) as e:
        ServeSettings(**{name: value})
    assert e.value.param == name and name in str(e.value)


def test_a_missing_api_key_file_is_named(tmp_path):
    with pytest.raises(ServeSettingsError) as e:
        ServeSettings(api_key_file=str(tmp_path / "nope")).api_keys()
    assert e.value.param == "api_key_file"
    (tmp_path / "keys").write_text("a\n\nb\n")
    assert ServeSettings(api_key="k", api_key_file=str(tmp_path / "keys")).api_keys() == ["k", "a", "b"]
