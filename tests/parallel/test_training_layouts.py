"""`ratpt train` under torchrun with tensor parallelism: the same losses as one process, passkey retrieval
during training (eval.passkey) on the weights of its checkpoint, and its checkpoint (TP shards gathered
into the plain form) resumes in one process to the same losses."""
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from ratpt.data.tokenizer import load_tokenizer
from ratpt.hf.passkey import evaluate_passkey
from ratpt.train.commands import checkpoint_config, load_trained_model
from run_helpers import REPO, losses_of, ratpt, small_run, train_here

VAL_LINE = re.compile(r"step (\d+) \| val loss ([0-9.]+)")
# vocab 258: the byte tokenizer's 257 rounded up to a multiple of TP = 2 (vocab-parallel embedding);
# head_dim 16: 4 heads, so each TP rank holds one head of each of the 2 query/key groups
# constant lr: a 2-step run and a 4-step run take the same steps (the cosine schedule depends on train.steps)
PASSKEY = ["eval.passkey.lengths=[256]", "eval.passkey.depths=[0.5]", "eval.passkey.trials=1"]
RUN = ["model.vocab_size=258", "model.head_dim=16", "eval.interval=2", "eval.max_samples=8", "checkpoint.interval=0",
       "schedule.kind=constant", "schedule.warmup_fraction=0"]


def test_tensor_parallel_training_matches_one_process_and_resumes_in_one_process(byte_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ratpt")  # the one-process run's validation lines
    one_losses = dict(enumerate(train_here(byte_data, tmp_path / "one", *RUN, "train.steps=4").losses, start=1))
    one_val = dict(VAL_LINE.findall(caplog.text))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tp2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
         "train", *small_run(byte_data, tmp_path / "tp2", *RUN, "train.steps=2", "parallel.tensor=2", *PASSKEY)],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )
    assert tp2.returncode == 0, tp2.stdout[-3000:] + tp2.stderr[-3000:]
    tp2_losses = losses_of(tp2.stdout)
    assert tp2_losses.keys() == {1, 2}
    for step in tp2_losses:
        assert tp2_losses[step] == pytest.approx(one_losses[step], abs=2e-4)
    tp2_val = dict(VAL_LINE.findall(tp2.stderr + tp2.stdout))
    assert tp2_val.get("2") is not None and float(tp2_val["2"]) == pytest.approx(float(one_val["2"]), abs=2e-4)
    # rank 0 scored the weights gathered from both TP ranks while rank 1 waited: the answers of its checkpoint
    checkpoint = tmp_path / "tp2" / "checkpoints" / "step_00000002"
    during = json.loads((tmp_path / "tp2" / "evals" / checkpoint.name / "passkey.json").read_text())
    model = load_trained_model(checkpoint, checkpoint_config(checkpoint)).eval()
    assert during["records"] == evaluate_passkey(model, load_tokenizer(checkpoint / "tokenizer"), [256], [0.5],
                                                 trials=1)["records"]

    # the TP2 run's last checkpoint, continued by one process, to step 4
    resumed = ratpt("train", *small_run(byte_data, tmp_path / "tp2", *RUN, "train.steps=4"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    resumed_losses = losses_of(resumed.stdout)
    assert resumed_losses.keys() == {3, 4}
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(one_losses[step], abs=2e-4)


def test_interleaved_pipeline_evaluates_a_validation_set_of_any_number_of_micro_batches(byte_data, tmp_path, caplog):
    # 3 validation micro-batches on PP 2 × 2 virtual stages: megatron's interleaved schedule raised a RuntimeError
    # traceback at the first evaluation, after the training steps
    run = ["model.n_layers=4", "eval.interval=2", "eval.max_samples=12", "train.steps=2"]
    caplog.set_level(logging.INFO, logger="ratpt")
    train_here(byte_data, tmp_path / "one", *run)
    one_val = dict(VAL_LINE.findall(caplog.text))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pp2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
         "train", *small_run(byte_data, tmp_path / "pp2", *run, "parallel.pipeline=2", "parallel.virtual_stages=2")],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )
    assert pp2.returncode == 0, pp2.stdout[-3000:] + pp2.stderr[-3000:]
    pp2_val = dict(VAL_LINE.findall(pp2.stderr + pp2.stdout))
    assert float(pp2_val["2"]) == pytest.approx(float(one_val["2"]), abs=2e-4)
