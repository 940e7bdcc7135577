"""Import checkpoints of the public reference implementation (CLAIRE-Labo/RAT).

The paper's released 1.3B RAT, attention and RAT+SWA models are files saved as
`torch.save({'task': state_dict, ...})`, keys optionally prefixed `_orig_mod.` (torch.compile):

    embedding.wte.weight                               -> embedding.weight
    backbone.layers.{i}.seq_layer.{in_proj.weight, gate_bias, input_norm.weight, out_proj.weight}
                                                       -> layers.{i}.mixer.{...} (same names)
    backbone.layers.{i}.hidden_layer.fc1.weight / fc2.weight / ln.weight
                                                       -> layers.{i}.ffn.fc1 / ffn.fc2 / ffn_norm
    backbone.ln.weight                                 -> final_norm.weight
    head.lm_head.weight                                -> (tied to the embedding; checked)

Row layouts need no permutation: RAT in_proj is (z, v, g, q, k) and attention in_proj is
(v, q, k) in both codes, and both use half-split RoPE. What the shapes cannot tell (L, d, G,
which attention layers are windowed, W) comes from flags; everything else is inferred and
every tensor is checked against the resulting config.
"""
import pickle
import re
from pathlib import Path

import torch

from ratpt.model.config import ModelConfig, mixer_of_layer, validate_model_config
from ratpt.model.lm import build_model

_PREFIX = "_orig_mod."
_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(seq_layer|hidden_layer)\.(.+)")
_FFN_NAMES = {"fc1.weight": "ffn.fc1.weight", "fc2.weight": "ffn.fc2.weight", "ln.weight": "ffn_norm.weight"}
_MIXER_NAMES = ("in_proj.weight", "gate_bias", "input_norm.weight", "out_proj.weight")


def load_reference_state(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The 'task' state dict of a reference checkpoint, `_orig_mod.` prefixes removed."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        # the weights-only unpickler names a global it does not allow; anything else is no checkpoint
        if not allow_pickle and isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"{path} holds objects other than tensors and containers; if you trust the file, "
                             f"pass --allow-pickle ({' '.join(str(err).split())[:300]})") from err
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}): is it truncated, or not a checkpoint?") from err
    if not isinstance(ckpt, dict) or "task" not in ckpt:
        raise ValueError(f"{path} is not a reference checkpoint: expected a dict with key 'task'")
    return {key.replace(_PREFIX, ""): value for key, value in ckpt["task"].items()}


def convert_reference_state(state: dict[str, torch.Tensor], chunk_size: int, head_dim: int,
                            ngroups: int = 2, mixers: list[str] | None = None,
                            window: int = 1024) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Map a reference state dict to (ratpt state dict, ModelConfig); ValueError on mismatch."""
    mixers = mixers or ["rat"]
    if "embedding.wte.weight" not in state:
        raise ValueError("reference state has no 'embedding.wte.weight'")
    vocab, d_model = state["embedding.wte.weight"].shape
    layer_ids = sorted({int(m.group(1)) for key in state if (m := _LAYER.fullmatch(key))})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise ValueError(f"reference layers must be numbered 0..N-1, found {layer_ids[:10]}")
    fc1 = state.get("backbone.layers.0.hidden_layer.fc1.weight")
    if fc1 is None:
        raise ValueError("reference state has no 'backbone.layers.0.hidden_layer.fc1.weight'")
    cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=len(layer_ids), head_dim=head_dim,
                      ngroups=ngroups, chunk_size=chunk_size, mixers=list(mixers), window=window,
                      ffn="gelu", ffn_mult=fc1.shape[0] / d_model)
    validate_model_config(cfg)
    converted = {"embedding.weight": state["embedding.wte.weight"],
                 "final_norm.weight": _require(state, "backbone.ln.weight")}
    head = state.get("head.lm_head.weight")
    if head is not None and not torch.equal(head, state["embedding.wte.weight"]):
        raise ValueError("head.lm_head.weight differs from embedding.wte.weight: ratpt ties the head")
    for key, value in state.items():
        match = _LAYER.fullmatch(key)
        if match is None:
            if key not in ("embedding.wte.weight", "backbone.ln.weight", "head.lm_head.weight"):
                raise ValueError(f"unexpected key in reference state: {key}")
            continue
        layer, part, name = int(match.group(1)), match.group(2), match.group(3)
        if part == "hidden_layer" and name in _FFN_NAMES:
            converted[f"layers.{layer}.{_FFN_NAMES[name]}"] = value
        elif part == "seq_layer" and name in _MIXER_NAMES:
            converted[f"layers.{layer}.mixer.{name}"] = value
        else:
            raise ValueError(f"unexpected key in reference state: {key}")
    _check_against_model(converted, cfg)
    return converted, cfg


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"reference state has no {key!r}")
    return state[key]


def _check_against_model(converted: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every tensor a model of `cfg` expects is present with its shape; explain mismatches."""
    expected = build_model_on_meta(cfg).state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            layer = _layer_of(key)
            hint = f" (layer {layer} is '{mixer_of_layer(cfg, layer)}' from --mixers)" if layer is not None else ""
            raise ValueError(f"checkpoint lacks {key}{hint}; check --mixers")
        if converted[key].shape != tensor.shape:
            raise ValueError(_shape_hint(key, tuple(converted[key].shape), tuple(tensor.shape), cfg))
    extra = sorted(set(converted) - set(expected))
    if extra:
        layer = _layer_of(extra[0])
        raise ValueError(f"checkpoint has {extra[0]}, which a '{mixer_of_layer(cfg, layer)}' layer does "
                         f"not have; check --mixers")


def build_model_on_meta(cfg: ModelConfig) -> torch.nn.Module:
    """A model of `cfg` without allocating weights (shape checks for 1.3B models stay cheap)."""
    with torch.device("meta"):
        return build_model(cfg)


def _layer_of(key: str) -> int | None:
    match = re.match(r"layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def _shape_hint(key: str, got: tuple, want: tuple, cfg: ModelConfig) -> str:
    msg = f"{key}: checkpoint shape {got}, but the flags imply {want}"
    if not key.endswith("mixer.in_proj.weight"):
        return msg
    D, layer = cfg.d_model, _layer_of(key)
    kind = mixer_of_layer(cfg, layer)
    if got[0] == 3 * D:
        return msg + f"; 3·D rows is an attention/rnn layer, but --mixers makes layer {layer} '{kind}'"
    qk = (got[0] - 3 * D) / 2
    if kind != "rat":
        return msg + f"; {got[0]} rows is a RAT layer (G·d = {qk:g}), but --mixers makes layer {layer} '{kind}'"
    return msg + f"; a RAT in_proj with {got[0]} rows has G·d = {qk:g}: with --head-dim {cfg.head_dim} " \
                 f"that is --ngroups {qk / cfg.head_dim:g}"
