"""Durable writes: a folder (or an output file) assembled under a temporary name is flushed, entries and all,
before the rename that publishes it, so that after a crash the published name never points at missing data;
and checksums, so that a folder damaged later is found when it is read."""
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import xxhash


def check_new_folder(out: Path) -> None:
    """Refuse an output folder (`--out`) that holds anything (an export never mixes with older files), or that
    cannot be written where it is, before any work: the folder is assembled beside it and renamed into place."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: name a new folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export folder {out} is not empty: choose a new --out or remove it")
    check_writable_place(out)


def check_output_file(out: Path) -> None:
    """Refuse, before any work, an output file (`--out`) that cannot be written at the end: a folder, a file in a
    folder that does not exist or that this user cannot write (an evaluation or a batch of generations can
    take hours)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the file to write in it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    check_writable_place(out)


def check_writable_place(out: Path, inside: bool = False) -> None:
    """ValueError unless `out` can be made where it is: its nearest existing ancestor (whose missing folders
    would be created) must be a folder this user may write in, not a file. `inside`: the files go into the
    folder `out` itself, which is then the first place looked at."""
    out_path = out.absolute()
    candidates = [out_path, *out_path.parents] if inside else out_path.parents
    place = next(p for p in candidates if p.exists())
    if not place.is_dir():
        raise ValueError(f"--out {out}: {place} is a file, so nothing can be made under it; name another place")
    if not os.access(place, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {place} is not writable by this user; name a folder you may write in")


@contextlib.contextmanager
def whole_text_file(out: Path) -> Iterator[TextIO]:
    """A text file to write that appears at `out` only whole: written under a hidden name beside it, flushed,
    and renamed into place when the block ends without error. A run that fails or is interrupted part-way
    leaves no half output, and any earlier file at `out` as it was."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


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


# ----- checksums ------------------------------------------------------------------------------
# A folder that must arrive whole (a checkpoint, an exported model) carries CHECKSUMS: the size and
# xxh3-128 of each of its files, written last before the folder is published. A flipped byte, a
# truncated or a missing file is then found when the folder is read, not after it trained or
# evaluated on garbage. xxh3 (not a cryptographic hash: this is against corruption, not attackers)
# hashes at memory speed, several GB/s per core, so the re-read costs a fraction of the write.
CHECKSUMS = "checksums.json"
_HASH = "xxh3_128"
_BLOCK = 8 << 20


def file_checksum(path: Path) -> dict[str, Any]:
    """{"bytes", "xxh3_128"} of one file."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return {"bytes": path.stat().st_size, _HASH: digest.hexdigest()}


def folder_files(root: Path) -> list[str]:
    """Every file under `root` (paths relative to it, sorted), the checksum manifest excepted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(root: Path, known: Optional[dict[str, dict[str, Any]]] = None,
                    names: Optional[list[str]] = None) -> None:
    """Write `root/CHECKSUMS` for the files `names` (paths relative to `root`; default: every file under
    it), hashing those not already in `known` (hashed elsewhere, e.g. by the rank that wrote them)."""
    known = known or {}
    entries = {name: known[name] if name in known else file_checksum(root / name)
               for name in (names if names is not None else folder_files(root))}
    (root / CHECKSUMS).write_text(json.dumps({"algorithm": _HASH, "files": entries}, indent=1))


def checksum_mismatch(root: Path) -> Optional[str]:
    """None if every file listed in `root/CHECKSUMS` is there with its size and hash; else what is wrong,
    naming the file. A folder without the manifest (written before ratpt kept checksums) passes."""
    manifest = root / CHECKSUMS
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({err})"
    for name, expected in entries.items():
        path = root / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path} has {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
        if file_checksum(path)[_HASH] != expected[_HASH]:
            return f"{path} differs from its checksum in {CHECKSUMS} (corrupted on disk or in transfer)"
    return None


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the permissions a plain mkdir/open would (0777/0666 less the
    umask): tempfile's folders are 0700 and some writers' files 0600, which would keep a published
    result unreadable to the group on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
