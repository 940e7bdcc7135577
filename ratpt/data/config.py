"""Typed configuration of the training data: which MDS datasets, how they are mixed and packed."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StreamConfig:
    path: str = "???"  # a data_prep output folder (local path or remote URL such as s3://...); holds train/ and val/
    local: Optional[str] = None  # local cache folder for a remote path (ignored for local paths)
    weight: float = 1.0  # relative share of training samples drawn from this stream


@dataclass
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)  # one or more datasets, mixed by weight
    seq_len: int = 4096  # tokens per training sequence (samples hold seq_len + 1 tokens)
    mask_document_boundary: bool = True  # labels whose input token is EOS get ignore_index (paper)
    seed: int = 1234  # order of samples; same seed -> same global order on any number of ranks
    num_workers: int = 0  # DataLoader worker processes per rank
