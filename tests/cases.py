"""What the torchrun workers (tests/*/workers/) share: their case language and their batches.

A case is `name:SPEC` (one configuration) or `name:A>B` (configuration A, then its state resumed in
B), a SPEC being `key=value,key=value`; each worker maps the keys to config keys its own way. The
batches are random tokens with a few unlabelled positions (and, with data.document_masking, documents of
random lengths), cut into micro-batches, and each data-parallel rank reads its contiguous slice of them, as
the data loader hands them out.
"""
from __future__ import annotations

import torch


def split_case(case: str) -> tuple[str, str, str | None]:
    """`name:A>B` -> (name, A, B); B is None for a case without a resume."""
    name, _, spec = case.partition(":")
    first, _, second = spec.partition(">")
    return name, first, second or None


def parse_spec(spec: str) -> dict[str, str]:
    """`key=value,key=value` -> {key: value}, in order."""
    items = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"case item {item!r} is not key=value")
        items[key] = value
    return items


def global_batches(cfg, step: int, unlabelled: tuple[tuple[int, slice], ...] = ((0, slice(0, 5)),)) -> list[dict]:
    """The micro-batches of global step `step` (seeded by it); labels of the (sequence, positions) in
    `unlabelled` are ignored, as after a document boundary."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.data.seq_len + 1), generator=g)
    labels = tokens[:, 1:].clone()
    for row, positions in unlabelled:
        labels[row, positions] = -100
    mb = cfg.train.micro_batch
    batches = [{"input_ids": tokens[i:i + mb, :-1], "labels": labels[i:i + mb]} for i in range(0, len(tokens), mb)]
    if cfg.data.document_masking:  # a document starts at about one token in eight
        starts = torch.rand(labels.shape, generator=g) < 0.125
        starts[:, 0] = True
        # the first row's: 5 tokens (shorter than the workers' chunk of 8), then one across the CP blocks'
        # boundary at token 16 with a chunk that straddles it (tokens 13-20), then the rest
        starts[0] = False
        starts[0, [0, 5, 37]] = True
        index = torch.arange(labels.shape[1]).expand_as(labels)
        positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
        for i, batch in enumerate(batches):
            batch["positions"] = positions[i * mb:(i + 1) * mb]
    return batches


def rank_batches(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """This data-parallel rank's micro-batches: the r-th contiguous slice, as the loader orders them."""
    per_rank = len(batches) // dp_size
    return batches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
