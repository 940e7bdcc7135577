"""FP8 GEMMs in the blocks' projections (train.fp8), through torchao's float8 training.

`convert_to_float8_training` swaps an nn.Linear for torchao's Float8Linear: an nn.Linear subclass with
the same `weight` parameter, kept in high precision (fp32, or bf16 under megatron's mixed precision),
whose forward casts input and weight to float8_e4m3 with dynamic scales (one per tensor, or one per
row with `rowwise`) and multiplies on the FP8 tensor cores (torch._scaled_mm); the two backward GEMMs
are cast the same way. Only the blocks' projections are swapped (BLOCK_PROJECTIONS): the embedding and
its tied head, the norms, the gate bias and RAT's mixing stay in high precision. Parameter names and
dtypes do not change, so the checkpoints of FP8 and bf16 runs load into each other.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from ratpt.config import Config, ConfigError, fp8_recipe

try:  # NOTE: imported only when train.fp8 is on (ratpt.engines.compile), so other runs need no torchao
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
except ImportError as err:
    raise ImportError(f"train.fp8 needs torchao: pip install 'torchao==0.18.0' (requirements.txt; it needs "
                      f"torch >= 2.11), or set train.fp8=off ({err})") from err

# The FP8-swapped modules: each block's mixer input and output projections (RAT, attention, sliding
# window, RNN) and its FFN's two matrices, by their names in the plain model (ratpt.model.lm).
BLOCK_PROJECTIONS = re.compile(r"layers\.\d+\.(mixer\.in_proj|mixer\.out_proj|ffn\.fc1|ffn\.fc2)")
FP8_MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: Ada, Hopper and later
FP8_MULTIPLE = 16  # torch._scaled_mm needs every GEMM dimension but the output's rows to be a multiple of 16

# What sets each projection's dimensions, for the error that names the key to change.
_DIMENSION_KEYS = {
    "mixer.in_proj": "model.d_model (and, for RAT, model.ngroups × model.head_dim)",
    "mixer.out_proj": "model.d_model",
    "ffn.fc1": "model.d_model and the FFN width round(model.ffn_mult × model.d_model)",
    "ffn.fc2": "model.d_model and the FFN width round(model.ffn_mult × model.d_model)",
}


def is_block_projection(module: nn.Module, name: str) -> bool:
    """torchao's module_filter_fn: an nn.Linear that is one of the blocks' projections."""
    return isinstance(module, nn.Linear) and BLOCK_PROJECTIONS.fullmatch(name) is not None


def float8_config(cfg: Config) -> Float8LinearConfig:
    """torchao's recipe named by train.fp8, emulated (fp32 GEMMs of the FP8-cast operands) if train.fp8_emulate."""
    recipe = Float8LinearConfig.from_recipe_name(fp8_recipe(cfg.train))
    return dataclasses.replace(recipe, emulate=cfg.train.fp8_emulate)


def check_fp8_device(cfg: Config, device: torch.device) -> None:
    """FP8 GEMMs need an FP8 tensor core; without one only torchao's emulation runs."""
    if cfg.train.fp8_emulate:
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        found = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ConfigError(f"train.fp8={cfg.train.fp8} needs a GPU with FP8 tensor cores (compute capability "
                          f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}+: Ada, Hopper), found {found}: set "
                          "train.fp8=off, or train.fp8_emulate=true to emulate it (tests; slower than fp32)")


def check_fp8_shapes(model: nn.Module, cfg: Config) -> None:
    """Every dimension of the FP8 GEMMs must be a multiple of 16: the projections' and the tokens of a
    micro-batch (the inner dimension of the weight-gradient GEMM)."""
    for name, module in model.named_modules():
        if is_block_projection(module, name):
            out_features, in_features = module.weight.shape
            if out_features % FP8_MULTIPLE or in_features % FP8_MULTIPLE:
                keys = _DIMENSION_KEYS[name.split(".", 2)[2]]
                raise ConfigError(f"train.fp8: {name} is {out_features} × {in_features}, and FP8 GEMMs need both "
                                  f"dimensions to be multiples of {FP8_MULTIPLE}: change {keys}, or set train.fp8=off")
    t, seq, cp = cfg.train, cfg.data.seq_len, cfg.parallel.context
    tokens = t.micro_batch * seq // cp
    if tokens % FP8_MULTIPLE:
        raise ConfigError(f"train.fp8: a micro-batch holds train.micro_batch × data.seq_len / parallel.context = "
                          f"{t.micro_batch} × {seq} / {cp} = {tokens} tokens on a rank, and FP8 GEMMs need a "
                          f"multiple of {FP8_MULTIPLE}: change one of those keys, or set train.fp8=off")


def apply_fp8(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """Swap the blocks' projections of the plain `model` for torchao's Float8Linear, in place."""
    check_fp8_device(cfg, device)
    check_fp8_shapes(model, cfg)
    convert_to_float8_training(model, module_filter_fn=is_block_projection, config=float8_config(cfg))
