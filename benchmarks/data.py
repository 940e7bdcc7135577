"""Data pipeline throughput: data_prep tokens/s per worker, and loader micro-batches/s.

    python benchmarks/data.py [--mb 32] [--out benchmarks/results/data.json]

The corpus is synthetic (pydoc topics cut into ~2 KB documents and repeated up to --mb MB,
in 8 .jsonl files) so the benchmark needs no download. Tokenizers: the built-in byte
tokenizer, and a byte-level BPE (vocab 32000, the paper's size) trained on pydoc here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from data_prep.part_writer import WriterSettings
from data_prep.pipeline import tokenize_to_shards
from data_prep.train_tokenizer import train_bpe
from ratpt.data import build_train_batches
from ratpt.data.config import DataConfig, StreamConfig

FILES = 8
DOC_CHARS = 2000


def make_corpus(root: Path, megabytes: int) -> list[str]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    pieces = [text[i : i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS)]
    target, written, paths = megabytes * 2**20, 0, []
    handles = [open(root / f"corpus{i}.jsonl", "w") for i in range(FILES)]
    n = 0
    while written < target:
        doc = f"[{n}] " + pieces[n % len(pieces)]
        handles[n % FILES].write(json.dumps({"text": doc}) + "\n")
        written += len(doc)
        n += 1
    for h in handles:
        paths.append(h.name)
        h.close()
    return paths


def bench_prep(sources: list[str], out: Path, tokenizer: str, workers: int) -> dict:
    settings = WriterSettings("text", 0.01, "64mb", None, ("sha1", "xxh64"), False)
    start = time.perf_counter()
    stats = tokenize_to_shards(sources, out, tokenizer, settings, workers=workers)
    wall = time.perf_counter() - start
    tokens = sum(stats["tokens"].values())
    return {
        "tokenizer": tokenizer if tokenizer == "byte" else "bpe32000",
        "workers": workers,
        "documents": sum(stats["documents"].values()),
        "tokens": tokens,
        "megabytes": round(stats["bytes"] / 2**20, 2),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall),
        "tokens_per_s_per_worker": stats["tokens_per_worker_second"],
        "mb_per_s_per_worker": round(stats["bytes"] / 2**20 / stats["worker_seconds"], 2),
    }


def bench_loader(path: Path, vocab_size: int, seq_len: int, micro_batch: int, workers: int, batches: int) -> dict:
    cfg = DataConfig(streams=[StreamConfig(path=str(path))], seq_len=seq_len, num_workers=workers)
    start = time.perf_counter()
    loader = build_train_batches(cfg, vocab_size=vocab_size, micro_batch=micro_batch, global_batch=micro_batch,
                                 dp_rank=0, dp_size=1)
    build_s = time.perf_counter() - start
    it = iter(loader)
    next(it)  # worker start-up and first shard checks are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - start
    return {
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "num_workers": workers,
        "build_s": round(build_s, 3),
        "batches_per_s": round(batches / wall, 1),
        "tokens_per_s": round(batches * micro_batch * seq_len / wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=32, help="corpus size in MB of text")
    parser.add_argument("--out", default="benchmarks/results/data.json", help="where to write the JSON results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "corpus_mb": args.mb}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sources = make_corpus(root, args.mb)
        bpe = str(train_bpe(["pydoc"], 32000, root / "bpe"))
        results["data_prep"] = [
            bench_prep(sources, root / "byte1", "byte", 1),
            bench_prep(sources, root / "byte2", "byte", 2),
            bench_prep(sources, root / "bpe1", bpe, 1),
            bench_prep(sources, root / "bpe2", bpe, 2),
        ]
        results["loader"] = [
            bench_loader(root / "bpe1", 32000, 4096, 8, workers=0, batches=100),
            bench_loader(root / "bpe1", 32000, 4096, 8, workers=2, batches=100),
            bench_loader(root / "byte1", 257, 1024, 32, workers=0, batches=100),
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
