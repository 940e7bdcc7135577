"""Keeps the repository's kernels/ folder from passing for Hugging Face's `kernels` package.

Run from the repository root, Python finds kernels/ (ratpt's Triton kernels, installed as ratpt_kernels) under
the name `kernels`. transformers probes for its hub package of that name when it loads its model code, and
newer releases import whatever the probe finds without catching the ImportError that kernels/ raises under
the wrong name: `ratpt export` and `evaluate-long` died on it. Marking the name absent in sys.modules makes
the probe find nothing; a genuine `kernels` package elsewhere is left alone.
"""
import importlib.util
import sys
from pathlib import Path


def hide_the_kernel_folder() -> None:
    """Make `import kernels` find nothing where it would find ratpt's own kernel folder."""
    if "kernels" in sys.modules:
        return
    found = importlib.util.find_spec("kernels")
    ours = importlib.util.find_spec("ratpt_kernels")
    if found is None or ours is None or not found.origin or not ours.origin:
        return
    if Path(found.origin).resolve() == Path(ours.origin).resolve():
        sys.modules["kernels"] = None
