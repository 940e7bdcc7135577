"""data_prep tokenize --workers N as processes: workers die with their parent, a signal stops the
whole run with a message, and a second run on the same --out is refused while the first writes.

The inputs are named pipes: a worker opening one blocks until a writer appears, so the run is
reliably in flight, with its workers started, for as long as a test needs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # the interpreter imports torch and streaming before it starts workers (2 busy cores)


def children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's reaper may take its time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class Run:
    """A `python -m data_prep tokenize` process over two named pipes, with 2 workers. Its output goes
    to a file: a pipe would stay open (and a read of it hang) as long as an orphan worker lives."""

    def __init__(self, tmp_path: Path, name: str, *extra: str) -> None:
        pipes = [tmp_path / f"pipe{i}.txt" for i in range(2)]
        for pipe in pipes:
            if not pipe.exists():
                os.mkfifo(pipe)
        self.out = tmp_path / "out"
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "data_prep", "tokenize", *map(str, pipes), "--out", str(self.out),
                 "--workers", "2", *extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        self.workers: list[int] = []

    def wait_for_workers(self) -> list[int]:
        assert wait_until(lambda: len(children(self.process.pid)) == 2, START_TIMEOUT_S), "no workers started"
        self.workers = children(self.process.pid)
        return self.workers

    def finish(self, timeout: float) -> str:
        """Wait for the process to exit and return its output; fail the test if it does not."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if self.process.poll() is None:
            pytest.fail(f"{' '.join(self.process.args[3:])} still running after {timeout} s")
        return self.log.read_text()

    def stop(self) -> None:
        """End what this test started, by pid: the run, then any worker it left behind."""
        if self.process.poll() is None:
            self.workers += [p for p in children(self.process.pid) if p not in self.workers]
            self.process.kill()
        self.process.wait()
        for pid in self.workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs(tmp_path):
    started: list[Run] = []

    def start(*extra: str) -> Run:
        started.append(Run(tmp_path, f"run{len(started)}", *extra))
        return started[-1]

    yield start
    for run in reversed(started):
        run.stop()


def test_workers_die_with_a_killed_parent(runs):
    run = runs()
    workers = run.wait_for_workers()
    run.process.send_signal(signal.SIGKILL)
    run.process.wait()
    assert wait_until(lambda: not any(alive(p) for p in workers), 5.0), "orphan workers outlived their parent"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_stops_the_workers_and_exits_non_zero_with_a_message(runs, signum):
    run = runs()
    workers = run.wait_for_workers()
    run.process.send_signal(signum)
    output = run.finish(timeout=START_TIMEOUT_S)  # a loaded machine slows the unwinding too
    assert run.process.returncode == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in output and "--resume" in output
    assert "Traceback" not in output
    assert not any(alive(p) for p in workers), "workers outlived their stopped parent"


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(runs):
    first = runs()
    first.wait_for_workers()
    second = runs("--resume")
    output = second.finish(timeout=60)
    assert second.process.returncode == 1
    assert f"{first.out} is in use by data_prep tokenize (pid {first.process.pid}" in output
    assert first.process.poll() is None, "the refused run disturbed the first one"
