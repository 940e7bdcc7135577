"""Errors raised deep in the data and training loops whose message already names the fault and the fix.

They live apart from the code that raises them so that the command line can catch them (and print the
message without a traceback) without importing that code: the loader's module imports mosaicml-streaming
and transformers, seconds that `ratpt export` or `ratpt generate` would pay for nothing.
"""


class CorruptShardError(RuntimeError):
    """A shard's size or hash differs from its index.json entry, the document table disagrees with
    the shards, or a split's files cannot be read."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""
