"""Durable writes: a folder assembled under a temporary name is flushed, entries and all, before the
rename that publishes it, so that after a crash the published name never points at missing data."""
import os
import shutil
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, and `root` itself (deepest first)."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        if path.is_file() or path.is_dir():
            fsync_path(path)


def fsync_path(path: Path) -> None:
    """Flush one file or directory (a directory's entries: what a rename into it changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Flush `tmp` and rename it to `final`. An existing `final` is moved aside (to a `.old.tmp` name,
    which the checkpoint discovery ignores and the next save clears) and deleted only once the new one
    is in place, so that no moment leaves neither on disk."""
    fsync_tree(tmp)
    aside = final.with_name(final.name + ".old.tmp")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
