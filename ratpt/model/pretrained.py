"""A pretrained model folder: model.safetensors + config.yaml (`model:` section).

No pickle anywhere: weights are safetensors and the config is YAML checked against the typed
schema, so loading a downloaded folder cannot execute code. Writes are atomic (a temporary
folder renamed into place), so a crash never leaves a half-written model behind; the weights'
checksum (checksums.json, ratpt.files) is checked at load, so weights damaged since are named, not run. The
folder gets the umask's permissions (group-readable where the umask allows), not tempfile's 0700.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ratpt.files import apply_umask, checksum_mismatch, publish_dir, write_checksums
from ratpt.model.config import ModelConfig, validate_model_config
from ratpt.model.lm import RATLM, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"  # the folder `ratpt generate` reads its tokenizer from
HF_CONFIG = "config.json"  # what a Hugging Face folder (ratpt.hf.export) holds in place of CONFIG


def save_pretrained(model: RATLM, cfg: ModelConfig, out_dir: str | os.PathLike,
                    tokenizer_dir: Optional[Path] = None, metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write `out_dir/{model.safetensors, config.yaml}` (and `tokenizer/`, a copy of `tokenizer_dir`;
    and per `metadata` item a JSON file, e.g. where the model came from, which ratpt never reads)
    atomically: flushed, then renamed into place whole; replaces an existing folder."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        OmegaConf.save(OmegaConf.create({"model": asdict(cfg)}), tmp / CONFIG)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER)
        for name, content in (metadata or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1, default=str) + "\n")
        write_checksums(tmp, names=[WEIGHTS])  # the config stays editable: the schema and shapes check it
        apply_umask(tmp)
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a pretrained folder (unknown or mistyped keys are errors)."""
    config_file = Path(path) / CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: a pretrained folder holds {CONFIG} and {WEIGHTS}")
    try:
        loaded = OmegaConf.load(config_file)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, DictConfig) or "model" not in loaded:
        raise ValueError(f"{config_file} has no 'model:' section")
    return model_config_from(loaded.model, config_file)


def model_config_from(fields: Any, source: Path) -> ModelConfig:
    """The ModelConfig of `fields` (the mapping of its fields read from the file `source`): typed by the schema
    (an unknown key or a value of the wrong type is an error) and validated; a one-line ValueError naming
    `source` and the key otherwise, since a config file is what a user edits."""
    if not isinstance(fields, (dict, DictConfig)):
        raise ValueError(f"{source}: the model's config is {fields!r}, not a mapping of its fields (vocab_size, "
                         f"d_model, ...)")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields))
    except OmegaConfBaseException as err:
        raise ValueError(f"{source}: model.{err.full_key}: {str(err).splitlines()[0]}") from None
    try:
        validate_model_config(cfg)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return cfg


def check_device(device: str | torch.device, name: str = "device") -> None:
    """A ValueError naming `name` (a command's flag) unless torch can place tensors on `device` here: checked
    before a load, where torch's own error would print a traceback or read as a fault of the weights' file."""
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows; the value is what to fix
        raise ValueError(f"{name} {str(device)!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {device}: CUDA is not available here (use {name} cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[RATLM, ModelConfig]:
    """Load (model, cfg) from a folder written by `save_pretrained` (or `ratpt convert`)."""
    check_device(device)
    folder = Path(path)
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file: name the pretrained folder that holds {CONFIG} and {WEIGHTS}")
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained folder {folder} does not exist")
    if (folder / HF_CONFIG).is_file() and not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG} not found: {folder} is a Hugging Face folder ({HF_CONFIG}); "
                                f"`ratpt convert hf {folder} --out DIR` writes it as a pretrained folder")
    weights = folder / WEIGHTS
    if not weights.is_file():
        hint = (f": {folder} is a training run or checkpoint; write a pretrained folder from it with "
                f"`ratpt export {folder} --out DIR`" if (folder / "checkpoints").is_dir()
                or (folder / "state.pt").is_file() or any(folder.glob("step_*/state.pt"))
                else "")  # a run folder, a checkpoint's (its state.pt), or a run's checkpoints folder
        raise FileNotFoundError(f"{weights} not found: a pretrained folder holds {CONFIG} and {WEIGHTS}{hint}")
    broken = checksum_mismatch(folder)
    if broken is not None:
        raise ValueError(f"{folder} is damaged: {broken}; export it again from its checkpoint (`ratpt export`)")
    cfg = load_config(folder)
    model = build_model(cfg)
    try:
        state = load_file(str(weights), device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{weights} cannot be read ({err}): it is truncated or corrupt; export it again") from None
    load_matching_state(model, state, weights, folder / CONFIG)
    return model.to(device), cfg


def load_matching_state(model: nn.Module, state: dict[str, torch.Tensor], weights: Path, config: Path) -> None:
    """Load `state` (read from `weights`) into `model` (built from `config`), or a ValueError naming the
    missing, unexpected and misshapen tensors: a folder whose weights and config disagree."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{weights} does not match {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict(state)
