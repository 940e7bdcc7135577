"""ratpt: distributed pretraining of RAT language models (arXiv 2507.04416)."""
from ratpt.kernel_folder import hide_the_kernel_folder

hide_the_kernel_folder()  # before any submodule: some load transformers, which probes for `kernels`

from ratpt.model.pretrained import load_pretrained  # noqa: E402

__all__ = ["load_pretrained"]
