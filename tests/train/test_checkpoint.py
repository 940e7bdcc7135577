"""Checkpoints are atomic, pruned to the newest K, and never unpickle code."""
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

    def crash(obj, path):
        with open(path, "wb") as handle:
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
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt, truncated.*checkpoint.resume=.*step_00000010"):
        ckpt.load_checkpoint(newest)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=str(tmp_path)):
        ckpt.load_checkpoint(tmp_path / "nothing")
