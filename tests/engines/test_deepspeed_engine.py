"""The DeepSpeed ZeRO engine (train.engine=deepspeed): its generated JSON, equality with one process
of torch AdamW for ZeRO 1-3 (with offload, with context parallelism), DeepSpeed checkpoints (resume,
consolidation), and end-to-end training through the real CLI under torchrun.

The equality checks run in one torchrun launch (tests/engines/workers/ds_cases.py lists the tolerances);
each test here reads its case's verdict. DeepSpeed runs on its CPU accelerator over gloo, with no
JIT-built extension (torch AdamW; the shared-memory comm op is skipped), so a cold cache costs nothing.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ratpt import load_pretrained
from ratpt.config import ConfigError, load_config, micro_batches_per_step
from ratpt.model import build_model
from ratpt.engines.deepspeed_checkpoint import deepspeed_checkpoint_dir
from ratpt.engines.deepspeed_config import deepspeed_json
from ratpt.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from run_helpers import REPO, losses_of, worker_env

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

TWO_RANK_CASES = {
    "stage1": "stage=1", "stage2": "stage=2", "stage3": "stage=3",
    "stage2-offload": "stage=2,offload=true", "stage3-offload": "stage=3,offload=true,offload_params=true",
    "bf16-stage1": "stage=1,precision=bf16", "bf16-stage2": "stage=2,precision=bf16",
    "skip-stage1": "stage=1", "skip-stage3": "stage=3",
    "recompute-stage3": "stage=3",
    "cp2-zigzag-stage3": "stage=3,cp=2,layout=zigzag",  # each rank holds blocks r and 3 - r of every sequence
    "documents-stage3": "stage=3,documents=true",  # packed documents that do not see each other
    "documents-cp2-stage3": "stage=3,cp=2,layout=zigzag,documents=true",
    "resume-stage3": "stage=3", "resume-stage2-cp2": "stage=2,cp=2",
    "consolidate-stage1": "stage=1", "consolidate-stage3": "stage=3",
    # the blocks compiled (traced as inductor would be, without CPU code generation) equal eager one process
    "compiled-stage2": "stage=2,compile=true,backend=aot_eager",
    "compiled-cp2-stage3": "stage=3,cp=2,compile=true,backend=aot_eager",
}
FOUR_RANK_CASES = {f"cp2dp2-stage{stage}": f"stage={stage},cp=2,layout=contiguous" for stage in (1, 2, 3)}


def base_config(*overrides: str):
    return load_config(None, ["data.streams=[{path: unused}]", "train.engine=deepspeed", "train.global_batch=64",
                              "train.micro_batch=4", *overrides])


def test_generated_json_carries_batch_optimizer_clipping_and_zero_settings():
    cfg = base_config("deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true",
                      "optimizer.grad_clip=0.7", "optimizer.betas=[0.9,0.99]", "train.precision=bf16")
    ds = deepspeed_json(cfg, micro_batches_per_step(cfg.train, 4), dp_size=4, device_type="cuda")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 4, 4)
    assert ds["gradient_clipping"] == 0.7
    adam = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and adam["betas"] == [0.9, 0.99] and adam["weight_decay"] == 0.1
    assert adam["torch_adam"] is False, "offload on a GPU machine steps with DeepSpeed's CPU Adam"
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is True, "on GPU communication overlaps backward by default"
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_cpu_json_needs_no_jit_built_optimizer_and_auto_precision_is_fp32():
    ds = deepspeed_json(base_config("deepspeed.offload_optimizer=true"), 8, dp_size=2, device_type="cpu")
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False and "offload_param" not in ds["zero_optimization"]


def test_extra_keys_merge_over_the_generated_json():
    cfg = base_config("deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}, "
                      "optimizer: {params: {torch_adam: false}}, communication_data_type: fp32}")
    ds = deepspeed_json(cfg, 8, dp_size=2, device_type="cpu")
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert ds["optimizer"]["params"]["torch_adam"] is False and ds["optimizer"]["params"]["lr"] == cfg.optimizer.lr
    assert ds["communication_data_type"] == "fp32"


@pytest.mark.parametrize("extra, ratpt_key", [
    ("{gradient_clipping: 2.0}", "optimizer.grad_clip"),
    ("{train_micro_batch_size_per_gpu: 8}", "train.micro_batch"),
    ("{optimizer: {params: {lr: 0.1}}}", "optimizer.lr"),
    ("{zero_optimization: {stage: 3}}", "deepspeed.zero_stage"),
])
def test_extra_keys_that_the_ratpt_config_owns_are_rejected(extra, ratpt_key):
    with pytest.raises(ConfigError, match=re.escape(ratpt_key)):
        base_config(f"deepspeed.extra={extra}")  # when the config is loaded, before anything runs


@pytest.mark.parametrize("extra, section", [
    ("{zero_optimization: 3}", "zero_optimization"),
    ("{bf16: false}", "bf16"),
    ("{optimizer: adam}", "optimizer"),
    ("{zero_optimization: {offload_optimizer: none}}", "zero_optimization.offload_optimizer"),
])
def test_an_extra_value_that_would_replace_a_section_the_ratpt_config_fills_is_rejected(extra, section):
    # merged as it was, DeepSpeed failed at start-up with a TypeError traceback ('int' object is not subscriptable)
    with pytest.raises(ConfigError, match=re.escape(f"deepspeed.extra.{section} must be a mapping")):
        base_config(f"deepspeed.extra={extra}")
    base_config("deepspeed.extra={zero_optimization: {offload_optimizer: {pin_memory: false}}, bf16: {}}")


@pytest.mark.parametrize("overrides, key", [
    (["deepspeed.offload_params=true"], "deepspeed.offload_params"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["parallel.tensor=2"], "parallel.tensor=1"),
    (["train.engine=fsdp"], "train.engine"),
])
def test_config_rejects_what_the_deepspeed_engine_cannot_run(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        base_config(*overrides)


@pytest.mark.parametrize("overrides, message", [
    (["train.engine=megatron", "deepspeed.zero_stage=3"],
     "deepspeed.zero_stage configure train.engine=deepspeed, but this run trains with train.engine=megatron"),
    (["train.engine=megatron", "deepspeed.offload_optimizer=true", "deepspeed.extra={zero_optimization: {}}"],
     "deepspeed.offload_optimizer, deepspeed.extra configure train.engine=deepspeed"),
    (["parallel.bucket_size=1000"], "parallel.bucket_size (1000) sizes megatron's gradient buckets"),
    (["parallel.distributed_optimizer=false"], "parallel.distributed_optimizer=false is megatron's"),
])
def test_a_key_only_the_other_engine_reads_is_refused_not_ignored(overrides, message):
    # each was silently ignored: deepspeed.zero_stage=3 without train.engine=deepspeed trained megatron's ZeRO-1
    with pytest.raises(ConfigError, match=re.escape(message)):
        base_config(*overrides)
    base_config("train.engine=megatron", "parallel.bucket_size=1000", "parallel.distributed_optimizer=false")


def run_cases(nproc: int, cases: dict[str, str], tmp: Path, **env: str) -> str:
    """The cases of ds_cases.py in one torchrun launch of `nproc` processes; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(REPO / "tests" / "engines" / "workers" / "ds_cases.py"), *(f"{name}:{spec}" for name, spec in cases.items())],
        cwd=REPO, env=worker_env(RATPT_TEST_TMP=str(tmp), **env), text=True, capture_output=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def two_rank_cases(tmp_path_factory) -> str:
    return run_cases(2, TWO_RANK_CASES, tmp_path_factory.mktemp("ds_cases"))


@pytest.fixture(scope="module")
def four_rank_cases(tmp_path_factory) -> str:
    return run_cases(4, FOUR_RANK_CASES, tmp_path_factory.mktemp("ds_cases4"))


def passed(output: str, case: str) -> bool:
    return re.search(rf"^OK {re.escape(case)} ", output, re.MULTILINE) is not None


@pytest.mark.parametrize("case", ["stage1", "stage2", "stage3"])
def test_zero_stage_equals_one_process_adamw_after_several_steps(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.parametrize("case", ["stage2-offload", "stage3-offload"])
def test_cpu_offload_equals_one_process_adamw(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.parametrize("case", ["cp2dp2-stage1", "cp2dp2-stage2", "cp2dp2-stage3"])
def test_context_parallel_times_zero_data_parallel_equals_one_process(four_rank_cases, case):
    assert passed(four_rank_cases, case)


def test_zigzag_context_parallel_under_zero3_equals_one_process(two_rank_cases):
    assert passed(two_rank_cases, "cp2-zigzag-stage3")


@pytest.mark.parametrize("case", ["documents-stage3", "documents-cp2-stage3"])
def test_packed_documents_under_zero_equal_one_process_with_documents(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.parametrize("case", ["compiled-stage2", "compiled-cp2-stage3"])
def test_compiled_blocks_under_zero_equal_one_process_eager(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.gpu
def test_two_gpus_nccl_equal_one_process(tmp_path):  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    cases = {name: TWO_RANK_CASES[name] for name in ("stage1", "stage2", "stage3", "bf16-stage1", "bf16-stage2",
                                                     "resume-stage3",
                                                     "consolidate-stage3")}
    cases["cp2-stage3"] = "stage=3,cp=2,layout=contiguous"
    cases["cp2-zigzag-stage3"] = TWO_RANK_CASES["cp2-zigzag-stage3"]
    output = run_cases(2, cases, tmp_path, RATPT_TEST_DEVICE="cuda")
    assert all(passed(output, case) for case in cases), output


@pytest.mark.parametrize("case", ["bf16-stage1", "bf16-stage2"])  # stage 1: DeepSpeed's BF16_Optimizer
def test_bf16_trains_close_to_fp32(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.parametrize("case", ["skip-stage1", "skip-stage3"])
def test_non_finite_step_is_skipped_leaving_weights_and_adam_state_untouched(two_rank_cases, case):
    assert passed(two_rank_cases, case)


def test_activation_checkpointing_under_zero3_equals_one_process(two_rank_cases):
    assert passed(two_rank_cases, "recompute-stage3")


@pytest.mark.parametrize("case", ["resume-stage3", "resume-stage2-cp2"])
def test_deepspeed_checkpoint_resumes_to_bit_identical_losses(two_rank_cases, case):
    assert passed(two_rank_cases, case)


@pytest.mark.parametrize("case", ["consolidate-stage1", "consolidate-stage3"])
def test_consolidation_gives_exactly_the_engine_weights(two_rank_cases, case):
    assert passed(two_rank_cases, case)


def test_deepspeed_engine_refuses_a_checkpoint_of_another_engine(tmp_path):
    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "step": 4}, step / "state.pt")
    with pytest.raises(CheckpointError, match="train.engine=deepspeed"):
        deepspeed_checkpoint_dir(tmp_path)


# ----- end to end: the trainer under torchrun (tens of seconds each) ---------------------------

RUN = ("train.engine=deepspeed", "deepspeed.zero_stage=3", "train.steps=8", "checkpoint.interval=2")


def run_overrides(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """The overrides of configs/tiny.yaml that make the DeepSpeed run."""
    return [f"out_dir={out_dir}", f"data.streams=[{{path: {data}}}]", "model.vocab_size=257", "model.d_model=64",
            "model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=2", "eval.interval=0",
            "logging.interval=1", "logging.tensorboard=false", *RUN, *extra]


def train_command(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """`ratpt train` of the DeepSpeed run on 2 torchrun processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ratpt",
            "train", str(REPO / "configs" / "tiny.yaml"), *run_overrides(data, out_dir, *extra)]


WHOLE_RUN = ("logging.tensorboard=true", "eval.interval=4", "eval.max_samples=8")


@pytest.fixture(scope="module")
def uninterrupted(byte_data, tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ds_whole")
    done = subprocess.run(train_command(byte_data, run_dir, *WHOLE_RUN),
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return run_dir, done.stdout + done.stderr


@pytest.fixture(scope="module")
def one_process(byte_data, tmp_path_factory) -> dict[int, float]:
    """The losses of the same run in one process (the default engine, which is plain torch AdamW there),
    trained by what `ratpt train` runs, in this process: the reference."""
    from ratpt.train.trainer import train

    # RUN's deepspeed.zero_stage=3 set back to the default, which the megatron engine requires
    overrides = run_overrides(byte_data, tmp_path_factory.mktemp("one_process"), *WHOLE_RUN, "train.engine=megatron",
                              "deepspeed.zero_stage=1")
    return dict(enumerate(train(load_config(REPO / "configs" / "tiny.yaml", overrides)).losses, start=1))


@pytest.mark.slow
def test_trainer_runs_deepspeed_with_tensorboard_metrics_and_evaluation(uninterrupted, one_process):
    run_dir, output = uninterrupted
    losses, reference = losses_of(output), one_process
    assert losses.keys() == reference.keys() == set(range(1, 9)) and "val loss" in output
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], abs=2e-4), step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(events.Tags()["scalars"])
    assert load_checkpoint(run_dir / "checkpoints") == {"engine": "deepspeed", "step": 8}


@pytest.mark.slow
def test_deepspeeds_files_are_checksummed_and_a_changed_byte_is_named_at_resume(uninterrupted, tmp_path):
    import json
    import shutil

    run_dir, _ = uninterrupted
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    listed = json.loads((checkpoint / "checksums.json").read_text())["files"]
    written = {p.relative_to(checkpoint).as_posix() for p in (checkpoint / "deepspeed").rglob("*") if p.is_file()}
    assert written and written <= set(listed)  # every rank's ZeRO partitions and DeepSpeed's model states
    copy = tmp_path / "copy" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    changed = copy / sorted(written)[0]
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "ratpt.engines.deepspeed_checkpoint", str(copy), str(tmp_path / "out")],
                          cwd=REPO, env=ENV, text=True, capture_output=True, timeout=600)
    assert done.returncode != 0 and sorted(written)[0] in done.stdout + done.stderr, done.stderr[-2000:]


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


@pytest.mark.slow
def test_killed_deepspeed_run_resumes_to_the_same_losses(byte_data, uninterrupted, whole_plain, tmp_path):
    proc = subprocess.Popen(train_command(byte_data, tmp_path), cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while latest_checkpoint(tmp_path / "checkpoints") is None and proc.poll() is None:
            time.sleep(0.05)
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:  # both ranks (torchrun gives them their own session), torchrun
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(tmp_path / "checkpoints")["step"]
    assert killed_at < 8, "the run was killed before it finished"

    resumed = subprocess.run(train_command(byte_data, tmp_path), cwd=REPO, env=ENV, text=True,
                             capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-5000:] + resumed.stderr[-5000:]
    output = resumed.stdout + resumed.stderr
    assert "resumed from" in output
    whole = losses_of(uninterrupted[1])
    again = losses_of(output)
    assert min(again) == killed_at + 1 and max(again) == 8
    assert again == {s: whole[s] for s in again}
    whole_model = load_checkpoint(whole_plain)["model"]
    resumed_model = load_checkpoint(consolidated(tmp_path, tmp_path / "resumed"))["model"]
    for name, value in whole_model.items():
        assert torch.equal(value, resumed_model[name]), name


def consolidated(run_dir: Path, out: Path) -> Path:
    """The run's newest DeepSpeed checkpoint as a plain one, through the shipped command."""
    done = subprocess.run([sys.executable, "-m", "ratpt.engines.deepspeed_checkpoint", str(run_dir), str(out)],
                          cwd=REPO, env=ENV, text=True, capture_output=True)
    assert done.returncode == 0, done.stderr[-5000:]
    return latest_checkpoint(out)


@pytest.fixture(scope="module")
def whole_plain(uninterrupted, tmp_path_factory) -> Path:
    """The uninterrupted run's final checkpoint as a plain one, consolidated once for the tests that read it."""
    return consolidated(uninterrupted[0], tmp_path_factory.mktemp("ds_plain"))


@pytest.mark.slow
def test_final_checkpoint_consolidates_into_an_exportable_plain_checkpoint(whole_plain, tmp_path):
    assert whole_plain.name == "step_00000008"
    assert set(load_checkpoint(whole_plain)) == {"model", "step"}
    export = subprocess.run([sys.executable, "-m", "ratpt", "export", str(whole_plain), "--out",
                             str(tmp_path / "hf")], cwd=REPO, env=ENV, text=True, capture_output=True)
    assert export.returncode == 0, export.stderr[-5000:]
    exported, model_cfg = load_pretrained(tmp_path / "hf")
    plain_model = build_model(model_cfg)
    plain_model.load_state_dict(load_checkpoint(whole_plain)["model"])
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 40))
    torch.testing.assert_close(exported(tokens), plain_model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("what", ["missing", "plain"])
def test_consolidating_a_missing_or_plain_checkpoint_is_one_line_naming_it(trained_run, tmp_path, what):
    checkpoint = tmp_path / "nothing" if what == "missing" else latest_checkpoint(trained_run / "checkpoints")
    done = subprocess.run([sys.executable, "-m", "ratpt.engines.deepspeed_checkpoint", str(checkpoint),
                           str(tmp_path / "out")], cwd=REPO, env=ENV, text=True, capture_output=True, timeout=600)
    expected = "no complete checkpoint at" if what == "missing" else "a plain checkpoint, which eval, export and generate"
    assert done.returncode == 2 and "error: " in done.stderr and expected in done.stderr, done.stderr[-2000:]
    assert str(checkpoint) in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
