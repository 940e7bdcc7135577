"""Triton kernels for RAT's sequence mixing (forward, backward, prefill, decode) and their autograd wrappers,
attention's length-aware decode, and the small-batch linear layers of a decode step.

The pure-PyTorch ground truth lives in ratpt/ops; ratpt.ops.rat_mixing chooses between the two.
See NOTES.md for the data movement and roofline of each kernel.

This folder installs as the package `ratpt_kernels`. Imported under any other name (as `kernels` from the
repository root, which is what Hugging Face transformers tries when it probes for its own `kernels`
package), it refuses before defining anything: a second import would register the custom ops again.
"""
if __name__ != "ratpt_kernels":
    raise ImportError(f"kernels/ holds ratpt's Triton kernels and imports only as ratpt_kernels (got {__name__!r}; "
                      "install ratpt with `pip install -e .`); Hugging Face's `kernels` package is another one")

from .attention_decode import attention_decode
from .autograd import rat_mixing
from .decode_linear import decode_linear
from .rat_decode import rat_decode
from .rat_fwd import rat_prefill


def supports(chunk_size: int, head_dim: int) -> bool:
    """Shapes the kernels handle: L a power of two up to 128 (blocks hold whole chunks), d in {32, 64, 128}."""
    return chunk_size & (chunk_size - 1) == 0 and 1 <= chunk_size <= 128 and head_dim in (32, 64, 128)


__all__ = ["attention_decode", "decode_linear", "rat_decode", "rat_mixing", "rat_prefill", "supports"]
