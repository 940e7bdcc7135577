"""Errors raised deep in the data and training loops whose message already names the fault and the fix.

They live apart from the code that raises them so that the command line can catch them (and print the
message without a traceback) without importing that code: the loader's module imports mosaicml-streaming
and transformers, seconds that `ratpt export` or `ratpt generate` would pay for nothing.
"""
from typing import Iterable


class CorruptShardError(RuntimeError):
    """A shard's size or hash differs from its index.json entry, the document table disagrees with
    the shards, or a split's files cannot be read."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def raise_first_failed(checks: Iterable[tuple[object, str]]) -> None:
    """ValueError with the message of the first (condition, message) pair whose condition is false: a
    command's flag checks, each message naming the flag and the value it got."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
