"""A Hugging Face RAT folder (written by `export_hf`) back into ratpt's pretrained format.

Read as data only: config.json and model.safetensors, with no code of the folder run. The config's
fields are ModelConfig's own; the weights lose their `model.` prefix. The tokenizer.json becomes the
export's `tokenizer/` folder, with the EOS the config names.
"""
import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ratpt.data.layout import META_FILE
from ratpt.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from ratpt.hf.export import PREFIX
from ratpt.model.config import ModelConfig
from ratpt.model.lm import RATLM, build_model
from ratpt.model.pretrained import CONFIG as RATPT_CONFIG
from ratpt.model.pretrained import HF_CONFIG as CONFIG
from ratpt.model.pretrained import TOKENIZER as RATPT_TOKENIZER
from ratpt.model.pretrained import load_matching_state, load_pretrained, model_config_from, save_pretrained

WEIGHTS, TOKENIZER = "model.safetensors", "tokenizer.json"


def read_hf_folder(path: str | os.PathLike) -> tuple[RATLM, ModelConfig]:
    """The ratpt model and config of a Hugging Face RAT folder; ValueError if config and weights disagree."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {folder} does not exist")
    if (folder / RATPT_CONFIG).is_file() and not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder / CONFIG} not found: {folder} is a ratpt pretrained folder ({RATPT_CONFIG}) "
                                f"already, for load_pretrained and `ratpt generate` as it is")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a Hugging Face RAT folder holds {CONFIG} and {WEIGHTS}")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG} is not a JSON file ({err}): export the folder again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "rat":
        raise ValueError(f"{folder / CONFIG}: model_type is {model_type!r}, not 'rat'")
    cfg = model_config_from({f.name: config[f.name] for f in fields(ModelConfig) if f.name in config},
                            folder / CONFIG)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except SafetensorError as err:
        raise ValueError(f"{folder / WEIGHTS} cannot be read ({err}): it is truncated or corrupt") from None
    state = {key.removeprefix(PREFIX): value for key, value in weights.items()}
    model = build_model(cfg)
    load_matching_state(model, state, folder / WEIGHTS, folder / CONFIG)
    return model, cfg


def read_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer | None:
    """The tokenizer.json of a Hugging Face RAT folder with the EOS its config names (None without one)."""
    folder = Path(path)
    if not (folder / TOKENIZER).is_file():
        return None
    eos_id = json.loads((folder / CONFIG).read_text()).get("eos_token_id")
    return HFTokenizer(folder / TOKENIZER, eos_id=eos_id, name=folder.name)


def convert_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hugging Face RAT folder `path` as a ratpt pretrained folder (`ratpt.load_pretrained`)."""
    model, cfg = read_hf_folder(path)
    tokenizer = read_hf_tokenizer(path)
    if tokenizer is None:
        return save_pretrained(model, cfg, out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer_dir.mkdir()
        (tokenizer_dir / TOKENIZER).write_bytes(tokenizer.path.read_bytes())
        (tokenizer_dir / META_FILE).write_text(json.dumps(tokenizer.identity(), indent=2))
        return save_pretrained(model, cfg, out_dir, tokenizer_dir)


def load_model_dir(path: str | os.PathLike, device: str) -> tuple[RATLM, Tokenizer]:
    """The model and tokenizer of a ratpt pretrained folder or of a Hugging Face RAT folder."""
    folder = Path(path)
    if (folder / CONFIG).is_file():
        model, cfg = read_hf_folder(folder)
        tokenizer = read_hf_tokenizer(folder)
    else:
        model, cfg = load_pretrained(folder, device=device)
        tokenizer = load_tokenizer(folder / RATPT_TOKENIZER) if (folder / RATPT_TOKENIZER).exists() else None
    if tokenizer is None:
        raise FileNotFoundError(f"{folder} has no tokenizer: evaluation needs the text's tokens")
    if tokenizer.vocab_size > cfg.vocab_size:  # its larger ids would index past the embedding
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocabulary ({cfg.vocab_size}): it is not the tokenizer the model was trained with")
    return model.to(device), tokenizer
