"""Importing this makes torchvision importable beside the CPU torch: `import ratpt.torchvision_ops` before
anything that imports torchvision (mosaicml-streaming does, and transformers when torchvision is installed).

PyPI's torchvision 0.28.0 is a CUDA build; beside the CPU torch 2.13 its `_C` library does not load,
and its Python code then fails with "operator torchvision::nms does not exist" while registering
fake kernels for `nms`/`roi_align`/... . ratpt never calls those operators, so declaring their
schemas is enough for the import to succeed. Schemas are declared only when missing: with a working
torchvision (GPU machines) they already exist and this module does nothing but import it.
"""
import sys

import torch

# Schemas of the torchvision operators whose Python fake kernels are registered at import
# time (torchvision/_meta_registrations.py), as torchvision's C++ library declares them.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _declare_missing_torchvision_ops() -> None:
    """Declare the schemas torchvision's C++ library would have, unless it already did."""
    try:
        import torchvision  # noqa: F401  (a working torchvision registers everything itself)
        return
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]  # the failed import left half-initialised submodules behind
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"):
            torch.library.define(f"torchvision::{name}", schema)


_declare_missing_torchvision_ops()
