"""checkpoint.init_from: a run starts from another run's weights (a context extension: a short-sequence
run continued at a longer one) with a new optimizer, schedule and data position, and a requeued run
resumes its own checkpoints instead."""
import re

import pytest
import torch

from ratpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from ratpt.config import load_config
from ratpt.train.checkpointer import initial_weights
from run_helpers import losses_of, ratpt, small_run, train_here


@pytest.fixture(scope="module")
def short(byte_data, tmp_path_factory):
    """A run of 30 steps at 64 tokens per sequence, and its first loss."""
    run = tmp_path_factory.mktemp("short") / "run"
    return run, train_here(byte_data, run, "train.steps=30", "optimizer.lr=3e-3").losses[0]


def test_a_longer_context_run_starts_from_the_short_runs_weights_and_its_loss_falls(byte_data, short, tmp_path):
    short_run, short_first_loss = short
    trained = load_checkpoint(short_run / "checkpoints")["model"]
    extended = ratpt("train", *small_run(byte_data, tmp_path / "long", "data.seq_len=256", "train.steps=6",
                                         "optimizer.lr=1e-3", "schedule.warmup_fraction=0",
                                         f"checkpoint.init_from={short_run}", "model.rope_base=40000"))
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "starting from the weights of" in extended.stdout + extended.stderr
    assert re.search(r"model.rope_base: 10000.0 in \S+, 40000.0 here", extended.stdout + extended.stderr)
    first = losses_of(extended.stdout)
    assert sorted(first) == list(range(1, 7)), "a new schedule and data position: steps 1..6"
    assert first[1] < short_first_loss - 1.0  # it starts trained (from scratch the byte-level loss is ~ln 257 = 5.5)
    assert first[6] < first[1]
    state = load_checkpoint(tmp_path / "long" / "checkpoints")
    assert state["step"] == 6 and state["data"]["samples"] == 6 * 8  # its own data position, from zero
    assert not torch.equal(state["model"]["embedding.weight"], trained["embedding.weight"])  # and it trained


def test_another_model_shape_is_refused_naming_the_keys(byte_data, short, tmp_path):
    done = ratpt("train", *small_run(byte_data, tmp_path / "wide", "train.steps=2", "model.d_model=128",
                                     f"checkpoint.init_from={short[0]}"))
    assert done.returncode == 2
    assert "checkpoint.init_from" in done.stderr and "model.d_model: 64 there, 128 here" in done.stderr
    assert "or start from a checkpoint of this model" in done.stderr
    assert latest_checkpoint(tmp_path / "wide" / "checkpoints") is None


def test_a_requeued_run_resumes_its_own_checkpoint_not_the_initial_weights(byte_data, short, tmp_path):
    settings = ("data.seq_len=128", "checkpoint.interval=2", f"checkpoint.init_from={short[0]}")
    train_here(byte_data, tmp_path / "long", *settings, "train.steps=2")
    again = ratpt("train", *small_run(byte_data, tmp_path / "long", *settings, "train.steps=4"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(losses_of(again.stdout)) == [3, 4]
    assert "starting from the weights of" not in again.stdout + again.stderr


def test_a_missing_init_from_is_named_by_its_key(tmp_path):
    cfg = load_config(None, ["data.streams=[{path: unused}]", f"checkpoint.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(CheckpointError, match=r"^checkpoint.init_from: no complete checkpoint at .*nothing"):
        initial_weights(cfg)
