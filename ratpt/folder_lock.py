"""One process per folder at a time: `with hold_folder(path, purpose="training"):`.

Two processes writing one folder (two runs on one out_dir, a resumed tokenize beside the one it
resumes) destroy each other's files without an error. The holder keeps an exclusive lock on
`FOLDER/.lock` for as long as the block runs; a second taker gets `FolderLocked`, whose message
names the holder (purpose, host, pid, start time, as the holder wrote them into the lock file)
and what to do.

Why `fcntl.flock`: the kernel drops the lock when its holder dies, however it dies (kill -9,
the OOM killer, a segfault), so a crashed holder is stale by construction and the next taker
simply gets the lock: no pid files to judge, no timeouts. It works on local disks and most
cluster file systems (Lustre mounted with `flock`, GPFS, CephFS); a file system that refuses
flock makes the hold fail with an OSError, never pass silently. Unlike `fcntl.lockf`, a flock
belongs to the open file, not to the process: a second hold in the same process is refused too.
NFS: flock becomes an NFS lock, cross-host only with a lock manager (v4, or v3 with lockd).

The lock is advisory: it stops the processes that ask for it, nothing else. Processes forked
while it is held share it (they inherit the open file), so a holder's workers keep the folder
locked until they exit too.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = ".lock"  # inside the held folder; removed when the holder releases it


class FolderLocked(RuntimeError):
    """Another process (or another hold in this one) holds the folder."""

    def __init__(self, folder: Path, holder: dict[str, Any] | None) -> None:
        self.folder, self.holder = folder, holder
        if holder is None:  # the holder has the lock but has not written its record yet
            who = "another process, which is just starting"
        else:
            who = (f"{holder.get('purpose')} (pid {holder.get('pid')} on host {holder.get('host')}, "
                   f"since {holder.get('started')})")
        super().__init__(
            f"{folder} is in use by {who}: wait for it to finish or stop it, or use another folder. "
            f"A holder that died has already released it (the lock in {folder / LOCK_FILE} ends with its process)"
        )

    def __reduce__(self):  # rebuilt from its fields: a refusal on rank 0 is sent to the other ranks pickled
        return FolderLocked, (self.folder, self.holder)


class FolderUnwritable(OSError):
    """The folder cannot be created or its lock file cannot be written."""


@contextmanager
def hold_folder(folder: str | os.PathLike, purpose: str) -> Iterator[Path]:
    """Hold `folder` (created if missing) for this process until the block ends, else raise
    `FolderLocked`. `purpose` (e.g. "training", "data_prep tokenize") is shown to whoever is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder: choose a folder path")
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, folder)
    except OSError as err:  # a parent that cannot hold folders (/proc), no permission, a read-only disk
        raise FolderUnwritable(f"cannot write {folder} for {purpose} ({err.strerror}: {err.filename}): "
                               "choose a folder this user can create and write") from None
    owner = os.getpid()
    try:
        record = {"purpose": purpose, "host": socket.gethostname(), "pid": owner,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield folder
    finally:
        if os.getpid() == owner:  # a forked child leaving a copy of this block must not release the parent's hold
            path.unlink(missing_ok=True)  # while still locked: a taker that opened the old file sees it is gone
            os.close(fd)


def _lock(path: Path, folder: Path) -> int:
    """A descriptor of `path` holding its exclusive flock. The file may be unlinked by a releasing
    holder between our open and our lock; the lock then counts only if it is still the file at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise FolderLocked(folder, holder) from None
        opened = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return fd
        os.close(fd)  # we locked a file its holder had just removed: try the one at `path` now


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0))
    except ValueError:  # empty or half-written: the holder is between taking the lock and writing it
        return None
    return record if isinstance(record, dict) else None
