"""Tensor parallelism with sequence parallelism for the RAT LM, with megatron-core layers.

The design: docs/design.md#tensor-and-sequence-parallelism.

`apply_tensor_parallel` replaces, in place, the plain model's projections by this TP rank's
megatron-core layers and returns where each of its parameters sits in the plain model
(`Placement`), so that checkpoints stay in the plain, layout-independent form:

    RAT      in_proj   the z, v, f rows of this rank's heads are column-parallel; the q, k rows of
                       the G groups (G·d each) are replicated (`GroupedColumnParallel`, see there)
             gate_bias sharded like f (per channel of this rank's heads)
             out_proj  row-parallel (over the channels of this rank's heads)
    attention/sliding window   in_proj v, q, k rows of this rank's heads; out_proj row-parallel
    RNN      in_proj z, v, f rows of this rank's channels, gate_bias sharded, out_proj row-parallel
    FFN      fc1 column-parallel (GELU: F/TP rows; SwiGLU: the gate and up rows of this rank),
             fc2 row-parallel
    embedding          megatron VocabParallelEmbedding (V/TP rows); the tied head is a
                       ColumnParallelLinear on the embedding's weight, the loss megatron's
                       `vocab_parallel_cross_entropy` on the [.., V/TP] logits
    norms              replicated, marked `sequence_parallel` so that megatron's
                       `finalize_model_grads` all-reduces their gradients over TP

Sequence parallelism (Megatron): between the column- and row-parallel layers every tensor is
[B, T/TP, D], the TP rank's contiguous slice of the sequence (of its CP slice). Norms and
residuals run on that slice; a column-parallel layer all-gathers it (and reduce-scatters the
gradient), a row-parallel layer reduce-scatters its partial sums back to it. Megatron's layers
take [T, B, ·] (sequence first); the wrappers transpose, the model stays batch-first (the
column-parallel outputs are made contiguous for the mixers: one copy per projection when the
micro-batch holds more than one sequence).

Under train.compile the TP linears run eagerly between the compiled parts of a block, one graph
break each: megatron's layers hold the sequence-parallel all-gather / reduce-scatter (asynchronous,
which dynamo does not trace) around one GEMM, with nothing to fuse.

The model's seam: a mixer's `d_model` / `n_heads` are set to this rank's width and heads (the
model derives every local shape from them and from the projection's output).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ratpt.model.norm import RMSNorm


@dataclass(frozen=True)
class Placement:
    """Where a parameter of the TP model sits in the plain model's parameter `plain`:
    rank j of TP holds the indices `index[j]` of dimension `dim` (in its local order).
    `replicated`: identical on every TP rank (index[j] equal). `duplicate`: a copy of another
    parameter that a checkpoint does not store (the last pipeline stage's tied head)."""
    plain: str
    dim: int
    size: int  # the plain parameter's size along `dim`
    index: tuple[torch.Tensor, ...]
    replicated: bool = False
    duplicate: bool = False


def _no_init(weight: torch.Tensor) -> None:
    """Weights come from the plain model (same seed on every rank), never from megatron's init."""


def _blocks(width: int, blocks: int, rank: int, tp: int) -> torch.Tensor:
    """Indices of rank `rank`'s 1/tp of each of `blocks` consecutive blocks of `width`."""
    local = width // tp
    return torch.cat([b * width + rank * local + torch.arange(local) for b in range(blocks)])


def _sharded(plain: str, dim: int, width: int, blocks: int, tp: int, size: int | None = None) -> Placement:
    return Placement(plain, dim, size or width * blocks, tuple(_blocks(width, blocks, j, tp) for j in range(tp)))


class ColumnParallel(nn.Module):
    """megatron ColumnParallelLinear on batch-first sequence shards: [B, T/TP, D_in] -> [B, T, out/TP]."""

    def __init__(self, weight: torch.Tensor, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        tp = config.tensor_model_parallel_size
        self.linear = ColumnParallelLinear(weight.shape[1], weight.shape[0] * tp, config=config, init_method=_no_init,
                                           bias=False, gather_output=False, skip_bias_add=True)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        _mark_sharded(self.linear.weight, 0)

    @torch.compiler.disable  # eager under train.compile: see the module docstring
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: contiguous: the mixers' ops view [B, T, ·] (a copy when B > 1; none when B = 1)
        return self.linear(x.transpose(0, 1))[0].transpose(0, 1).contiguous()


class RowParallel(nn.Module):
    """megatron RowParallelLinear: [B, T, in/TP] -> [B, T/TP, D_out] (partial sums reduce-scattered)."""

    def __init__(self, weight: torch.Tensor, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import RowParallelLinear

        tp = config.tensor_model_parallel_size
        self.linear = RowParallelLinear(weight.shape[1] * tp, weight.shape[0], config=config, init_method=_no_init,
                                        bias=False, input_is_parallel=True, skip_bias_add=True)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        _mark_sharded(self.linear.weight, 1)

    @torch.compiler.disable  # eager under train.compile: see the module docstring
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(0, 1))[0].transpose(0, 1)


class GroupedColumnParallel(nn.Module):
    """RAT's packed in_proj under TP: this rank's z, v, f rows (column-parallel, `weight`) and the
    q, k rows of all G groups (replicated, `group_weight`), in one GEMM: [B, T/TP, D] -> [B, T, 3·D/TP + 2·G·d].

    Why replicate q/k rather than permute heads so that a rank's heads share its own groups:
    a permutation shards q/k only when TP divides G (G = 2 in the paper: TP <= 2), while
    replication works for any TP with G | H/TP (validated), costs 2·G·d of 3·D/TP + 2·G·d rows
    per rank (8% at 1.3B, TP 2), needs no change of the head order (checkpoints, converter,
    kernels are untouched), and keeps exactly the single-process head h -> group h mod G
    tiling: local head i is global head r·H/TP + i and G | H/TP. The replicated rows get a
    partial gradient on each rank (from its own heads); they are marked `sequence_parallel`,
    so megatron's finalize_model_grads sums them over TP, and megatron's grad norm counts them
    once (they are not `tensor_model_parallel`).
    """

    def __init__(self, weight: torch.Tensor, group_weight: torch.Tensor, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        tp = config.tensor_model_parallel_size
        rows = weight.shape[0] + group_weight.shape[0]
        # The megatron layer runs the GEMM (its sequence-parallel all-gather / reduce-scatter);
        # the weight it multiplies is [this rank's rows; the group rows], supplied per call.
        self.linear = ColumnParallelLinear(weight.shape[1], rows * tp, config=config, init_method=_no_init, bias=False,
                                           gather_output=False, skip_bias_add=True, skip_weight_param_allocation=True)
        self.weight = nn.Parameter(weight.detach().clone())
        _mark_sharded(self.weight, 0)
        self.group_weight = nn.Parameter(group_weight.detach().clone())
        self.group_weight.sequence_parallel = True

    @torch.compiler.disable  # eager under train.compile: see the module docstring
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat((self.weight, self.group_weight))
        return self.linear(x.transpose(0, 1), weight=weight)[0].transpose(0, 1).contiguous()


def _vocab_parallel_embedding(weight: torch.Tensor, config) -> nn.Module:
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    class SequenceShardedEmbedding(VocabParallelEmbedding):
        """Token ids [B, T] -> this rank's sequence slice [B, T/TP, D] (partial rows reduce-scattered)."""

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return super().forward(tokens).transpose(0, 1)

    tp = config.tensor_model_parallel_size
    emb = SequenceShardedEmbedding(weight.shape[0] * tp, weight.shape[1], init_method=_no_init,
                                   reduce_scatter_embeddings=True, config=config)
    with torch.no_grad():
        emb.weight.copy_(weight)
    _mark_sharded(emb.weight, 0)
    return emb


class VocabParallelHead(nn.Module):
    """The tied head under TP: hidden [B, T/TP, D] and this rank's embedding rows -> logits [T, B, V/TP],
    sequence first as megatron's `vocab_parallel_cross_entropy` takes them (no copy of the logits)."""

    def __init__(self, vocab_size: int, d_model: int, config) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear

        self.linear = ColumnParallelLinear(d_model, vocab_size, config=config, init_method=_no_init, bias=False,
                                           gather_output=False, skip_bias_add=True, skip_weight_param_allocation=True)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.transpose(0, 1), weight=weight.to(hidden.dtype))[0]


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    """What megatron's own init would mark (we load the weights instead): a TP shard along `dim`,
    counted on every TP rank by the grad norm."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def check_tensor_parallel(model_cfg, tp: int) -> None:
    """Raise ValueError if the model cannot be split over `tp` ranks this way."""
    heads = model_cfg.d_model // model_cfg.head_dim
    if heads % tp:
        raise ValueError(f"parallel.tensor ({tp}) must divide the number of heads ({heads})")
    if "rat" in model_cfg.mixers and (heads // tp) % model_cfg.ngroups:
        raise ValueError(f"parallel.tensor ({tp}) must leave a multiple of model.ngroups ({model_cfg.ngroups}) "
                         f"heads per rank (heads {heads}): RAT's replicated q/k groups are tiled per rank")


def apply_tensor_parallel(model: nn.Module, config, tp_rank: int, tp: int) -> dict[str, Placement]:
    """Shard `model` (a plain RATLM) in place for TP rank `tp_rank` of `tp`; return the placements of
    every parameter that is not a full replica (the others keep their plain name and shape)."""
    cfg = model.cfg
    check_tensor_parallel(cfg, tp)
    D, qk = cfg.d_model, cfg.ngroups * cfg.head_dim
    placements: dict[str, Placement] = {}

    def local(p: Placement) -> torch.Tensor:
        return p.index[tp_rank]

    def take(param: torch.Tensor, p: Placement) -> torch.Tensor:
        return param.detach().index_select(p.dim, local(p).to(param.device))

    for i, block in enumerate(model.layers):
        mixer, prefix = block.mixer, f"layers.{i}."
        kind = block.kind
        name = prefix + "mixer.in_proj.weight"
        if kind == "rat":
            heads = _sharded(name, 0, D, 3, tp, size=3 * D + 2 * qk)
            group_rows = torch.arange(3 * D, 3 * D + 2 * qk)  # q, k of all G groups, on every rank
            groups = Placement(name, 0, 3 * D + 2 * qk, (group_rows,) * tp, replicated=True)
            full = mixer.in_proj.weight
            mixer.in_proj = GroupedColumnParallel(take(full, heads), take(full, groups), config)
            placements[name] = heads
            placements[prefix + "mixer.in_proj.group_weight"] = groups
        else:  # attention / sliding window (v, q, k) and RNN (z, v, f): three D-blocks by heads
            p = _sharded(name, 0, D, 3, tp)
            mixer.in_proj = ColumnParallel(take(mixer.in_proj.weight, p), config)
            placements[prefix + "mixer.in_proj.linear.weight"] = p
        if hasattr(mixer, "gate_bias"):
            p = _sharded(prefix + "mixer.gate_bias", 0, D, 1, tp)
            mixer.gate_bias = nn.Parameter(take(mixer.gate_bias, p))
            _mark_sharded(mixer.gate_bias, 0)
            placements[prefix + "mixer.gate_bias"] = p
        p = _sharded(prefix + "mixer.out_proj.weight", 1, D, 1, tp)
        mixer.out_proj = RowParallel(take(mixer.out_proj.weight, p), config)
        placements[prefix + "mixer.out_proj.linear.weight"] = p
        # The seam: this rank's width and heads (the model derives its local shapes from them).
        mixer.d_model = D // tp
        if hasattr(mixer, "n_heads"):
            mixer.n_heads = mixer.n_heads // tp

        ffn = block.ffn
        hidden = ffn.fc2.weight.shape[1]
        p = _sharded(prefix + "ffn.fc1.weight", 0, hidden, 2 if ffn.swiglu else 1, tp)
        ffn.fc1 = ColumnParallel(take(ffn.fc1.weight, p), config)
        placements[prefix + "ffn.fc1.linear.weight"] = p
        p = _sharded(prefix + "ffn.fc2.weight", 1, hidden, 1, tp)
        ffn.fc2 = RowParallel(take(ffn.fc2.weight, p), config)
        placements[prefix + "ffn.fc2.linear.weight"] = p

    p = _sharded("embedding.weight", 0, cfg.vocab_size, 1, tp)
    model.embedding = _vocab_parallel_embedding(take(model.embedding.weight, p), config)
    placements["embedding.weight"] = p
    for module in model.modules():  # norms: replicated; each rank's gradient covers its sequence slice
        if isinstance(module, RMSNorm):
            module.weight.sequence_parallel = True
    return placements


# ----- the layout-independent form: full tensors by plain parameter name ------------------------

def to_plain(tensors: dict[str, torch.Tensor], placements: dict[str, Placement], group,
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """{local name: local tensor} of this TP rank -> {plain name: full tensor on the CPU}, identical on
    every TP rank. Collective over the TP `group` (every rank passes the same names in the same
    order); the shards travel on `device` (the rank's GPU under NCCL; default: where they are)."""
    out: dict[str, torch.Tensor] = {}
    size = dist.get_world_size(group) if group is not None else 1
    for name, tensor in tensors.items():
        p = placements.get(name)
        tensor = tensor.detach()
        if p is None:
            out[name] = tensor.cpu().clone()
            continue
        if p.duplicate:
            continue
        if p.plain not in out:
            shape = list(tensor.shape)
            shape[p.dim] = p.size
            out[p.plain] = torch.zeros(shape, dtype=tensor.dtype)
        full = out[p.plain]
        if p.replicated or size == 1:
            full.index_copy_(p.dim, p.index[0], tensor.cpu())
            continue
        local = tensor.to(device or tensor.device).contiguous()
        pieces = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(pieces, local, group=group)
        for j, piece in enumerate(pieces):
            full.index_copy_(p.dim, p.index[j], piece.cpu())
    return out


def from_plain(full: dict[str, torch.Tensor], name: str, placements: dict[str, Placement], tp_rank: int) -> torch.Tensor:
    """This TP rank's part of local parameter `name`, from the plain state `full`."""
    p = placements.get(name)
    if p is None:
        return full[name]
    if not p.index:  # a full copy (the last pipeline stage's head without TP)
        return full[p.plain]
    return full[p.plain].index_select(p.dim, p.index[tp_rank].to(full[p.plain].device))
