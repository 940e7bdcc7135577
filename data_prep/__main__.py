"""`python -m data_prep tokenize|train-tokenizer`: raw text -> tokens -> MDS shards."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from data_prep.part_writer import BadInputError, WriterSettings
from data_prep.pipeline import OutputExistsError, tokenize_to_shards
from data_prep.sources import PYDOC, SUFFIXES, expand_inputs, why_no_documents
from data_prep.train_tokenizer import train_bpe
from ratpt.folder_lock import FolderLocked, FolderUnwritable

log = logging.getLogger("data_prep")

INPUT_HELP = (
    f"files, folders (searched recursively for {', '.join(SUFFIXES)}), globs (quote them), or "
    f"{PYDOC!r}, the embedded corpus of CPython's documentation topics (no file or network needed). "
    ".jsonl/.json: one JSON object per line, optionally .gz/.zst compressed; .parquet: one row per "
    "document; .txt: the whole file is one document"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser(
        "tokenize",
        help="tokenize text into MDS shards (DIR/train, DIR/val, DIR/tokenizer, DIR/stats.json)",
        description="Tokenize documents, append EOS to each, split train/val by document hash and write "
        "mosaicml-streaming MDS shards. Bad records (unreadable file, invalid JSON, missing field, a field "
        "that is not a string, non-UTF-8 bytes, empty document) are counted, logged with file and line, and skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tok.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    tok.add_argument("--out", required=True, metavar="DIR", help="output folder; never silently overwritten")
    tok.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (built-in: 256 byte ids + EOS 256), a Hugging Face tokenizer.json, a SentencePiece "
        ".model (e.g. Llama-2's), or a folder with meta.json (another dataset's DIR/tokenizer)",
    )
    tok.add_argument("--text-field", default="text", help="JSON key / parquet column that holds the text")
    tok.add_argument("--workers", type=positive_int, default=1, help="processes; each tokenizes whole input files")
    tok.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of documents (chosen by a hash of their text) put in val/"
    )
    tok.add_argument("--shard-size-limit", default="64mb", type=shard_size,
                     help="MDS shard size limit before compression, e.g. 64mb")
    tok.add_argument("--compression", choices=["none", "zstd"], default="none", help="compress shards (MDS zstd)")
    tok.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    again = tok.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in DIR (same inputs and options)"
    )
    again.add_argument(
        "--overwrite", action="store_true", help="delete DIR (only if it is a data_prep output) and start again"
    )

    train = sub.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer (HF tokenizers) with EOS <|endoftext|>",
        description="Train a byte-level BPE tokenizer on the documents of INPUT and save its tokenizer.json, "
        "usable as `tokenize --tokenizer PATH`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.add_argument("inputs", nargs="+", metavar="INPUT", help=INPUT_HELP)
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, EOS and 256 byte tokens included")
    train.add_argument("--out", required=True, metavar="PATH", help="a .json file path, or a folder for tokenizer.json")
    train.add_argument("--text-field", default="text", help="JSON key / parquet column that holds the text")
    return parser


def shard_size(text: str) -> str:
    """--shard-size-limit in MDS's size syntax, checked when the arguments are parsed: before any output
    folder is claimed (a bad value found by the shard writer left one behind)."""
    from ratpt.data.streaming_import import streaming

    try:
        size = streaming.base.util.bytes_to_int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is no size: give a positive size, e.g. 64mb")
    return text


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1, checked before any output folder is claimed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: raised where the main thread is, so the run unwinds (its workers
    killed, its folder released) as for an error. A BaseException, as KeyboardInterrupt is, so that
    no `except Exception` on the way (a reader that turns errors into bad records) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` until the block ends; the previous handlers come back after."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with signals_stop_the_run():
            return run_command(args)
    except Stopped as stop:
        again = " (the parts already written are kept: run the same command with --resume)"
        log.error("%s stopped by %s%s", args.command, stop, again if args.command == "tokenize" else "")
        return 128 + stop.signum


def run_command(args: argparse.Namespace) -> int:
    try:
        sources = expand_inputs(args.inputs)
        if args.command == "train-tokenizer":
            path = train_bpe(sources, args.vocab_size, args.out, args.text_field)
            print(f"tokenizer written to {path}")
            return 0
        if not 0.0 <= args.val_fraction < 1.0:
            raise ValueError("--val-fraction must be in [0, 1)")
        check_out_outside_inputs(args.out, args.inputs)
        settings = WriterSettings(
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            shard_size_limit=args.shard_size_limit,
            compression=None if args.compression == "none" else args.compression,
            hashes=("sha1", "xxh64"),
            strict=args.strict,
        )
        stats = tokenize_to_shards(
            sources, args.out, args.tokenizer, settings, args.workers, resume=args.resume, overwrite=args.overwrite
        )
    except (BadInputError, OutputExistsError, FolderLocked, FolderUnwritable, FileNotFoundError, FileExistsError,
            NotADirectoryError, ValueError) as e:
        log.error("%s", e)
        return 1
    except OSError as e:  # a full disk, a quota, a file size limit: the message, not a traceback
        again = "then run the same command with --resume" if args.command == "tokenize" else "then run it again"
        log.error("cannot write %s: %s; free space or lift the limit, %s", args.out, e, again)
        return 1
    if not sum(stats["documents"].values()):
        log.error("no documents in %s: %s (details in %s/stats.json)", " ".join(args.inputs),
                  why_no_documents(stats["bad_records"]["records"], args.text_field), args.out)
        return 1
    summary = {k: stats[k] for k in ("sources", "documents", "tokens", "bytes", "seconds")}
    summary["bad_records"] = stats["bad_records"]["by_kind"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} ({stats['bad_records']['total']} bad records; details in {args.out}/stats.json)")
    return 0


def check_out_outside_inputs(out: str, specs: list[str]) -> None:
    """--out may not lie in an input folder: the next run over that folder (a --resume, an --overwrite)
    would read the output's own .json files as inputs."""
    for spec in specs:
        if os.path.isdir(spec) and Path(out).resolve().is_relative_to(Path(spec).resolve()):
            raise ValueError(f"--out {out} is inside the input folder {spec}, whose files are all read as inputs: "
                             "choose an --out outside it")


if __name__ == "__main__":
    sys.exit(main())
