"""Sequence-mixing ops: the one dispatch point between model code and its implementations.

Model code imports these names from `ratpt.ops` only. Each is a pure-PyTorch reference
(readable ground truth, runs anywhere), except `rat_mixing`, RAT's whole sequence mixing,
`rat_prefill_mixing`, the same with the decode cache, `rat_decode_mixing`, its one-token
decode step, `attention_decode`, attention's, and `decode_linear`, a decode step's linear layer with
its norm, activation and residual: each picks between its reference and the Triton kernels of
`kernels/` (`model.kernels`); and the sliding window of `causal_attention` and `document_attention`,
which run FlexAttention on CUDA. Packed documents that do not see each other reach every op as
`positions` (ratpt.ops.documents).
"""
from ratpt.ops.attention_decode import attention_decode, attention_decode_reference
from ratpt.ops.chunk_scan import chunk_scan, forget_gate, linear_scan, reset_scan
from ratpt.ops.decode_linear import activate, decode_linear, rms_norm
from ratpt.ops.document_attention import document_attention
from ratpt.ops.documents import separate_documents
from ratpt.ops.inter_chunk_attention import attend_summaries, inter_chunk_attention
from ratpt.ops.rat_decode import rat_decode_mixing, rat_decode_reference
from ratpt.ops.rat_mixing import rat_mixing, rat_mixing_reference, split_projection
from ratpt.ops.rat_prefill import rat_prefill_mixing, rat_prefill_reference
from ratpt.ops.rope import apply_rope, rope_cos_sin, rope_tables
from ratpt.ops.sliding_window_attention import causal_attention, windowed_attention

__all__ = ["activate", "apply_rope", "attend_summaries", "attention_decode", "attention_decode_reference",
           "causal_attention", "chunk_scan", "decode_linear", "document_attention", "forget_gate",
           "inter_chunk_attention", "linear_scan", "rat_decode_mixing", "rat_decode_reference", "rat_mixing",
           "rat_mixing_reference", "rat_prefill_mixing", "rat_prefill_reference", "reset_scan", "rms_norm",
           "rope_cos_sin", "rope_tables", "separate_documents", "split_projection", "windowed_attention"]
