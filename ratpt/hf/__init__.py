"""A trained ratpt model outside ratpt: Hugging Face transformers classes (RATConfig, RATForCausalLM), the
export to and import from a Hugging Face folder, lm-evaluation-harness and long-context evaluation.

transformers imports torchvision when it is installed; beside the CPU torch, PyPI's torchvision fails
to import unless its operator schemas are declared first, which ratpt.data.streaming_import does.
"""
import ratpt.data.streaming_import  # noqa: F401  (before any transformers import, see above)
