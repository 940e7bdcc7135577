"""A trained ratpt model outside ratpt: Hugging Face transformers classes (RATConfig, RATForCausalLM), the
export to and import from a Hugging Face folder, lm-evaluation-harness and long-context evaluation.

transformers imports torchvision when it is installed; beside the CPU torch, PyPI's torchvision fails
to import unless its operator schemas are declared first, which ratpt.torchvision_ops does.
"""
import ratpt.torchvision_ops  # noqa: F401  (before any transformers import, see above)
