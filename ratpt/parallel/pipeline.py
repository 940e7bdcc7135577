"""A pipeline stage of the RAT LM: the module megatron's schedules run on one rank.

Stage s of a pipeline holds a contiguous run of blocks; the first stage also holds the
embedding, the last the final norm and the tied head (DESIGN §3). Parameter names are those of
the plain model (`layers.<global index>...`), so a stage's state dict is a slice of the
model's. `set_input_tensor` is how megatron's schedules hand a stage the activations received
from the previous one. With one stage (no pipeline parallelism) the stage is the whole model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModelStage(nn.Module):
    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.first, self.last = first, last
        self.layer_ids = layer_ids
        if first or last:  # the head is tied to the embedding
            self.embedding = model.embedding
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if last:
            self.final_norm = model.final_norm
        self.input_tensor = None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] on the last stage, hidden states [B, T, D] elsewhere."""
        x = self.embedding(tokens) if self.first else self.input_tensor
        for layer in self.layers.values():
            x = layer(x)
        if not self.last:
            return x
        hidden = self.final_norm(x)
        return F.linear(hidden, self.embedding.weight.to(hidden.dtype))


def whole_model_stage(model: nn.Module) -> ModelStage:
    return ModelStage(model, list(range(len(model.layers))), first=True, last=True)
