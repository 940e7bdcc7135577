"""Decode steps that are set up once per process and reused for every prompt batch and token.

A decode step is hundreds of small kernels; at small batches launching them from Python costs
more than running them. `GraphedDecodeStep` captures one step in a CUDA graph and replays it;
`Decoder` keeps one persistent cache and graph per batch-size bucket (powers of two), so the
capture is paid once, at start-up, and each new prompt batch only copies its prefilled cache in.
`compile_decode` runs each block's decode through torch.compile, which fuses the norms, gates
and residuals around the projections into a few kernels (the RAT decode kernel stays one opaque
custom op); it composes with the graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ratpt.model.cache import ModelCache
from ratpt.model.lm import RATLM

DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [n] -> next-token logits [n, vocab]


class GraphedDecodeStep:
    """`model.decode_step(tokens, cache)` captured once in a CUDA graph and replayed per token.

    The first `warmup` calls are real decode steps run eagerly on a side stream (they compile the
    Triton kernels and set up cuBLAS, which a capture cannot do); the next call captures one step
    and replays it, and every later call copies the tokens into the graph's input and replays. The
    cache must be static (prefilled with a capacity). The returned logits are the graph's output
    buffer: the next call overwrites them.
    """

    def __init__(self, model: RATLM, cache: ModelCache, warmup: int = 2):
        if not cache.static:
            raise ValueError("a CUDA-graphed decode step needs a cache prefilled with a capacity")
        if not cache.lengths.is_cuda:
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.cache.reserve_next()  # the host-side count that the graph does not replay
            self.tokens.copy_(tokens)
        elif self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.model.decode_step(tokens, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        else:
            self.tokens = tokens.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.model.decode_step(self.tokens, self.cache)
        self.graph.replay()
        return self.logits


def compile_decode(model: RATLM, mode: str | None = None) -> None:
    """torch.compile each block's decode with static shapes (`mode` as torch.compile's; under our
    own CUDA graph use a mode without CUDA graphs: None or "max-autotune-no-cudagraphs").
    Identical blocks share one compiled graph; each new batch size compiles once more."""
    for layer in model.layers:
        layer.decode = torch.compile(layer.decode, dynamic=False, mode=mode)


@dataclass
class _Bucket:
    cache: ModelCache  # persistent: the graph reads and writes these tensors
    step: DecodeFn  # the graphed (or, off CUDA, eager) decode step on `cache`


class Decoder:
    """Decode steps on persistent caches of `capacity` tokens per sequence, one per batch-size
    bucket (the next power of two): `prepare(n)` builds a bucket (its cache, warmup and, with
    `cuda_graph`, the capture), `load(cache)` takes in a batch's prefilled cache and returns the
    step to call per token. Rows past the batch decode padding nobody reads. Without `cuda_graph`
    (e.g. on CPU) the same buckets run eager steps.
    """

    def __init__(self, model: RATLM, capacity: int, cuda_graph: bool):
        self.model, self.capacity, self.cuda_graph = model, capacity, cuda_graph
        self.buckets: dict[int, _Bucket] = {}

    @staticmethod
    def bucket_size(batch: int) -> int:
        return 1 << (batch - 1).bit_length()

    @torch.inference_mode()
    def prepare(self, batch: int) -> None:
        """Build the bucket that holds `batch` sequences, if not yet built (start-up work, done once)."""
        size = self.bucket_size(batch)
        if size in self.buckets:
            return
        device = next(self.model.parameters()).device
        tokens = torch.zeros(size, 1, dtype=torch.long, device=device)
        _, cache = self.model.prefill(tokens, capacity=self.capacity)
        if self.cuda_graph:
            graphed = GraphedDecodeStep(self.model, cache)
            for _ in range(graphed.warmup + 1):  # eager warmups, then the capture (and one replay)
                cache.lengths.zero_()  # each at position 0, so that any capacity holds them
                cache.bound = 0
                graphed(tokens[:, 0])
            step = graphed
        else:
            def step(t: torch.Tensor) -> torch.Tensor:
                return self.model.decode_step(t, cache)
        self.buckets[size] = _Bucket(cache, step)

    @torch.inference_mode()
    def load(self, cache: ModelCache) -> DecodeFn:
        """The decode step continuing the prefilled `cache` (n sequences, this decoder's capacity),
        copied into its bucket; it takes tokens [n] and returns logits [n, vocab], a view that the
        next step overwrites."""
        n = cache.lengths.shape[0]
        self.prepare(n)
        bucket = self.buckets[self.bucket_size(n)]
        bucket.cache.load_(cache)
        padding = bucket.cache.lengths.shape[0] - n

        def step(tokens: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():  # the bucket's tensors were made in inference mode
                return bucket.step(torch.nn.functional.pad(tokens, (0, padding)))[:n]
        return step
