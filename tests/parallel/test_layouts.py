"""Every parallel layout equals one process on the same batch: loss, gradients, grad norm and the
parameters after one optimizer step (tests/parallel/layouts.py states the checks and tolerances).
Each test is one torchrun launch that runs several layouts, to keep the CPU time small."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def run_layouts(nproc: int, *cases: str, **env_vars: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))), **env_vars}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
         str(REPO / "tests" / "parallel" / "layouts.py"), *cases],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    for case in cases:
        assert f"OK {case.split(':')[0]} " in done.stdout, done.stdout
    return done.stdout


def test_two_ranks_data_context_and_tensor_parallel_equal_one_process():
    run_layouts(
        2,
        "dp2:",  # megatron DDP + distributed optimizer, 2 micro-batches per rank (accumulation)
        "cp2-rat:context=2",  # chunk summaries all-gathered / reduce-scattered
        "cp2-rat+swa:context=2,mixers=rat+swa",  # sliding window: previous rank's last window
        "cp2-attention:context=2,mixers=attention",  # all-gather of K and V
        "resume-dp2-to-cp2:>context=2",  # state gathered in one layout, loaded into another
        # TP + SP: every mixer and the SwiGLU FFN as column/row-parallel linears, vocab-parallel
        # embedding, head and cross-entropy, norms' gradients all-reduced over TP
        "tp2-all-mixers:tensor=2,mixers=rat+swa+attention+rnn,n_layers=4,ffn=swiglu,micro_batch=2",
        "resume-tp2-to-one-process:tensor=2>local",  # TP shards gathered into the plain checkpoint
        # PP, interleaved 1F1B (2 virtual stages per rank; p2p across the two ranks both ways)
        "pp2-interleaved-rat+swa:pipeline=2,virtual_stages=2,n_layers=4,mixers=rat+swa",
        "resume-pp2-to-tp2:pipeline=2>tensor=2",  # stages merged, then TP shards scattered
    )


def test_four_ranks_combined_layouts_pp_dp_cp_tp_equal_one_process():
    run_layouts(
        4,
        "dp2xcp2-rat+swa:context=2,mixers=rat+swa",
        "cp4-rat:context=4",
        "resume-dp4-to-dp2xcp2:mixers=rat+attention>context=2,mixers=rat+attention",
        "dp4-replicated-optimizer:distributed_optimizer=false",
        "tp2xdp2:tensor=2",
        "tp2xcp2-rat+swa:tensor=2,context=2,mixers=rat+swa",
        "pp2xdp2:pipeline=2",  # 1F1B; tied embedding/head all-reduced over the first and last stage
        "pp2xcp2-rat+attention:pipeline=2,context=2,mixers=rat+attention",
        "pp2xtp2-interleaved-rat+swa:pipeline=2,tensor=2,virtual_stages=2,n_layers=4,mixers=rat+swa,micro_batch=2",
        "resume-pp2xtp2-to-dp2xcp2:pipeline=2,tensor=2,mixers=rat+attention>context=2,mixers=rat+attention",
    )


@pytest.mark.gpu
def test_two_gpus_nccl_equal_one_process():  # pragma: no cover - needs 2 GPUs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    run_layouts(
        2,
        "dp2:",
        "cp2-rat+swa:context=2,mixers=rat+swa",
        "cp2-attention:context=2,mixers=attention",
        "tp2-all-mixers:tensor=2,mixers=rat+swa+attention+rnn,n_layers=4,ffn=swiglu,micro_batch=2",
        "pp2-interleaved-rat+swa:pipeline=2,virtual_stages=2,n_layers=4,mixers=rat+swa",
        "resume-pp2-to-tp2:pipeline=2>tensor=2",
        "resume-tp2-to-one-process:tensor=2>local",
        RATPT_TEST_DEVICE="cuda",
    )
