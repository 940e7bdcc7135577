"""What the trainer calls: per-rank micro-batches of one global, world-size-independent order.

Training: global sample i is produced by `PackedTokenDataset[i]` (streams mixed by weight,
documents packed, seeded per epoch). Step j after a start point s covers global samples
[s + j*G, s + (j+1)*G) for global batch G; data-parallel rank r reads the r-th contiguous
slice of G/dp samples, as G/(micro_batch*dp) micro-batches. Any dp_size therefore sees the
same global order, ranks never overlap, and the only resume state is the number of samples
consumed (plus the seed and a fingerprint of the data, checked on resume).

Resume API: `batches = build_train_batches(...)`, then `batches.load_state_dict(state)` with
the `state_dict()` saved in the checkpoint, then `iter(batches)`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

from torch.utils.data import DataLoader

from ratpt.data.config import DataConfig
from ratpt.data.dataset import Collate, OpenStream, PackedTokenDataset, check_tokenizers, open_streams
from ratpt.data.layout import TRAIN, VAL
from ratpt.data.mixing import MIX_BLOCK, SequentialSchedule, WeightedSchedule
from ratpt.data.packing import GROUP_DOCS

STATE_VERSION = 1


class _RankMicroBatches:
    """Global indices of this rank's micro-batches, step after step, from sample `start` on."""

    def __init__(self, start: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> None:
        self.start, self.global_batch, self.micro_batch = start, global_batch, micro_batch
        self.per_rank = global_batch // dp_size
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.start
        while True:
            first = step_start + self.offset
            for a in range(0, self.per_rank, self.micro_batch):
                yield list(range(first + a, first + a + self.micro_batch))
            step_start += self.global_batch


class TrainBatches:
    """Endless iterable of this rank's micro-batches; `state_dict()` after whole steps resumes exactly."""

    def __init__(
        self,
        cfg: DataConfig,
        streams: list[OpenStream],
        eos_id: int,
        micro_batch: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        start_sample: int,
    ) -> None:
        self.cfg = cfg
        self.dataset = PackedTokenDataset(streams, WeightedSchedule([s.config.weight for s in streams], cfg.seed))
        self.collate = Collate(eos_id, cfg.mask_document_boundary, cfg.document_masking)
        self.micro_batch, self.global_batch = micro_batch, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_per_step = global_batch // (micro_batch * dp_size)
        self.fingerprint = _fingerprint(cfg, streams)
        self.samples = start_sample  # global samples consumed by completed steps
        self._started = False

    def state_dict(self) -> dict[str, Any]:
        """Small and JSON-serialisable; identical on every rank."""
        return {"version": STATE_VERSION, "samples": self.samples, "seed": self.cfg.seed, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken; call before iterating. Different data is a ValueError."""
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"the checkpoint's data order used seed {state['seed']}, the config has {self.cfg.seed}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the checkpoint was trained on different data (fingerprint {state['fingerprint']}, now "
                f"{self.fingerprint}): streams, their weights, their shards, seq_len or shuffling changed. "
                "Resume with the original data config, or start a new run"
            )
        self.samples = int(state["samples"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._started = True
        loader = DataLoader(
            self.dataset,
            batch_sampler=_RankMicroBatches(self.samples, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size),
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate,
            persistent_workers=False,
        )
        in_step = 0
        for batch in loader:
            in_step += 1
            if in_step == self.micro_per_step:  # counted when handed out: the step's last micro-batch
                in_step = 0
                self.samples += self.global_batch
            yield batch


class ValBatches:
    """The val/ splits, unshuffled, streams one after another: the same samples every call."""

    def __init__(self, cfg: DataConfig, streams: list[OpenStream], eos_id: int, micro_batch: int,
                 dp_rank: int, dp_size: int, max_samples: int | None) -> None:
        schedule = SequentialSchedule([s.packed.samples_per_epoch for s in streams])
        total = len(schedule) if max_samples is None else min(max_samples, len(schedule))
        self.micro_batches_total = total // micro_batch // dp_size * dp_size  # equal count on every rank
        if self.micro_batches_total == 0 and total < len(schedule):
            raise ValueError(f"eval.max_samples ({max_samples}) is fewer than one micro-batch ({micro_batch}) per rank "
                             f"({dp_size}): raise it to at least {micro_batch * dp_size}")
        if self.micro_batches_total == 0:
            raise ValueError(
                f"validation has {len(schedule)} samples of {cfg.seq_len + 1} tokens, fewer than one micro-batch "
                f"({micro_batch}) per rank ({dp_size}): use a larger data_prep --val-fraction or a smaller seq_len"
            )
        self.dataset = PackedTokenDataset(streams, schedule)
        self.collate = Collate(eos_id, cfg.mask_document_boundary, cfg.document_masking)
        self.micro_batch, self.dp_rank, self.dp_size = micro_batch, dp_rank, dp_size
        self.num_workers = cfg.num_workers

    def __len__(self) -> int:
        return self.micro_batches_total // self.dp_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        mb = self.micro_batch
        batches = [list(range(m * mb, (m + 1) * mb)) for m in range(self.dp_rank, self.micro_batches_total, self.dp_size)]
        yield from DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, collate_fn=self.collate)


def build_train_batches(
    cfg: DataConfig,
    *,
    vocab_size: int,
    micro_batch: int,
    global_batch: int,
    dp_rank: int,
    dp_size: int,
    start_sample: int = 0,
) -> TrainBatches:
    """This rank's training micro-batches; see the module docstring for the order and resumption."""
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} * dp_size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    meta = check_tokenizers(cfg.streams, vocab_size)
    streams = open_streams(cfg, TRAIN, shuffle=cfg.shuffle)
    return TrainBatches(cfg, streams, meta["eos_id"], micro_batch, global_batch, dp_rank, dp_size, start_sample)


def build_val_batches(
    cfg: DataConfig,
    *,
    vocab_size: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    max_samples: int | None,
) -> ValBatches:
    """This rank's share of the first `max_samples` validation samples (all if None), in a fixed order.
    Every rank gets the same number of micro-batches (the tail that would not divide is dropped)."""
    meta = check_tokenizers(cfg.streams, vocab_size)
    streams = open_streams(cfg, VAL, shuffle=False, skip_empty=True)
    if not streams:
        raise ValueError(
            f"no stream has a val/ split that fills one sample of data.seq_len + 1 = {cfg.seq_len + 1} tokens: "
            "lower data.seq_len, re-run data_prep with a larger --val-fraction, or set eval.interval=0"
        )
    return ValBatches(cfg, streams, meta["eos_id"], micro_batch, dp_rank, dp_size, max_samples)


def _fingerprint(cfg: DataConfig, streams: list[OpenStream]) -> str:
    """What the global order depends on besides the seed; equal fingerprints -> equal order."""
    parts = {
        "streams": [{"index": s.docs.fingerprint(), "weight": s.config.weight}
                    | ({"min_doc_tokens": s.config.min_doc_tokens} if s.config.min_doc_tokens else {})
                    for s in streams],  # the key only when set: the fingerprints of earlier runs stay valid
        "seq_len": cfg.seq_len,
        "shuffle": [cfg.shuffle, cfg.shuffle_window, GROUP_DOCS, MIX_BLOCK],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
