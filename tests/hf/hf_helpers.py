"""Helpers of the Hugging Face tests: small ratpt models with every weight away from its init, and local
lm-eval tasks (a task YAML beside its JSONL documents: no download)."""
import json

import torch

from ratpt.model import ModelConfig, build_model
from ratpt.model.lm import RATLM

VOCAB = 300  # >= the byte tokenizer's 257


def small_config(mixers: list[str], **overrides) -> ModelConfig:
    """4 heads of 8 in 2 groups, chunks of 4, a window of 5: T = 23 covers partial chunks and a full window."""
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=len(mixers) if len(mixers) > 1 else 2, head_dim=8,
                  ngroups=2, chunk_size=4, mixers=mixers, window=5, rnn_gate_horizon=64)
    return ModelConfig(**(fields | overrides))


def random_model(cfg: ModelConfig, seed: int = 0) -> RATLM:
    """A model of `cfg` whose weights (norms and gate biases included) are all perturbed, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_model_of(model: RATLM):
    """The RATForCausalLM with `model`'s config and weights (built in-process, no folder)."""
    from dataclasses import asdict

    from ratpt.hf.configuration_rat import RATConfig
    from ratpt.hf.modeling_rat import RATForCausalLM

    hf_model = RATForCausalLM(RATConfig(**asdict(model.cfg))).eval()
    hf_model.model.load_state_dict(model.state_dict())
    return hf_model


CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATION_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
"""

ROLLING_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def write_task(folder, name, template, docs):
    """A local lm-eval task `name` in `folder`: its YAML (from `template`) and its documents as JSONL."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / f"{name}.yaml").write_text(template.format(name=name, data=folder / f"{name}.jsonl"))
