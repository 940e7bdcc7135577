"""`data_prep tokenize`: many sources, many processes -> one prepared dataset DIR.

Steps: take DIR for this process (ratpt.folder_lock: a second run on DIR, a --resume beside
the run it resumes, is refused naming the holder), claim it (never silently overwritten;
--resume continues, --overwrite restarts), tokenize each source into its own part (skipping
parts a previous attempt finished), merge the parts' MDS indexes with streaming's
`merge_index`, concatenate their per-document token counts (their sha256 goes into the merged
index.json), record the tokenizer and write stats.json. See ratpt/data/layout.py for the layout.

Workers die with the process that started them (Linux's parent-death signal), and any error or
signal that ends the run in the parent kills them first: a worker that outlived its run would
go on writing parts beside a later --resume. While the pool runs, SIGTERM and SIGINT are held
and handled between two waits for the workers (`_HeldSignals`), never in the middle of the
pool's own code, whatever the moment they arrive.
"""
from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from data_prep.part_writer import PartResult, WriterSettings, load_done, part_name, write_part
from ratpt.data.layout import (
    DOC_TOKENS_FILE,
    DOC_TOKENS_SHA256,
    INDEX_FILE,
    META_FILE,
    SPLITS,
    STATS_FILE,
    TOKENIZER_DIR,
    token_dtype,
)
from ratpt.data.streaming_import import streaming
from ratpt.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from ratpt.folder_lock import LOCK_FILE, hold_folder

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # the settings of the run that owns DIR; --resume must match them
MAX_LOGGED_BAD = 50  # bad records logged one by one; all of them go to stats.json
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


class OutputExistsError(Exception):
    """DIR exists and neither --resume nor --overwrite was given, or it is not ours to delete."""


def tokenize_to_shards(
    sources: list[str],
    out: str | Path,
    tokenizer_spec: str,
    settings: WriterSettings,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the prepared dataset and return its stats (also written to DIR/stats.json)."""
    start = time.perf_counter()
    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_spec)
    run = {
        "sources": sources,
        "tokenizer": tokenizer.identity(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "strict"},
    }
    with hold_folder(out, purpose="data_prep tokenize"):
        _claim_output(out, json.loads(json.dumps(run)), resume, overwrite)

        done = {i: load_done(out, part_name(i)) for i in range(len(sources))}
        todo = [i for i, result in done.items() if result is None]
        if len(todo) < len(sources):
            log.info("resuming: %d of %d parts already done", len(sources) - len(todo), len(sources))
        results = {i: r for i, r in done.items() if r is not None}
        results.update(_run_parts(out, sources, todo, tokenizer_spec, settings, workers))

        ordered = [results[i] for i in range(len(sources))]
        for split in SPLITS:
            _merge_split(out / split, [r.part for r in ordered])
        _record_tokenizer(out / TOKENIZER_DIR, tokenizer)
        stats = _stats(ordered, tokenizer, time.perf_counter() - start)
        (out / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return stats


def _claim_output(out: Path, run: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Called while holding `out`, whose lock file is ours and not part of the output."""
    run_file = out / RUN_FILE
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if entries:
        if overwrite:
            if not run_file.is_file():
                raise OutputExistsError(f"{out} is not a data_prep output (no {RUN_FILE}); refusing to delete it")
            log.info("--overwrite: removing the contents of %s", out)
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        elif resume:
            if not run_file.is_file():
                raise OutputExistsError(f"{out} has no {RUN_FILE}: nothing to resume")
            previous = json.loads(run_file.read_text())
            if previous != run:
                changed = sorted(k for k in run if previous.get(k) != run[k])
                raise OutputExistsError(
                    f"{out} was started with different {', '.join(changed)}; "
                    "resume with the same inputs and options, or pass --overwrite"
                )
            return
        else:
            raise OutputExistsError(
                f"{out} already exists; pass --resume to continue an interrupted run or --overwrite to start again"
            )
    run_file.write_text(json.dumps(run, indent=2))


def _run_parts(
    out: Path, sources: list[str], todo: list[int], tokenizer_spec: str, settings: WriterSettings, workers: int
) -> dict[int, PartResult]:
    """Tokenize the parts in `todo`, in this process (workers == 1) or a process pool."""
    results: dict[int, PartResult] = {}
    log_bad = _BadRecordLog()
    bar = tqdm(unit="doc", desc="tokenize", dynamic_ncols=True, smoothing=0.1)
    tokens_seen = [0]
    bar_start = time.perf_counter()

    def progress(docs: int, tokens: int) -> None:
        tokens_seen[0] += tokens
        bar.update(docs)
        bar.set_postfix_str(f"{tokens_seen[0] / max(time.perf_counter() - bar_start, 1e-9):,.0f} tok/s", refresh=False)

    try:
        if workers <= 1 or len(todo) <= 1:
            tokenizer = load_tokenizer(tokenizer_spec)
            for i in todo:
                results[i] = write_part(out, i, sources[i], tokenizer, settings, progress)
                log_bad(results[i])
        else:
            results = _run_pool(
                out, sources, todo, tokenizer_spec, settings, min(workers, len(todo)), progress, log_bad
            )
    finally:
        bar.close()
    return results


_worker_state: dict[str, Any] = {}


def _init_worker(progress_queue: Any, tokenizer_spec: str, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, which fork copied
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_state["queue"] = progress_queue
    _worker_state["tokenizer"] = load_tokenizer(tokenizer_spec)


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this worker when its parent dies, however the parent dies (prctl
    PR_SET_PDEATHSIG; other systems rely on the parent's own cleanup in `_run_pool`)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request above was made
        os._exit(1)


def _worker_part(out: Path, index: int, source: str, settings: WriterSettings) -> PartResult:
    q = _worker_state["queue"]
    return write_part(out, index, source, _worker_state["tokenizer"], settings, lambda d, t: q.put((d, t)))


def _run_pool(
    out: Path,
    sources: list[str],
    todo: list[int],
    tokenizer_spec: str,
    settings: WriterSettings,
    workers: int,
    progress: Callable[[int, int], None],
    log_bad: Callable[[PartResult], None],
) -> dict[int, PartResult]:
    ctx = mp.get_context("fork")  # fork: workers start in milliseconds instead of re-importing torch
    progress_queue = ctx.Queue()
    results: dict[int, PartResult] = {}
    pending: dict[Future, int] = {}
    others = set(mp.active_children())
    with _HeldSignals() as held, ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue, tokenizer_spec, os.getpid())
    ) as pool:
        try:
            for i in todo:  # the first submit forks the workers: in the try, so that a failed fork kills the others
                pending[pool.submit(_worker_part, out, i, sources[i], settings)] = i
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                held.deliver()
                _drain(progress_queue, progress)
                for future in finished:
                    i = pending.pop(future)
                    results[i] = future.result()  # re-raises a worker's BadInputError
                    log_bad(results[i])
        except BaseException:  # a failed part, or a signal turned into an exception: stop now, not after the parts
            for future in pending:
                future.cancel()
            for worker in set(mp.active_children()) - others:  # the pool's workers: ours, not a caller's
                worker.kill()
            raise
        _drain(progress_queue, progress)
    return results


class _HeldSignals:
    """While the pool starts, runs and shuts down, SIGTERM and SIGINT are only recorded; `deliver`
    (and the end of the block) hands a recorded one to the handlers that were there before, which
    may raise (data_prep's `Stopped`, KeyboardInterrupt) or end the process.

    Why: a raising handler runs wherever the main thread happens to be, and during the pool that is
    mostly library code. Raised inside `submit`, just after a worker was forked, the exception
    escaped the cleanup that kills the workers: the pool's shutdown, or multiprocessing's exit
    handler, then waited forever for workers blocked on their input. Raised inside an at-fork hook
    (logging's), it was printed as "Exception ignored" and lost, and the run went on."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _HeldSignals:
        self._hold()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()
        self._raise_received()

    def deliver(self) -> None:
        """Raise a recorded signal now, under the previous handlers: call it where an exception
        unwinds the pool cleanly. Holding goes on after, through that unwinding too."""
        if self.received is not None:
            self._restore()
            try:
                self._raise_received()
            finally:
                self._hold()

    def _hold(self) -> None:
        self.previous = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGINT)}

    def _record(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner:  # a worker forked before `_init_worker` replaced this handler: die of it
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        if self.received is None:
            self.received = signum

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _raise_received(self) -> None:
        signum, self.received = self.received, None
        if signum is not None:
            signal.raise_signal(signum)


def _drain(progress_queue: Any, progress: Callable[[int, int], None]) -> None:
    while True:
        try:
            progress(*progress_queue.get_nowait())
        except queue.Empty:
            return


class _BadRecordLog:
    """Logs bad records one by one up to MAX_LOGGED_BAD, then once that the rest are in stats.json."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, result: PartResult) -> None:
        for bad in result.bad_records:
            if self.count < MAX_LOGGED_BAD:
                log.warning("bad record %s: %s: %s", bad["location"], bad["kind"], bad["detail"])
            elif self.count == MAX_LOGGED_BAD:
                log.warning("more bad records: not logged one by one; all are listed in %s", STATS_FILE)
            self.count += 1


def _merge_split(folder: Path, parts: list[str]) -> None:
    """One MDS index over all parts (streaming's merge_index) and one doc_tokens.npy in the same order."""
    (folder / INDEX_FILE).unlink(missing_ok=True)  # merge_index will not replace it (a resumed run)
    logging.disable(logging.WARNING)  # merge_index warns about its temp folder and the existing out dir
    try:
        streaming.base.util.merge_index([str(folder / p / INDEX_FILE) for p in parts], str(folder), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)
    counts = [np.load(folder / p / DOC_TOKENS_FILE) for p in parts]
    merged = np.concatenate(counts) if counts else np.zeros(0, np.uint32)
    index = json.loads((folder / INDEX_FILE).read_text())
    samples = sum(shard["samples"] for shard in index["shards"])
    if samples != len(merged):
        raise RuntimeError(f"{folder}: {samples} samples in {INDEX_FILE} but {len(merged)} document lengths")
    np.save(folder / DOC_TOKENS_FILE, merged.astype(np.uint32))
    index[DOC_TOKENS_SHA256] = file_sha256(folder / DOC_TOKENS_FILE)  # the reader checks the table against it
    tmp = folder / f"{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, sort_keys=True))
    os.replace(tmp, folder / INDEX_FILE)


def _record_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = tokenizer.identity() | {"dtype": token_dtype(tokenizer.vocab_size).name}
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, folder / tokenizer.path.name)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _stats(results: list[PartResult], tokenizer: Tokenizer, seconds: float) -> dict[str, Any]:
    bad = [b for r in results for b in r.bad_records]
    by_kind: dict[str, int] = {}
    for b in bad:
        by_kind[b["kind"]] = by_kind.get(b["kind"], 0) + 1
    documents = {s: sum(r.documents[s] for r in results) for s in SPLITS}
    tokens = {s: sum(r.tokens[s] for r in results) for s in SPLITS}
    worker_seconds = sum(r.seconds for r in results)
    return {
        "sources": len(results),
        "documents": documents,
        "tokens": tokens,
        "bytes": sum(r.bytes for r in results),
        "seconds": round(seconds, 3),
        "worker_seconds": round(worker_seconds, 3),
        "tokens_per_worker_second": round(sum(tokens.values()) / max(worker_seconds, 1e-9)),
        "bad_records": {"total": len(bad), "by_kind": by_kind, "records": bad},
        "tokenizer": tokenizer.identity(),
    }
