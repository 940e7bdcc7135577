"""Sequence-mixing ops: the one dispatch point between model code and its implementations.

Model code imports these names from `ratpt.ops` only. Today each is the pure-PyTorch reference
(readable ground truth, runs anywhere); kernels plug in here, behind the same signatures.
"""
from ratpt.ops.chunk_scan import chunk_scan, linear_scan
from ratpt.ops.inter_chunk_attention import attend_summaries, inter_chunk_attention
from ratpt.ops.rope import apply_rope, rope_cos_sin
from ratpt.ops.sliding_window_attention import causal_attention

__all__ = ["apply_rope", "attend_summaries", "causal_attention", "chunk_scan",
           "inter_chunk_attention", "linear_scan", "rope_cos_sin"]
