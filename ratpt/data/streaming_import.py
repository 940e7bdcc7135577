"""The one place ratpt imports mosaicml-streaming: `from ratpt.data.streaming_import import streaming`.

`import streaming` imports `streaming.vision`, hence torchvision, which imports beside the CPU torch only
after ratpt.torchvision_ops.
"""
import ratpt.torchvision_ops  # noqa: F401  (must come first, see above)
import streaming  # noqa: E402

__all__ = ["streaming"]
