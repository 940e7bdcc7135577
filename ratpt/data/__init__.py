"""ratpt.data: tokenizers, and MDS shards -> packed, mixed, resumable training batches.

The loader is imported lazily, so `from ratpt.data.tokenizer import load_tokenizer` (generation)
does not pay for importing mosaicml-streaming.
"""
from typing import Any

_LAZY = {
    "TrainBatches": "ratpt.data.batches",
    "ValBatches": "ratpt.data.batches",
    "build_train_batches": "ratpt.data.batches",
    "build_val_batches": "ratpt.data.batches",
    "Tokenizer": "ratpt.data.tokenizer",
    "load_tokenizer": "ratpt.data.tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ratpt.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
