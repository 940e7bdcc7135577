"""data_prep tokenize --workers N as processes: workers die with their parent, a signal stops the
whole run with a message, whenever it arrives, and a second run on the same --out is refused
while the first writes.

The inputs are named pipes: a worker opening one blocks until a writer appears, so the run is
reliably in flight, with its workers started, for as long as a test needs."""
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest

from data_prep.__main__ import main as data_prep_main

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # the interpreter imports torch and streaming before it starts workers (2 busy cores)
RELEASE_S = 10.0  # an in-process run still waiting on its pipes after this long is hung: end it, fail the test


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


def make_pipes(tmp_path: Path) -> list[Path]:
    """The two named-pipe inputs of a run (shared by the runs of one test)."""
    pipes = [tmp_path / f"pipe{i}.txt" for i in range(2)]
    for pipe in pipes:
        if not pipe.exists():
            os.mkfifo(pipe)
    return pipes


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
        pipes = make_pipes(tmp_path)
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


class PipeRelease:
    """After `seconds`, opens and closes the write end of each pipe a reader still waits on: the
    workers of a run hung on them read an empty input and end, so that an in-process test whose
    run hangs fails (`released`) instead of hanging the suite."""

    def __init__(self, pipes: list[Path], seconds: float) -> None:
        self.released: list[Path] = []
        self.timer = threading.Timer(seconds, self._release, (pipes,))
        self.timer.start()

    def _release(self, pipes: list[Path]) -> None:
        for pipe in pipes:
            try:
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader, nothing waits on this pipe
                continue
            self.released.append(pipe)

    def cancel(self) -> None:
        self.timer.cancel()
        self.timer.join()


def signal_on_call(monkeypatch, owner: type, name: str, call: int, signum: int) -> None:
    """Have the `call`-th call of `owner.name` raise `signum` in this process as it returns."""
    original = getattr(owner, name)
    calls = itertools.count(1)

    def then_signal(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if next(calls) == call:
            signal.raise_signal(signum)
        return result

    monkeypatch.setattr(owner, name, then_signal)


SIGNAL_MOMENTS = {  # (class, method, call): the pool forks its workers inside its first submit
    "first_worker_forked": (BaseProcess, "start", 1),
    "last_worker_forked": (BaseProcess, "start", 2),
    "pool_started": (ProcessPoolExecutor, "submit", 1),  # the workers and the pool's thread running
}


@pytest.mark.parametrize("moment", SIGNAL_MOMENTS)
def test_a_signal_while_the_pool_starts_stops_the_run_and_its_workers(tmp_path, monkeypatch, caplog, moment):
    """The moments a signal reaches the run above only by chance, made exact in process. Raised
    there, the exception used to escape the cleanup that kills the workers: the run then waited
    forever, in the pool's shutdown or at exit, for workers blocked on their input."""
    signal_on_call(monkeypatch, *SIGNAL_MOMENTS[moment], signal.SIGTERM)
    pipes = make_pipes(tmp_path)
    others = set(children(os.getpid()))
    release = PipeRelease(pipes, RELEASE_S)
    try:
        code = data_prep_main(["tokenize", *map(str, pipes), "--out", str(tmp_path / "out"), "--workers", "2"])
        assert not release.released, "the run waited for its workers instead of stopping them"
        assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in caplog.text
        assert wait_until(lambda: set(children(os.getpid())) <= others, 5.0), "workers outlived the stopped run"
    finally:
        release.cancel()
        for pid in set(children(os.getpid())) - others:
            os.kill(pid, signal.SIGKILL)
