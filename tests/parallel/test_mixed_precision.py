"""The megatron engine's bf16 mixed precision (bf16 parameters, fp32 gradients and master weights)
equals one process doing the same, and its checkpoints hold the fp32 masters
(tests/parallel/workers/mixed_precision.py states the reference and the tolerances)."""
import pytest
import torch

from run_helpers import REPO, torchrun_cases

SCRIPT = REPO / "tests" / "parallel" / "workers" / "mixed_precision.py"
CASES = (
    "dp2:",  # distributed optimizer: fp32 master shards, bf16 parameters all-gathered
    "pp2:pipeline=2",  # bf16 activations between the stages
    "tp2:tensor=2,distributed_optimizer=false",  # megatron's Float16Optimizer: a full fp32 copy per rank
    "resume-dp2-to-tp2:>tensor=2",  # the gathered state and a distributed checkpoint, bit for bit
)


def test_bf16_layouts_equal_one_process_and_keep_fp32_masters_through_checkpoints(tmp_path):
    torchrun_cases(SCRIPT, 2, str(tmp_path), cases=CASES)


@pytest.mark.gpu
def test_two_gpus_nccl_bf16_layouts(tmp_path):  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    torchrun_cases(SCRIPT, 2, str(tmp_path), cases=CASES, RATPT_TEST_DEVICE="cuda")
