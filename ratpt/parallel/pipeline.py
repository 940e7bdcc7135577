"""Pipeline stages of the RAT LM: the modules megatron's schedules run on one rank
(docs/design.md#pipeline-parallelism).

The layers are cut into PP × virtual_stages contiguous runs (`balanced_stages`) that minimise
the largest forward FLOP count of a run (ratpt.model.flops: mixer + FFN per layer, the head on
the last run), so a RAT/attention hybrid or a large vocabulary does not leave one stage the
bottleneck. Run c goes to pipeline rank c mod PP as its model chunk c // PP (megatron's
interleaved order; one chunk per rank without virtual stages).

A stage holds its blocks; the first also the embedding, the last the final norm and the tied
head. Parameter names are those of the plain model (`layers.<global index>...`). With more than
one stage the last stage keeps its own copy of the embedding weight (`output_weight`, marked
`shared` as in megatron: counted once in the grad norm); megatron's finalize_model_grads
all-reduces its gradient with the first stage's embedding over the embedding group, so both stay
equal. Both copies are marked `shared_embedding`: megatron's DDP then gives each its own bucket,
so that the distributed optimizer shards them alike on the two stages (the DP reduce-scatter
runs before the embedding all-reduce). `set_input_tensor` is how the schedules hand a stage the received activations, which
travel sequence-first [T, B, D] (megatron's p2p shape) and are batch-first inside the stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ratpt.model.lm import packed_documents
from ratpt.ops.linear_cross_entropy import linear_cross_entropy_sum


class TiedHead(nn.Module):
    """logits = hidden · Eᵀ (one process, or no tensor parallelism)."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight.to(hidden.dtype))


class ModelStage(nn.Module):
    share_embeddings_and_output_weights = True  # read by megatron's finalize_model_grads

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool,
                 head: nn.Module | None = None) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.first, self.last = first, last
        self.pre_process, self.post_process = first, last  # megatron's names
        self.layer_ids = layer_ids
        if first:
            self.embedding = model.embedding
            if not last:  # megatron's mark: own DDP bucket, so both stages shard its optimizer state alike
                self.embedding.weight.shared_embedding = True
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if last:
            self.final_norm = model.final_norm
            self.head = head if head is not None else TiedHead()
            if not first:
                source = model.embedding.weight
                self.output_weight = nn.Parameter(source.detach().clone())
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                    if hasattr(source, attr):
                        setattr(self.output_weight, attr, getattr(source, attr))
                self.output_weight.shared = True
                self.output_weight.shared_embedding = True
        self.loss_compile_backend = model.loss_compile_backend  # the fused loss as the plain model runs it
        self.input_tensor = None

    def shared_embedding_or_output_weight(self):
        if self.first:
            return self.embedding.weight
        return self.output_weight if self.last else None

    def set_input_tensor(self, tensor) -> None:
        self.input_tensor = tensor[0] if isinstance(tensor, (list, tuple)) else tensor

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits on the last stage ([B, T, vocab], or [T, B, vocab/TP] under TP), or given labels (the
        engine passes them only without TP) the summed loss, head and loss fused as in RATLM.forward;
        hidden states [T, B, D] for the next stage. `positions`: as RATLM.forward's, on every stage."""
        documents = packed_documents(positions, self.layers.values())
        x = self.embedding(tokens) if self.first else self.input_tensor.transpose(0, 1)
        for layer in self.layers.values():
            x = layer(x, documents)
        if not self.last:
            return x.transpose(0, 1).contiguous()
        hidden, weight = self.final_norm(x), self.shared_embedding_or_output_weight()
        if labels is not None:
            return linear_cross_entropy_sum(hidden, weight, labels, compile_backend=self.loss_compile_backend)
        return self.head(hidden, weight)


def layer_costs(model_cfg, seq_len: int) -> list[float]:
    """Forward FLOPs per token of each block (mixer + FFN)."""
    from ratpt.model.config import mixer_of_layer
    from ratpt.model.flops import ffn_flops_per_token, mixer_flops_per_token

    return [mixer_flops_per_token(mixer_of_layer(model_cfg, i), model_cfg, seq_len) + ffn_flops_per_token(model_cfg)
            for i in range(model_cfg.n_layers)]


def balanced_stages(costs: list[float], n_stages: int, last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous runs of layers, one per stage (each non-empty), minimising the largest run cost;
    `last_extra` (the head) is added to the last run. Exact dynamic programme, O(layers² · stages)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} layers into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max cost cutting the first i layers into s runs; cut[s][i]: start of the last run
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                run = prefix[i] - prefix[j] + (last_extra if s == n_stages and i == n else 0.0)
                value = max(best[s - 1][j], run)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    runs, i = [], n
    for s in range(n_stages, 0, -1):
        j = cut[s][i]
        runs.append(list(range(j, i)))
        i = j
    return runs[::-1]


def stage_layers(model_cfg, seq_len: int, n_stages: int) -> list[list[int]]:
    """The layers of each of `n_stages` pipeline stages (in pipeline order), balanced by forward FLOPs."""
    from ratpt.model.flops import head_flops_per_token

    return balanced_stages(layer_costs(model_cfg, seq_len), n_stages, last_extra=head_flops_per_token(model_cfg))


def pipeline_chunks(model: nn.Module, seq_len: int, pp: int, pp_rank: int, virtual: int,
                    head: nn.Module | None = None) -> list[ModelStage]:
    """This pipeline rank's model chunks (one per virtual stage), from the FLOP-balanced cut."""
    runs = stage_layers(model.cfg, seq_len, pp * virtual)
    n = len(runs)
    return [ModelStage(model, runs[c], first=c == 0, last=c == n - 1, head=head if c == n - 1 else None)
            for c in range(pp_rank, n, pp)]


def whole_model_stage(model: nn.Module, head: nn.Module | None = None) -> ModelStage:
    return ModelStage(model, list(range(len(model.layers))), first=True, last=True, head=head)
