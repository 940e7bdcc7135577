"""ratpt.data: tokenizers, and MDS shards -> packed, mixed, resumable training batches."""
from ratpt.data.batches import TrainBatches, ValBatches, build_train_batches, build_val_batches
from ratpt.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["TrainBatches", "ValBatches", "build_train_batches", "build_val_batches", "Tokenizer", "load_tokenizer"]
