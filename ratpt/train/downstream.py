"""Downstream evaluation during training (`eval.tasks`, `eval.passkey`): lm-evaluation-harness task metrics
and passkey retrieval accuracy of the weights of the step, beside the validation loss.

Whatever the engine, `Engine.model_weights` gathers the plain model's weights (the masters a checkpoint
holds); rank 0 loads them into a plain copy of the model and scores it with the code of `ratpt evaluate`
and `ratpt evaluate-long` (ratpt.hf), so that a logged value is what those commands give on the checkpoint
of that step. The other ranks wait for rank 0's numbers (`on_rank0`: an error there is raised on every
rank), so one evaluation must finish within the collective timeout (RATPT_COLLECTIVE_TIMEOUT, 30 minutes
by default). Everything an evaluation needs (lm-eval, the tasks, the tokenizer) is checked when the run
starts.
"""
from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ratpt.checkpoint import checkpoint_name
from ratpt.config import Config, ConfigError
from ratpt.data.tokenizer import Tokenizer, load_tokenizer
from ratpt.engines import Engine
from ratpt.engines.loss import uses_bf16
from ratpt.hf.passkey import KEY_DIGITS, PromptBuilder, accuracy_by_length, evaluate_passkey, write_report
from ratpt.model import build_model
from ratpt.parallel.process_group import on_rank0
from ratpt.train.checkpointer import tokenizer_folder

log = logging.getLogger("ratpt.train")

PASSKEY_SEED = 0  # `ratpt evaluate-long`'s default: the same keys


def downstream_enabled(cfg: Config) -> bool:
    return bool(cfg.eval.tasks or cfg.eval.passkey.lengths)


class DownstreamEval:
    """The lm-eval tasks and passkey lengths of `cfg.eval`, scored at each evaluation; results under
    `<out_dir>/evals/step_XXXXXXXX/` (lm_eval.json, passkey.json, passkey.png)."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        """Check on rank 0 that the run can evaluate (collective): lm-eval installed, every task known, the
        data's tokenizer present, every passkey length long enough for its prompt."""
        self.cfg, self.device = cfg, device
        self.tokenizer: Tokenizer | None = None  # rank 0 only, as the task index
        self.task_index = None
        on_rank0(self._prepare)

    def _prepare(self) -> None:
        e = self.cfg.eval
        folder = tokenizer_folder(self.cfg)
        if folder is None:
            raise ConfigError(f"eval.tasks and eval.passkey score text, which needs the tokenizer the data was made "
                              f"with: {self.cfg.data.streams[0].path} has no tokenizer/ folder (tokenize it with "
                              "`python -m data_prep tokenize`), or leave them empty")
        self.tokenizer = load_tokenizer(folder)
        if e.tasks:
            self.task_index = _task_manager(e.tasks, e.task_include_path)
        builder = PromptBuilder(self.tokenizer)
        for length in e.passkey.lengths:
            try:
                builder.build(length, 0.0, "0" * KEY_DIGITS)
            except ValueError as err:
                raise ConfigError(f"eval.passkey.lengths: {err}") from None

    def __call__(self, engine: Engine, step: int) -> dict[str, float]:
        """The scalars of this step (collective): "lm_eval/<task>/<metric>" and "passkey/<length>" (accuracy
        over the depths); none, with the error logged, if the evaluation fails."""
        weights = engine.model_weights()

        def score() -> dict[str, float]:
            try:
                return self._score(weights, step)
            except Exception as err:  # NOTE: a task's data out of reach or a full GPU must not end hours of training
                log.error("step %d: eval.tasks / eval.passkey failed (%s: %s); training goes on without them this "
                          "time", step, type(err).__name__, err)
                return {}

        return on_rank0(score)

    def _score(self, weights: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        e, out = self.cfg.eval, Path(self.cfg.out_dir) / "evals" / checkpoint_name(step)
        model = build_model(self.cfg.model).to(self.device)
        model.load_state_dict(weights)
        dtype = "bfloat16" if uses_bf16(self.cfg.train.precision, self.device.type) else "float32"
        model = model.to(getattr(torch, dtype)).eval()
        out.mkdir(parents=True, exist_ok=True)
        scalars: dict[str, float] = {}
        with _rng_kept(self.device):  # lm-eval seeds the global generators: training's must not change
            if e.tasks:
                scalars |= self._tasks(model, dtype, out)
            if e.passkey.lengths:
                p = e.passkey
                results = evaluate_passkey(model, self.tokenizer, p.lengths, p.depths, trials=p.trials,
                                           seed=PASSKEY_SEED, piece=p.piece)
                write_report(results, out)
                scalars |= {f"passkey/{length}": value for length, value in accuracy_by_length(results).items()}
        log.info("step %d | %s", step, " | ".join(f"{key} {value:.4g}" for key, value in scalars.items()))
        return scalars

    def _tasks(self, model, dtype: str, out: Path) -> dict[str, float]:
        # NOTE: imported here: lm-eval takes seconds to import, and only runs with eval.tasks need it
        from lm_eval.utils import handle_non_serializable

        from ratpt.hf.lm_eval_model import RATPTLM, evaluate_lm, metric_values

        e = self.cfg.eval
        lm = RATPTLM(batch_size=e.task_batch_size, device=str(self.device), dtype=dtype, model=model,
                     tokenizer=self.tokenizer)
        results = evaluate_lm(lm, e.tasks, self.task_index, limit=e.task_limit or None, num_fewshot=e.task_num_fewshot,
                              bootstrap_iters=0)
        (out / "lm_eval.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
        return {f"lm_eval/{key}": value for key, value in metric_values(results).items()}


def _task_manager(tasks: list[str], include_path: str):
    """lm-eval's index of `tasks`, or a ConfigError naming what is missing: lm-eval itself, the include
    path, or a task."""
    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"eval.task_include_path {include_path!r} is not a folder: name the folder of your task "
                          "YAML files, or leave it empty")
    try:
        from ratpt.hf.lm_eval_model import task_manager
    except ImportError as err:
        raise ConfigError(f"eval.tasks runs lm-evaluation-harness, which cannot be imported ({err}): install "
                          "requirements.txt (lm-eval), or set eval.tasks=[]") from None
    try:
        return task_manager(tasks, include_path or None)
    except ValueError as err:
        raise ConfigError(f"eval.tasks: {err}") from None


@contextmanager
def _rng_kept(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's (CPU and `device`) random states restored on leaving."""
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
