"""ratpt: distributed pretraining of RAT language models (arXiv 2507.04416)."""
from ratpt.model.pretrained import load_pretrained

__all__ = ["load_pretrained"]
