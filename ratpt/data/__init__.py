"""ratpt.data: tokenizers, and MDS shards -> packed, mixed, resumable training batches."""
