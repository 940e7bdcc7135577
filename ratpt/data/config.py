"""Typed configuration of the training data: which MDS datasets, how they are mixed and packed."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StreamConfig:
    path: str = "???"  # a data_prep output folder (local path or remote URL such as s3://...); holds train/ and val/
    local: Optional[str] = None  # local cache folder; required for a remote URL, and for a local path it makes shards be copied in as from a remote
    weight: float = 1.0  # relative share of training samples drawn from this stream
    min_doc_tokens: int = 0  # only documents of at least this many tokens (EOS included), in train and val; 0 keeps
    #                          all. The same path listed twice, once with a minimum, up-weights its long documents


@dataclass
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)  # one or more datasets, mixed by weight
    seq_len: int = 4096  # tokens per training sequence (samples hold seq_len + 1 tokens)
    mask_document_boundary: bool = True  # labels whose input token is EOS get ignore_index (paper)
    document_masking: bool = False  # the documents packed into a sequence do not see each other: batches carry
    #                                 each token's position in its document (docs/data.md#document-masking)
    seed: int = 1234  # order of samples; same seed -> same global order on any number of ranks
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle: bool = True  # False: documents and samples in on-disk order (debugging); True: seeded per-epoch order
    shuffle_window: int = 65536  # samples shuffled together; larger mixes more, smaller keeps a remote cache small
    verify_shards: bool = True  # check each shard's size and xxh64 hash on first use; a corrupt one is an error naming it
