"""A real single-node SLURM cluster on loopback, for tests that `sbatch` the launch scripts.

munged, slurmctld and slurmd run as root from Debian's packages (installed on first use, since
CI starts from a bare machine), with every file (config, state, spool, logs, pid files, munge
socket and key) under one temporary folder; clients find it through SLURM_CONF. The settings
that make SLURM run on one machine: no cgroups or systemd
(linuxproc process tracking, no task plugin), fast rescheduling after a requeue, and a short
munge credential lifetime so a requeued job starts again within seconds.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TOOLS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(Exception):
    """This machine cannot host a test cluster: not root, or SLURM missing and no apt-get."""


def ensure_installed() -> None:
    """Install SLURM and munge from Debian's packages unless they are already there."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's daemons (and installing them) need root")
    if all(shutil.which(tool) for tool in TOOLS):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine as slurmd sees it (NodeName must equal `hostname -s`), reachable on loopback."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = [f for f in line.split() if not f.startswith(("RealMemory=", "UpTime="))]
    return " ".join([fields[0], "NodeAddr=127.0.0.1", *fields[1:], "RealMemory=4000", "State=UNKNOWN"])


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is the environment clients need."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ratpt-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files = [self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]

    def start(self) -> None:
        # munged refuses a socket folder (or parent) that others can write, and a readable key.
        self.root.chmod(0o755)
        (self.root / "munge").mkdir(mode=0o755)
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        key = self.root / "munge" / "munge.key"
        self._run(["mungekey", "-c", "-k", str(key)])
        key.chmod(0o600)
        self._run(["munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                   f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'munge' / 'munged.log'}",
                   f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self.conf.write_text(self._config())
        self._run(["slurmctld", "-f", str(self.conf), "-c"])
        self._run(["slurmd", "-f", str(self.conf)])
        self._wait_for_idle_node()

    def _config(self) -> str:
        host = socket.gethostname().split(".")[0]
        r = self.root
        return "\n".join([
            "ClusterName=ratpt-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a short credential lifetime: otherwise a requeued job waits 120 s to start again
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            "SchedulerParameters=bf_interval=1,sched_interval=1",  # start a requeued job within seconds
            "MinJobAge=4",  # otherwise `sbatch --wait` polls every 8-32 s
            "KillWait=10",
            _node_line(),
            f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                               f"{self.daemon_logs()}")

    def _wait_for_idle_node(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the test node did not become idle in {timeout:.0f} s\n{self.daemon_logs()}")

    def daemon_logs(self) -> str:
        logs = [self.root / "slurmctld.log", self.root / "slurmd.log", self.root / "munge" / "munged.log"]
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())

    def stop(self) -> None:
        """Stop the daemons by the PIDs they recorded, then remove the folder."""
        for pid_file in self._pid_files:
            pid = _read_pid(pid_file)
            if pid is not None:
                _terminate(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- jobs ------------------------------------------------------------------------------------

    def sbatch(self, *args: str, cwd: Path, env: Optional[dict] = None) -> int:
        """Submit a job; returns its id."""
        done = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed:\n{done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); empty once purged."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: int | str, timeout: float) -> dict[str, str]:
        """Wait until the job has finished (through any requeue); returns its final record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED_STATES:
                return info
            time.sleep(0.25)
        # the launcher exports PYTHONFAULTHANDLER: SIGABRT makes every Python process of the job print its
        # threads' stacks into the job's log, which says where a hung run waits
        subprocess.run(["scancel", "--signal=ABRT", str(job_id)], env=self.env)
        time.sleep(3)
        subprocess.run(["scancel", str(job_id)], env=self.env)
        record = self.job(job_id)
        raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s: {record}\n"
                           f"--- job log\n{_tail(record.get('StdOut'))}\n{self.daemon_logs()}")

    def signal_batch(self, job_id: int, name: str) -> None:
        """What SLURM does before a time limit with --signal=B:<name>@N: signal the batch script."""
        self._run(["scancel", f"--signal={name}", "--batch", str(job_id)])


def _tail(log: Optional[str], lines: int = 300) -> str:
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:]) if log else "(none)"
    except OSError as e:
        return f"(unreadable: {e})"


def _read_pid(pid_file: Path) -> Optional[int]:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _terminate(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (the daemons' parent, often not a real init here, may never reap them)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
