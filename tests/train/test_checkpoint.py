"""Checkpoints are atomic, checksummed, pruned to the newest K, and never unpickle code."""
import json
import os

import pytest
import torch

from ratpt import checkpoint as ckpt
from run_helpers import CodeRunningPayload


def _save(directory, step, keep=3):
    return ckpt.save_checkpoint(directory, step, {"step": step, "w": torch.full((2,), float(step))},
                                "name: t\n", None, keep)


def test_newest_complete_checkpoint_is_found_and_old_ones_pruned(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 40


def test_a_checkpoint_older_than_the_kept_ones_survives_its_own_pruning(tmp_path):
    """Saving step 600 beside 800, 900, 1000 (a run gone back to an earlier step): the oldest of the
    others goes, never the one just written."""
    for step in (800, 900, 1000):
        _save(tmp_path, step)
    written = _save(tmp_path, 600)
    assert written.is_dir() and ckpt.load_checkpoint(written)["step"] == 600
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000600", "step_00000900", "step_00001000"]
    _save(tmp_path, 700, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000700"]


def test_a_same_step_save_replaces_the_old_one_whole(tmp_path):
    _save(tmp_path, 10)
    ckpt.save_checkpoint(tmp_path, 10, {"step": 10, "w": torch.zeros(2)}, "name: t\n", None, 3)
    assert ckpt.load_checkpoint(tmp_path)["w"].tolist() == [0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"]


def test_a_save_interrupted_mid_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 20)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000010"
    assert ckpt.load_checkpoint(tmp_path)["w"].tolist() == [10.0, 10.0]
    _save(tmp_path, 30)
    assert not list(tmp_path.glob("*.tmp")), "the next save cleans the interrupted one"


def test_loading_refuses_pickled_code(tmp_path):
    target = tmp_path / "step_00000001"
    target.mkdir()
    torch.save({"evil": CodeRunningPayload()}, target / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="state.pt"):
        ckpt.load_checkpoint(target)


def test_third_party_loads_asking_for_pickle_are_weights_only_inside_the_guard(tmp_path, capsys):
    """DeepSpeed's loaders call torch.load(weights_only=False); ratpt runs them under weights_only_loads."""
    path = tmp_path / "partition.pt"
    torch.save({"w": torch.ones(2), "evil": CodeRunningPayload()}, path)
    with ckpt.weights_only_loads(), pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=False)
    assert "arbitrary code ran" not in capsys.readouterr().out
    torch.save({"w": torch.ones(2), "allowed": _Data(3)}, path)
    with ckpt.weights_only_loads([_Data]):
        assert torch.load(path, weights_only=False)["allowed"].value == 3
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


class _Data:
    def __init__(self, value):
        self.value = value


def test_a_corrupt_checkpoint_is_named_with_the_one_before_it(tmp_path):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    (newest / ckpt.STATE_FILE).write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match=rf"corrupt, truncated.*the one before it is .*step_00000010.*"
                                                   rf"`mv {newest} {newest}.broken`"):
        ckpt.load_checkpoint(newest)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path)):
        ckpt.load_checkpoint(tmp_path / "nothing")


def test_an_exported_folder_given_for_a_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ckpt.CheckpointError, match="is an exported model folder.*the training run or checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


def test_every_file_of_a_checkpoint_is_listed_with_its_checksum(tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "meta.json").write_text("{}")
    written = ckpt.save_checkpoint(tmp_path / "ck", 10, {"step": 10}, "name: t\n", tokenizer, 3)
    listed = json.loads((written / "checksums.json").read_text())["files"]
    assert sorted(listed) == ["config.yaml", "state.pt", "tokenizer/meta.json"]
    assert listed["state.pt"]["bytes"] == (written / "state.pt").stat().st_size
    assert ckpt.verify_checkpoint(written) == written


def test_a_changed_byte_is_named_with_the_checkpoint_to_fall_back_to(tmp_path):
    older = _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    state = newest / ckpt.STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=rf"{state} differs from its checksum.*the one before it is {older}"):
        ckpt.verify_checkpoint(tmp_path)
    assert ckpt.verify_checkpoint(older) == older


def test_a_missing_file_is_named(tmp_path):
    written = _save(tmp_path, 10)
    (written / ckpt.CONFIG_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=rf"{written / ckpt.CONFIG_FILE} is missing.*start afresh"):
        ckpt.verify_checkpoint(written)
