"""`ratpt train | eval | export | generate | convert` — the command line.

Each subcommand lives beside the code it drives and registers itself with `add_subcommand`;
this module only collects them and sets up logging.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

from ratpt import convert, generate
from ratpt.checkpoint import CheckpointError
from ratpt.config import ConfigError
from ratpt.errors import CorruptShardError, TrainingDiverged
from ratpt.folder_lock import FolderLocked, FolderUnwritable
from ratpt.hf import commands as hf_commands
from ratpt.parallel.process_group import CollectiveTimeout
from ratpt.train import commands

SUBCOMMAND_MODULES = (commands, generate, convert, hf_commands)
# Errors whose message already tells the user what to fix: printed without a traceback
# (unless --log-level DEBUG).
USER_ERRORS = (ConfigError, CheckpointError, TrainingDiverged, CorruptShardError, FileNotFoundError, FileExistsError,
               NotADirectoryError, ValueError, FolderLocked, FolderUnwritable, CollectiveTimeout)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(name: str) -> str:
    """argparse's type of --log-level: a level's name in any case, upper-cased. argparse applies it to the
    default too, so a mistyped RATPT_LOG_LEVEL is named as clearly as a mistyped flag."""
    if name.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a logging level: use one of {', '.join(LOG_LEVELS)} "
                                         f"(the default comes from RATPT_LOG_LEVEL)")
    return name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ratpt", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", type=log_level, default=os.environ.get("RATPT_LOG_LEVEL", "INFO"),
                        help="logging level (DEBUG, INFO, WARNING); also RATPT_LOG_LEVEL")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        module.add_subcommand(subparsers)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=args.log_level if rank == "0" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.log_level == "DEBUG":
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
