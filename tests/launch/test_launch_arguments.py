"""The launch scripts' own argument checks, without SLURM: each refuses a bad argument or environment at
once, naming it, before any job step or training process starts (fast; the SLURM runs are in
test_slurm_training.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARRAY_TASK = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "0",
              "SLURM_ARRAY_TASK_MAX": "0"}


def run_script(script: Path, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`bash script args` in `cwd` with the environment's SLURM_* and RATPT_* replaced by `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RATPT_"))}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=base | env, capture_output=True, text=True,
                          timeout=30)


def test_tokenize_refuses_a_missing_list_instead_of_finishing_with_no_inputs(tmp_path):
    env = ARRAY_TASK | {"RATPT_REPO": str(tmp_path), "RATPT_PYTHON": "/bin/false"}
    result = run_script(REPO / "launch" / "tokenize.sh", ["missing list.txt", "out dir"], tmp_path, env)
    assert result.returncode == 2
    assert "LIST missing list.txt is not a readable file" in result.stderr


@pytest.mark.parametrize("script", ["rat_1p3b.sh", "rat_1p3b_128k.sh"])
def test_a_cluster_script_outside_the_repository_says_where_to_submit_from(tmp_path, script):
    result = run_script(REPO / "launch" / script, [], tmp_path, {"SLURM_SUBMIT_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "submit from the repository root" in result.stderr and "RATPT_REPO" in result.stderr


def test_slurm_train_refuses_a_missing_config_before_starting_a_job_step(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("scontrol", "echo node1"), ("srun", f"touch {tmp_path}/srun_ran")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = {"RATPT_REPO": str(REPO), "RATPT_PYTHON": "/bin/false", "RATPT_MASTER_PORT": "29500",
           "SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_script(REPO / "launch" / "slurm_train.sh", ["configs/no such config.yaml"], tmp_path, env)
    assert result.returncode == 2
    assert "config configs/no such config.yaml is not a file" in result.stderr
    assert not (tmp_path / "srun_ran").exists()


def test_streams_of_without_a_folder_prints_its_usage():
    result = subprocess.run([sys.executable, str(REPO / "launch" / "streams_of.py")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("usage: python launch/streams_of.py OUT")


def test_streams_of_quotes_a_path_with_a_comma_and_a_colon(tmp_path):
    out = tmp_path / "a, b: c"
    (out / "part_000").mkdir(parents=True)
    (out / "part_000" / "stats.json").write_text(json.dumps({"tokens": {"train": 7}}))
    result = subprocess.run([sys.executable, str(REPO / "launch" / "streams_of.py"), str(out)], capture_output=True,
                            text=True, check=True)
    key, value = result.stdout.strip().split("=", 1)
    assert key == "data.streams"
    assert yaml.safe_load(value) == [{"path": str(out / "part_000"), "weight": 7}]


def test_local_train_takes_relative_paths_from_where_it_is_run(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nif [ "$1" = -c ]; then echo 0; else echo "$PWD $*"; fi\n')
    fake_python.chmod(0o755)
    result = run_script(REPO / "launch" / "local_train.sh", ["configs/tiny.yaml"], tmp_path,
                        {"RATPT_PYTHON": str(fake_python)})
    assert result.stdout.strip() == f"{tmp_path} -m ratpt train configs/tiny.yaml"


def test_local_train_without_a_python_says_how_to_get_one(tmp_path):
    result = run_script(REPO / "launch" / "local_train.sh", ["configs/tiny.yaml"], tmp_path,
                        {"RATPT_PYTHON": str(tmp_path / "no python")})
    assert result.returncode == 2 and "run launch/setup_env.sh, or set RATPT_PYTHON" in result.stderr
