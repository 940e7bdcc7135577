"""Fixtures for the SLURM tests: one real test cluster for the session, and training data
tokenized on it by launch/tokenize.sh."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

REPO = Path(__file__).resolve().parents[2]
ARRAY_TASKS = 2
INPUT_FILES = 4


@pytest.fixture(scope="session")
def slurm() -> SlurmCluster:
    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM test cluster: {err}")
    cluster = SlurmCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def write_pydoc_inputs(folder: Path, files: int) -> list[Path]:
    """CPython's documentation topics, split over `files` JSON-lines files."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True)
    paths = [folder / f"topics_{i}.jsonl" for i in range(files)]
    docs = [json.dumps({"text": text}) for _, text in sorted(topics.items())]
    for i, path in enumerate(paths):
        path.write_text("\n".join(docs[i::files]) + "\n")
    return paths


@pytest.fixture(scope="session")
def tokenized(slurm, tmp_path_factory) -> Path:
    """The byte-tokenized corpus as launch/tokenize.sh writes it: one dataset part per array task."""
    root = tmp_path_factory.mktemp("tokenize")
    inputs = write_pydoc_inputs(root / "inputs", INPUT_FILES)
    listing = root / "inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    job = slurm.sbatch(f"--array=0-{ARRAY_TASKS - 1}", "--cpus-per-task=1", f"--output={root}/%A_%a.out",
                       "launch/tokenize.sh", str(listing), str(root / "out"), "--tokenizer", "byte", cwd=REPO)
    for task in range(ARRAY_TASKS):
        record = slurm.wait(f"{job}_{task}", timeout=120)
        log = (root / f"{job}_{task}.out").read_text()
        assert record["JobState"] == "COMPLETED", log
    return root / "out"


def streams_override(tokenized: Path) -> str:
    return subprocess.run([sys.executable, str(REPO / "launch" / "streams_of.py"), str(tokenized)],
                          capture_output=True, text=True, check=True).stdout.strip()
