"""A ratpt model as a Hugging Face folder that transformers loads without ratpt.

    config.json               RATConfig, with auto_map naming the modeling code below
    model.safetensors         ratpt's weights under `model.` (the head is tied, so not stored)
    generation_config.json    EOS and pad token
    configuration_rat.py, modeling_rat.py, cache_rat.py, rat_ops.py     the code (torch + transformers only)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json     the tokenizer (ratpt.hf.tokenizer)

so that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` load it. The files are written by transformers' own
`save_pretrained`, so a model loaded from the folder and saved again writes the same bytes.
"""
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from ratpt.data.tokenizer import load_tokenizer
from ratpt.files import publish_dir
from ratpt.hf.configuration_rat import RATConfig
from ratpt.hf.modeling_rat import RATForCausalLM
from ratpt.hf.tokenizer import to_hf_tokenizer
from ratpt.model.config import ModelConfig
from ratpt.model.lm import RATLM

PREFIX = "model."  # ratpt's parameter names sit under RATForCausalLM.model

# save_pretrained copies a class's module (and the modules it imports relatively) into the folder and names
# it in config.json's auto_map once the class is registered for an Auto class.
RATConfig.register_for_auto_class()
RATForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def export_hf(model: RATLM, model_cfg: ModelConfig, out_dir: str | os.PathLike,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write `model` as a Hugging Face folder at `out_dir` (replaced whole, atomically), with the tokenizer
    of `tokenizer_dir` (a ratpt tokenizer folder, file or "byte") when given."""
    tokenizer = to_hf_tokenizer(load_tokenizer(tokenizer_dir)) if tokenizer_dir is not None else None
    if tokenizer is not None and len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer of {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                         f"vocabulary ({model_cfg.vocab_size})")
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    config = RATConfig(**asdict(model_cfg), eos_token_id=eos, pad_token_id=eos)
    with torch.device("meta"):
        hf_model = RATForCausalLM(config)
    hf_model.model.load_state_dict(model.state_dict(), assign=True)
    hf_model.generation_config.eos_token_id, hf_model.generation_config.pad_token_id = eos, eos
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
