"""Model folders: round trip, atomic replacement, and clear errors for damaged or foreign files."""

import json

import pytest
import torch

from lmforge.checkpoint import CheckpointError, load_model, save_model
from lmforge.config import ModelConfig
from lmforge.model import Transformer


def tiny(name="gpt-nano", **kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name(name, vocab_size=40, n_layer=2, **kw)).eval()


@pytest.mark.parametrize("name", ["gpt-nano", "llama-nano", "seed"])
def test_round_trip_gives_identical_logits(tmp_path, name):
    model = tiny(name)
    save_model(tmp_path / "m", model)
    loaded, tok = load_model(tmp_path / "m")
    assert tok is None
    x = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.config == model.config


def test_tied_weights_stay_tied_after_load(tmp_path):
    save_model(tmp_path / "m", tiny())
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.tok_emb.weight.data_ptr()


def test_truncated_weights_name_the_file(tmp_path):
    save_model(tmp_path / "m", tiny())
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(tmp_path / "m")


def test_altered_bytes_fail_the_checksum(tmp_path):
    save_model(tmp_path / "m", tiny())
    w = tmp_path / "m" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-8:] = bytes(reversed(data[-8:]))  # shuffle a few bytes of the last tensor
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*checksum"):
        load_model(tmp_path / "m")


def test_foreign_checkpoint_names_the_mismatch(tmp_path):
    save_model(tmp_path / "a", tiny("llama-nano"))
    save_model(tmp_path / "b", tiny("gpt-nano"))
    (tmp_path / "a" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model(tmp_path / "a")


def test_wrong_shape_names_the_tensor(tmp_path):
    save_model(tmp_path / "m", tiny())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "m")


def test_corrupt_config_and_missing_folder(tmp_path):
    save_model(tmp_path / "m", tiny())
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an lmforge model folder"):
        load_model(tmp_path / "empty")


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    model = tiny()
    save_model(tmp_path / "m", model)
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    class Boom:
        def save(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model(tmp_path / "m", tiny("gpt-nano"), tokenizer=Boom())
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left behind


def test_run_folder_resolves_to_best(tmp_path):
    save_model(tmp_path / "run" / "last", tiny())
    save_model(tmp_path / "run" / "best", tiny("llama-nano"))
    loaded, _ = load_model(tmp_path / "run")
    assert loaded.config.name == "llama-nano"


def test_a_write_killed_between_its_renames_leaves_the_old_copy_to_find(tmp_path):
    # write_folder moves the old folder aside, then renames the new one in; a kill in between leaves only the
    # aside copy, which readers put back.
    from lmforge.checkpoint import load_model, load_train_state, save_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("gpt-nano", vocab_size=11, n_layer=1))
    save_model(tmp_path / "run" / "last", model, train_state={"iter": 7})
    (tmp_path / "run" / "last").rename(tmp_path / "run" / ".last.old-4242")
    assert load_train_state(tmp_path / "run" / "last")["iter"] == 7
    loaded, _ = load_model(tmp_path / "run", with_tokenizer=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_written_files_and_folders_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from lmforge.fsutil import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_model(tmp_path / "m", Transformer(ModelConfig.from_name("gpt-nano", vocab_size=11, n_layer=1)))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
