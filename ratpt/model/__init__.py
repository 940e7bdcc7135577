"""The RAT model family: RAT, attention, sliding-window attention, RNN, and their hybrids."""
from ratpt.model.config import ModelConfig, validate_model_config
from ratpt.model.lm import RATLM, build_model

__all__ = ["ModelConfig", "RATLM", "build_model", "validate_model_config"]
