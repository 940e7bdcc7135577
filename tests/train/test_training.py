"""End-to-end training through the real CLI: falling loss, exact resume, preemption, NaN guard."""
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ratpt.config import load_config
from ratpt.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints, load_checkpoint
from ratpt.engines import local_engine
from ratpt.errors import TrainingDiverged
from ratpt.folder_lock import hold_folder
from ratpt.train import trainer

from run_helpers import LOSS_LINE, REPO, losses_of, ratpt, small_run, small_run_config

def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints")


def assert_same_model(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_loss_falls_and_checkpoints_and_tensorboard_are_written(byte_data, tmp_path):
    done = ratpt("train", *small_run(byte_data, tmp_path / "run", "train.steps=60", "checkpoint.interval=30",
                                     "logging.tensorboard=true", "eval.interval=30", "eval.max_samples=16"))
    assert done.returncode == 0, done.stdout + done.stderr
    losses = losses_of(done.stdout)
    assert len(losses) == 60
    first, last = losses[1], sum(losses[s] for s in range(51, 61)) / 10
    assert first > math.log(257) - 0.5, "a fresh model predicts close to uniform"
    assert last < first - 1.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000030", "step_00000060"]
    assert "val loss" in done.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 61))


INTERRUPTIBLE = ("train.steps=16", "checkpoint.interval=4")


@pytest.fixture(scope="module")
def uninterrupted(byte_data, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The whole run of INTERRUPTIBLE: its folder keeps the checkpoints of steps 12 and 16 (tiny.yaml keeps 2),
    which the tests of going back and of broken checkpoints take copies of."""
    run_dir = tmp_path_factory.mktemp("whole")
    done = ratpt("train", *small_run(byte_data, run_dir, *INTERRUPTIBLE))
    assert done.returncode == 0, done.stderr
    return run_dir, losses_of(done.stdout)


def start_training(data: Path, run_dir: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "ratpt", "train", *small_run(data, run_dir, *INTERRUPTIBLE)]
    return subprocess.Popen(args, cwd=REPO, env=env, text=True, **kwargs)


def test_killed_run_resumes_to_the_bit_identical_result(byte_data, uninterrupted, tmp_path):
    proc = start_training(byte_data, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while latest_checkpoint(tmp_path / "checkpoints") is None and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "checkpoints")["step"]
    assert killed_at < 16, "the run was killed before it finished"

    resumed = ratpt("train", *small_run(byte_data, tmp_path, *INTERRUPTIBLE))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    whole_dir, whole_losses = uninterrupted
    assert_same_model(final_state(whole_dir), final_state(tmp_path))
    resumed_losses = losses_of(resumed.stdout)
    assert min(resumed_losses) == killed_at + 1
    assert resumed_losses == {s: whole_losses[s] for s in resumed_losses}


@pytest.mark.parametrize("stop_signal, resume", [(signal.SIGUSR1, True), (signal.SIGTERM, False),
                                                 (signal.SIGINT, False)], ids=["SIGUSR1", "SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_stops_and_resumes_identically(byte_data, uninterrupted, tmp_path, stop_signal,
                                                                 resume):
    """SIGUSR1: SLURM's warning before the time limit; SIGTERM: a preemption (or local_train.sh's stop);
    SIGINT: Ctrl-C. What is resumed is the checkpoint, whichever signal wrote it: one case resumes."""
    proc = start_training(byte_data, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if LOSS_LINE.search(line):
            proc.send_signal(stop_signal)
            break
    out = line + proc.stdout.read()
    assert proc.wait() == 0, out
    stopped_at = load_checkpoint(tmp_path / "checkpoints")["step"]
    assert stopped_at < 16 and "stopped at step" in out
    if not resume:
        return
    resumed = ratpt("train", *small_run(byte_data, tmp_path, *INTERRUPTIBLE))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(final_state(uninterrupted[0]), final_state(tmp_path))


def test_loss_falls_with_document_masking_and_the_masks_reach_the_model(tmp_path):
    from data_prep.__main__ import main as data_prep
    from pydoc_data.topics import topics

    # CPython's doc topics cut into paragraphs (176 bytes on average): several documents per sequence
    paragraphs = [p for text in topics.values() for p in text.split("\n\n") if p.strip()]
    (tmp_path / "paragraphs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    assert data_prep(["tokenize", str(tmp_path / "paragraphs.jsonl"), "--out", str(tmp_path / "data"),
                      "--tokenizer", "byte", "--val-fraction", "0.05"]) == 0
    # the hybrid, so that RAT's chunks and the window's mask both restart at every packed document
    run = ("checkpoint.interval=0", "model.mixers=[rat,swa]", "model.window=16")
    masked = trainer.train(small_run_config(tmp_path / "data", tmp_path / "masked", "train.steps=20", *run,
                                             "data.document_masking=true")).losses
    first, last = masked[0], sum(masked[-5:]) / 5
    assert first > math.log(257) - 0.5, "a fresh model predicts close to uniform"
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    unmasked = trainer.train(small_run_config(tmp_path / "data", tmp_path / "unmasked", "train.steps=1", *run)).losses
    assert abs(unmasked[0] - first) > 1e-4, "the same weights and batch give the same loss: no mask reached the model"


def test_activation_checkpointing_changes_no_loss(byte_data, tmp_path):
    plain = trainer.train(small_run_config(byte_data, tmp_path / "plain", "train.steps=3"))
    recomputed = trainer.train(small_run_config(byte_data, tmp_path / "ckpt", "train.steps=3",
                                                 "train.activation_checkpointing=true"))
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)


def test_compiled_blocks_and_loss_under_activation_checkpointing_change_no_loss(byte_data, tmp_path):
    # one case, the harder composition (compiling a block that checkpoints itself). aot_eager: dynamo's
    # capture and AOT autograd's joint graph, without inductor's C++ code generation (≈ 2 minutes on
    # 2 cores); inductor with the RAT kernels is tested in tests/kernels (test_rat_layer_with_triton_...)
    from torch._dynamo.utils import counters

    plain = trainer.train(small_run_config(byte_data, tmp_path / "plain", "train.steps=2"))
    torch._dynamo.reset()  # compile afresh: graphs cached by an earlier case would count as none
    counters.clear()
    compiled = trainer.train(small_run_config(byte_data, tmp_path / "compiled", "train.steps=2",
                                               "train.compile=true", "train.compile_backend=aot_eager",
                                               "train.activation_checkpointing=true"))
    assert counters["stats"]["unique_graphs"] >= 2  # the blocks and the fused loss's chunk math did run compiled
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-5)


def poison_losses(monkeypatch, poisoned) -> None:
    """Make the trainer's loss NaN on the micro-batch calls n (counted from 1) where poisoned(n)."""
    real = local_engine.sum_cross_entropy
    calls = {"n": 0}

    def maybe_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if poisoned(calls["n"]) else loss

    monkeypatch.setattr(local_engine, "sum_cross_entropy", maybe_nan)


def test_non_finite_steps_are_skipped_then_training_stops(byte_data, tmp_path, monkeypatch):
    cfg = small_run_config(byte_data, tmp_path / "nan", "train.steps=10", "train.max_bad_steps=3")
    # micro-batches 3-4 (step 2) are poisoned once, then every step from step 4 on
    poison_losses(monkeypatch, lambda call: call in (3, 4) or call > 6)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps at step 6"):
        trainer.train(cfg)


def test_a_stop_signal_during_start_up_checkpoints_after_the_first_step(byte_data, tmp_path, monkeypatch):
    """SLURM's warning signal can come while the model is built or the data opened: it is kept."""
    cfg = small_run_config(byte_data, tmp_path, "train.steps=6", "eval.interval=1", "eval.max_samples=8")
    real = trainer.build_model

    def build_then_signalled(model_cfg):
        model = real(model_cfg)
        os.kill(os.getpid(), signal.SIGUSR1)
        return model

    monkeypatch.setattr(trainer, "build_model", build_then_signalled)
    handler_before = signal.getsignal(signal.SIGUSR1)
    result = trainer.train(cfg)
    assert result.stopped_early and result.step == 1
    assert result.val_loss is None, "a stopping run saves first and skips the evaluation"
    assert load_checkpoint(result.checkpoint)["step"] == 1
    assert signal.getsignal(signal.SIGUSR1) is handler_before, "the handler is restored when training returns"


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(byte_data, tmp_path, monkeypatch, caplog):
    cfg = small_run_config(byte_data, tmp_path, "train.steps=6")
    real = trainer.build_model

    def build_then_interrupted_twice(model_cfg):
        model = real(model_cfg)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return model

    monkeypatch.setattr(trainer, "build_model", build_then_interrupted_twice)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        trainer.train(cfg)
    assert exited.value.code == 130 and "interrupted again: exiting now" in caplog.text
    assert not (tmp_path / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_going_back_to_an_earlier_checkpoint_with_newer_ones_beside_it_is_refused(byte_data, uninterrupted, tmp_path):
    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "run")
    earlier = run_dir / "checkpoints" / "step_00000012"
    again = ratpt("train", *small_run(byte_data, run_dir, "train.steps=20", f"checkpoint.resume={earlier}"))
    assert again.returncode == 2 and "holds newer checkpoints (step_00000016)" in again.stderr, again.stderr[-2000:]
    assert "checkpoint.resume=auto" in again.stderr
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000016"


def test_a_finished_run_leaves_no_process_group_behind(byte_data, tmp_path):
    """Gloo's threads left to interpreter shutdown can abort a rank whose run succeeded (SIGABRT). DeepSpeed's
    engine joins a process group even for one process."""
    trainer.train(small_run_config(byte_data, tmp_path, "train.steps=1", "train.engine=deepspeed"))
    assert not torch.distributed.is_initialized()


def test_a_skipped_step_leaves_weights_and_adam_state_untouched(byte_data, tmp_path, monkeypatch):
    cfg = small_run_config(byte_data, tmp_path, "train.steps=2", "checkpoint.interval=1")
    poison_losses(monkeypatch, lambda call: call in (3, 4))  # the second step's two micro-batches
    result = trainer.train(cfg)
    assert math.isnan(result.losses[1]) and math.isfinite(result.losses[0])
    after_first, after_skipped = (load_checkpoint(tmp_path / "checkpoints" / checkpoint_name(s)) for s in (1, 2))
    assert_same_model({**after_first, "step": 2}, after_skipped)
    first, skipped = after_first["optimizer"]["adam"], after_skipped["optimizer"]["adam"]  # by parameter name
    assert first.keys() == skipped.keys() and first
    for param, moments in first.items():
        for name, value in moments.items():  # exp_avg, exp_avg_sq and the step count
            assert torch.equal(value, skipped[param][name]), (param, name)
    assert after_skipped["bad_in_a_row"] == 1


@pytest.mark.parametrize("seq_len, message", [
    (256, "fewer than one micro-batch"),
    (1024, r"no stream has a val/ split that fills one sample of data.seq_len \+ 1 = 1025 tokens: lower data.seq_len"),
])
def test_a_validation_set_too_small_fails_before_the_first_step(tmp_path, seq_len, message):
    """Found when the validation batches are opened, before training, not at the first evaluation
    (where up to eval.interval steps of training would be lost)."""
    from data_prep.__main__ import main as data_prep_main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document {i} {"x" * 300}"}}\n' for i in range(40)))
    data = tmp_path / "data"
    assert data_prep_main(["tokenize", str(docs), "--out", str(data), "--tokenizer", "byte",
                           "--val-fraction", "0.05"]) == 0
    path, *overrides = small_run(data, tmp_path / "run", "eval.interval=2", "checkpoint.interval=1", "train.steps=3",
                                 f"data.seq_len={seq_len}")
    cfg = load_config(path, overrides)
    with pytest.raises(ValueError, match=message):
        trainer.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_another_model_is_refused_naming_the_keys(byte_data, trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    other = ratpt("train", *small_run(byte_data, run_dir, "train.steps=4", "model.n_layers=3"))
    assert other.returncode == 2 and "model.n_layers: 2 there, 3 here" in other.stderr, other.stderr[-2000:]
    assert "or train a new one (another out_dir, or checkpoint.resume=never)" in other.stderr
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000002"
    assert load_config(run_dir / "config.yaml").model.n_layers == 2, "a refused run leaves the config"


def test_eval_and_resume_on_another_tokenizers_data_are_refused(byte_data, trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    other = tmp_path / "other"  # the same shards under another tokenizer's record
    shutil.copytree(byte_data, other)
    meta_file = other / "tokenizer" / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "name": "bpe", "kind": "hf"}))
    stream = f"data.streams=[{{path: {other}}}]"
    evaluated = ratpt("eval", str(run_dir), stream)
    resumed = ratpt("train", *small_run(byte_data, run_dir, "train.steps=4"), stream)
    for done in (evaluated, resumed):
        assert done.returncode == 2 and "was trained on 'byte' tokens" in done.stderr, done.stderr[-2000:]


def test_a_run_on_a_held_out_dir_is_refused_naming_the_holder_and_writes_nothing(byte_data, tmp_path):
    """Two runs on one out_dir: the second one stops before its first write; another run's checkpoint in
    the making (a *.tmp folder) is left alone."""
    in_the_making = tmp_path / "checkpoints" / "step_00000005.tmp"
    in_the_making.mkdir(parents=True)
    with hold_folder(tmp_path, purpose="training"):
        second = ratpt("train", *small_run(byte_data, tmp_path, "train.steps=2", "logging.tensorboard=true"))
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"is in use by training (pid {os.getpid()}" in second.stderr and "Traceback" not in second.stderr
    assert in_the_making.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"], "no config.yaml, no TensorBoard events"


@pytest.mark.parametrize("out_dir, message", [
    ("run", "{out_dir} is a file, not a folder"),
    ("run/sub", "cannot write {out_dir} for training (Not a directory: {out_dir}): choose a folder"),
])
def test_an_out_dir_that_is_a_file_or_inside_one_is_refused_in_one_line(byte_data, tmp_path, out_dir, message):
    (tmp_path / "run").write_text("notes\n")
    done = ratpt("train", *small_run(byte_data, tmp_path / out_dir, "train.steps=2"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: " + message.format(out_dir=tmp_path / out_dir) in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "run").read_text() == "notes\n"


def test_a_refused_run_fails_on_every_rank_at_once(byte_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with hold_folder(tmp_path, purpose="training"):
        two = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
             "train", *small_run(byte_data, tmp_path, "train.steps=2")],
            cwd=REPO, env={**env, "RATPT_COLLECTIVE_TIMEOUT": "600"}, text=True, capture_output=True, timeout=300,
        )
    assert two.returncode != 0
    assert two.stderr.count(f"is in use by training (pid {os.getpid()}") == 2, two.stderr[-3000:]  # both ranks


def test_a_failed_save_names_the_file_removes_the_partial_folder_and_keeps_the_previous(byte_data, trained_run,
                                                                                       tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    args = " ".join(shlex.quote(a) for a in small_run(byte_data, run_dir, "train.steps=4"))
    full = subprocess.run(["bash", "-c", f"ulimit -f 1000; exec {shlex.quote(sys.executable)} -m ratpt train {args}"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-2000:]
    stderr = full.stderr.strip()
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    step_dir = run_dir / "checkpoints"
    assert f"saving checkpoint step_00000004 failed writing {step_dir / 'step_00000004.tmp' / 'state.pt'}" in stderr
    assert "File too large" in stderr and f"the newest checkpoint, {step_dir / 'step_00000002'}, is kept" in stderr
    assert sorted(p.name for p in step_dir.iterdir()) == ["step_00000002"]
    assert load_checkpoint(step_dir)["step"] == 2


def corrupt_the_middle_of(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_auto_moves_a_corrupt_newest_checkpoint_aside_and_resumes_the_one_before(byte_data, uninterrupted,
                                                                                        tmp_path):
    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000016"
    corrupt_the_middle_of(newest / "state.pt")
    again = ratpt("train", *small_run(byte_data, run_dir, *INTERRUPTIBLE))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{newest / 'state.pt'} differs from its checksum" in again.stdout
    assert f"moved it aside to {newest}.broken" in again.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000012'} at step 12" in again.stdout
    assert (run_dir / "checkpoints" / "step_00000016.broken").is_dir() and load_checkpoint(newest)["step"] == 16


def test_the_advice_for_a_truncated_checkpoint_without_checksums_works(byte_data, uninterrupted, tmp_path):
    """A checkpoint written before checksums (none to tell it is broken): the error says what to run."""
    run_dir = shutil.copytree(uninterrupted[0], tmp_path / "run")
    newest = run_dir / "checkpoints" / "step_00000016"
    (newest / "checksums.json").unlink()
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    longer = small_run(byte_data, run_dir, "train.steps=20", "checkpoint.interval=4")
    refused = ratpt("train", *longer)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    advice = re.search(r"`mv (\S+) (\S+)`", refused.stderr)
    assert advice and "the one before it is" in refused.stderr, refused.stderr
    subprocess.run(["mv", advice.group(1), advice.group(2)], check=True)
    again = ratpt("train", *longer)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "at step 12" in again.stdout
    assert load_checkpoint(run_dir / "checkpoints")["step"] == 20


def test_resuming_with_other_steps_says_the_schedule_changes_in_the_log_and_tensorboard(byte_data, trained_run,
                                                                                       tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    longer = ratpt("train", *small_run(byte_data, run_dir, "train.steps=4", "logging.tensorboard=true"))
    assert longer.returncode == 0, longer.stderr[-2000:]
    note = "with another learning-rate schedule (train.steps: 2 there, 4 here)"
    assert note in longer.stdout
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("config/text_summary")]
    assert any(note in text for text in texts), texts


def test_a_finished_run_started_again_says_so_and_changes_nothing(byte_data, trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    config_before = (run_dir / "config.yaml").read_text()
    checkpoints_before = list_checkpoints(run_dir / "checkpoints")
    shorter = ratpt("train", *small_run(byte_data, run_dir, "train.steps=1"))
    assert shorter.returncode == 0, shorter.stderr[-2000:]
    assert "is at step 2, train.steps is 1: nothing to train" in shorter.stdout
    assert not LOSS_LINE.search(shorter.stdout)
    assert (run_dir / "config.yaml").read_text() == config_before
    assert list_checkpoints(run_dir / "checkpoints") == checkpoints_before
