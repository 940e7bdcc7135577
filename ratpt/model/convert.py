"""Import checkpoints of the public reference implementation (CLAIRE-Labo/RAT).

The paper's released 1.3B RAT, attention and RAT+SWA models are files of its trainers
(src/trainer/{trainer,fsdp_trainer}.py): `torch.save({"task": state_dict, "config": EasyDict(run
config), "step", "optimizer", "lr_scheduler", "resume_kwargs"})`. Only the weights and the run
config are imported. Keys are optionally prefixed `_orig_mod.` (torch.compile; the FSDP trainer's
full state dict has FSDP's own wrapper names already removed):

    embedding.wte.weight                               -> embedding.weight
    backbone.layers.{i}.seq_layer.{in_proj.weight, gate_bias, input_norm.weight, out_proj.weight}
                                                       -> layers.{i}.mixer.{...} (same names)
    backbone.layers.{i}.hidden_layer.fc1.weight / fc2.weight / ln.weight
                                                       -> layers.{i}.ffn.fc1 / ffn.fc2 / ffn_norm
    backbone.ln.weight                                 -> final_norm.weight
    head.lm_head.weight                                -> (tied to the embedding; checked)

Row layouts need no permutation: RAT in_proj is (z, v, g, q, k) and attention in_proj is
(v, q, k) in both codes, and both use half-split RoPE. What the shapes cannot tell (L, d, G,
which attention layers are windowed, W) comes from the stored run config, where the file has one,
and from flags; everything else is inferred and every tensor is checked against the resulting config.

The file is read weights-only: the run config is an `easydict.EasyDict` (the trainers store
`EasyDict(OmegaConf.to_container(cfg, resolve=True))`, so nested EasyDicts and lists, never an
omegaconf object), and that one class name is admitted as a plain mapping; any other class is refused.
"""
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ratpt.model.config import ModelConfig, mixer_of_layer, validate_model_config
from ratpt.model.lm import build_model

REFERENCE_CONFIG = "reference_config.json"  # the stored run config, kept beside the converted weights
_PREFIX = "_orig_mod."
_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(seq_layer|hidden_layer)\.(.+)")
_FFN_NAMES = {"fc1.weight": "ffn.fc1.weight", "fc2.weight": "ffn.fc2.weight", "ln.weight": "ffn_norm.weight"}
_MIXER_NAMES = ("in_proj.weight", "gate_bias", "input_norm.weight", "out_proj.weight")
# The public code's sequence layers (configs/model/backbone/layer/*.yaml) as ratpt mixers, and the
# keys of their configs that carry a setting the shapes cannot tell.
_PUBLIC_MIXERS = {"rat": "rat", "attention": "attention", "local_attention": "swa", "rnn": "rnn"}
_PUBLIC_LAYER_KEYS = {"chunk_size": "chunk_size", "d_head": "head_dim", "ngroups": "ngroups", "window_size": "window"}
FLAGS = {"chunk_size": "--chunk-size", "head_dim": "--head-dim", "ngroups": "--ngroups", "mixers": "--mixers",
         "window": "--window"}


class _EasyDictAsMapping:
    """Stands in for `easydict.EasyDict` in the weights-only unpickler: the pickle's NEWOBJ makes an
    OrderedDict (the only mapping that unpickler both fills with items and lets BUILD set the
    EasyDict's attribute mirror of those items on), so no easydict code runs or is needed."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


_RUN_CONFIG_CLASSES = [(_EasyDictAsMapping, "easydict.EasyDict")]


@dataclass
class ReferenceCheckpoint:
    """What ratpt takes from a file of the public trainers."""
    state: dict[str, torch.Tensor]  # the 'task' state dict, `_orig_mod.` prefixes removed
    run_config: Optional[dict]  # the stored run config as plain dicts and lists; None if the file has none
    ignored: list[str]  # the file's other entries (optimizer, lr_scheduler, ...): training state, not imported


def load_reference_checkpoint(path: str, allow_pickle: bool = False) -> ReferenceCheckpoint:
    """Read a reference checkpoint without running code from it (unless `allow_pickle`)."""
    ckpt = _load(path, allow_pickle)
    if not isinstance(ckpt, dict) or "task" not in ckpt:
        raise ValueError(f"{path} is not a reference checkpoint: expected a dict with key 'task'")
    run_config = ckpt.get("config")
    if run_config is not None and not isinstance(run_config, dict):
        raise ValueError(f"{path}: 'config' is a {type(run_config).__name__}, not the public code's run config")
    return ReferenceCheckpoint(state={key.replace(_PREFIX, ""): value for key, value in ckpt["task"].items()},
                               run_config=None if run_config is None else _plain(run_config),
                               ignored=sorted(set(ckpt) - {"task", "config"}))


def load_reference_state(path: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The 'task' state dict of a reference checkpoint, `_orig_mod.` prefixes removed."""
    return load_reference_checkpoint(path, allow_pickle).state


def _load(path: str, allow_pickle: bool) -> Any:
    """torch.load weights-only, admitting the run config's EasyDict; errors that say what is wrong.
    A zip checkpoint is memory-mapped, so the optimizer state it also holds is never read."""
    if Path(path).is_dir():
        raise ValueError(f"reference checkpoint {path} is a folder: name the .pt file the public code saved")
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    form = _zip_form(Path(path))
    if form == "truncated":
        raise ValueError(f"{path} is truncated: a PyTorch (zip) checkpoint whose end is missing "
                         f"({Path(path).stat().st_size} bytes); download or copy it again")
    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=form == "zip")
        with torch.serialization.safe_globals(_RUN_CONFIG_CLASSES):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=form == "zip")
    except ModuleNotFoundError as err:  # only unpickling imports modules
        raise ValueError(f"{path} names the Python module {err.name!r}, which is not installed here: install it "
                         f"to unpickle the file, or drop --allow-pickle if the file holds only tensors and the "
                         f"public code's run config") from err
    except Exception as err:
        detail = " ".join(str(err).split())
        unsupported = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", detail)
        if isinstance(err, pickle.UnpicklingError) and unsupported:
            raise ValueError(f"{path} holds an object of class {unsupported.group(1)}, which is neither a tensor, a "
                             f"container nor the public code's run config; if you trust the file, pass "
                             f"--allow-pickle") from err
        reason = re.search(r"WeightsUnpickler error: (.*?) Check the documentation", detail)
        if reason:  # torch's advice to drop weights_only would be wrong here: the bytes are not a pickle it knows
            detail = f"the unpickler stopped at: {reason.group(1)}"
        raise ValueError(f"{path} cannot be read as a PyTorch checkpoint ({type(err).__name__}: "
                         f"{detail[:300]}): is it a checkpoint?") from err


def _zip_form(path: Path) -> Optional[str]:
    """'zip' for torch.save's (zip) format, 'truncated' for a zip cut short (its end-of-central-directory
    record missing), None for anything else (the legacy format, or no checkpoint)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
        size = f.seek(0, 2)
        f.seek(max(0, size - (22 + 65535)))  # the record (22 bytes) and its longest comment
        return "zip" if b"PK\x05\x06" in f.read() else "truncated"


def _plain(value: Any) -> Any:
    """Mappings and sequences as plain dicts and lists (the unpickled config's OrderedDicts)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def settings_from_run_config(run_config: dict) -> dict[str, Any]:
    """The settings the shapes cannot tell, as the public code's run config states them: `mixers`
    (the layer pattern), `chunk_size`, `head_dim`, `ngroups`, `window` and `rope_base`, each only
    where the config has it (an attention model states no chunk size)."""
    try:
        backbone = run_config["model"]["backbone"]
        if backbone["_name_"] == "sequence":
            cells = [backbone["seq_cell"]]
        elif backbone["_name_"] == "sequence_interleave":  # seq_cell1 at layers i % step == 0, seq_cell elsewhere
            cells = [backbone["seq_cell1"]] + [backbone["seq_cell"]] * (backbone["interleave_step"] - 1)
        else:
            raise ValueError(f"the checkpoint's run config has model.backbone._name_ {backbone['_name_']!r}; "
                             f"ratpt imports 'sequence' and 'sequence_interleave'")
        names = [cell["_name_"] for cell in cells]
    except (KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint's run config lacks model.backbone's layers ({err!r}); "
                         f"pass the model's settings as flags") from None
    unknown = [name for name in names if name not in _PUBLIC_MIXERS]
    if unknown:
        raise ValueError(f"the checkpoint's run config has a {unknown[0]!r} layer; ratpt imports "
                         f"{', '.join(_PUBLIC_MIXERS)}")
    settings: dict[str, Any] = {"mixers": [_PUBLIC_MIXERS[name] for name in names]}
    for cell in cells:
        for key, name in _PUBLIC_LAYER_KEYS.items():
            if key not in cell:
                continue
            if settings.setdefault(name, cell[key]) != cell[key]:
                raise ValueError(f"the checkpoint's run config gives its layers {key} {settings[name]} and "
                                 f"{cell[key]}; a ratpt model has one {name}")
    pe = run_config.get("model", {}).get("embedding", {}).get("pe")
    if isinstance(pe, dict) and "base" in pe:
        settings["rope_base"] = float(pe["base"])
    return settings


def reference_settings(flags: dict[str, Any], run_config: Optional[dict]) -> dict[str, Any]:
    """The keyword arguments of `convert_reference_state`: the flags given (None: not given) and the
    stored run config fill each other; where both state a setting they must agree."""
    settings = settings_from_run_config(run_config) if run_config is not None else {}
    for name, value in flags.items():
        if value is None:
            continue
        if name in settings and settings[name] != value:
            raise ValueError(f"{FLAGS[name]} {_shown(value)} disagrees with the checkpoint's run config, which "
                             f"says {_shown(settings[name])}; drop the flag (the config is what the model was "
                             f"trained with)")
        settings[name] = value
    default = ModelConfig()
    settings.setdefault("mixers", default.mixers)
    needed = ["head_dim"] + (["chunk_size"] if "rat" in settings["mixers"] else [])
    missing = [FLAGS[name] for name in needed if name not in settings]
    if missing:
        source = "the checkpoint has no run config" if run_config is None else "the checkpoint's run config lacks it"
        raise ValueError(f"convert reference needs {' and '.join(missing)}: {source}")
    for name in ("chunk_size", "ngroups", "window", "rope_base"):
        settings.setdefault(name, getattr(default, name))
    return settings


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def convert_reference_state(state: dict[str, torch.Tensor], chunk_size: int, head_dim: int,
                            ngroups: int = 2, mixers: list[str] | None = None, window: int = 1024,
                            rope_base: float = 10000.0) -> tuple[dict[str, torch.Tensor], ModelConfig]:
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
                      rope_base=rope_base, ffn="gelu", ffn_mult=fc1.shape[0] / d_model)
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
