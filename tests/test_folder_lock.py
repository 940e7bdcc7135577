"""hold_folder: one process per folder; the second is refused naming the holder; a dead holder's
lock is taken over; the lock goes away when its holder exits."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ratpt.folder_lock import LOCK_FILE, FolderLocked, hold_folder

# A holder in its own process: takes the folder, says so, and keeps it until its stdin closes.
HOLDER = """
import sys
from ratpt.folder_lock import hold_folder
with hold_folder(sys.argv[1], purpose="holder test"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def start_holder(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@pytest.fixture
def holder(tmp_path):
    process = start_holder(tmp_path / "run")
    yield process
    if process.poll() is None:
        process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder_and_the_fix(tmp_path, holder):
    with pytest.raises(FolderLocked) as refused:
        with hold_folder(tmp_path / "run", purpose="second"):
            pytest.fail("two processes hold one folder")
    message = str(refused.value)
    assert str(tmp_path / "run") in message and "holder test" in message
    assert f"pid {holder.pid}" in message and socket.gethostname() in message
    assert re.search(r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", message)
    assert "another folder" in message


def test_a_killed_holders_lock_is_taken_over(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # a killed holder cannot clean up: the file stays
    with hold_folder(tmp_path / "run", purpose="after a crash"):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["purpose"] == "after a crash"


def test_the_lock_is_released_when_its_holder_exits(tmp_path, holder):
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with hold_folder(tmp_path / "run", purpose="next run"):
        pass


def test_a_second_hold_in_the_same_process_is_refused(tmp_path):
    """flock locks belong to an open file, not to a process: one process cannot take a folder twice."""
    with hold_folder(tmp_path / "run", purpose="first"):
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()}"):
            with hold_folder(tmp_path / "run", purpose="second"):
                pass
    with hold_folder(tmp_path / "run", purpose="third"):
        pass


def test_a_file_in_place_of_the_folder_is_a_clear_error(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'run'} is a file"):
        with hold_folder(tmp_path / "run", purpose="training"):
            pass
