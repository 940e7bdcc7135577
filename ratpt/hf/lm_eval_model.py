"""A ratpt model as an lm-evaluation-harness model (`lm_eval --model ratpt --model_args path=DIR`).

Requests are scored with ratpt's own model and tokenizer, not through transformers: what lm-eval measures
is then exactly the trained model. Requests are sorted by length and run in right-padded batches (every
mixer is causal, so padding after a sequence never changes its logits); the longest come first, so an
out-of-memory batch size shows at once.
"""
from __future__ import annotations

import os

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ratpt.data.tokenizer import Tokenizer
from ratpt.generate import generate
from ratpt.hf.convert import load_model_dir
from ratpt.model.lm import RATLM

MAX_LENGTH = 4096  # tokens of context a request keeps (the oldest are cut); RAT itself has no limit


@register_model("ratpt")
class RATPTLM(TemplateLM):
    def __init__(self, path: str | None = None, batch_size: int | str = 8, device: str | None = None,
                 dtype: str = "float32", max_length: int = MAX_LENGTH, model: RATLM | None = None,
                 tokenizer: Tokenizer | None = None):
        """Load `path` (or take `model` and `tokenizer` as given, e.g. in the middle of training)."""
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model is None:
            model, tokenizer = load_model_dir(path, device)
        self.model = model.to(getattr(torch, dtype)).eval()
        self.tokenizer_ = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device_ = torch.device(device)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                   self.batch_size, self.max_length, self.device_)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored whole, in disjoint windows of max_length tokens after an EOS prefix."""
        windows, owner = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, score_continuations(self.model, windows, self.batch_size,
                                                                  self.max_length, self.device_)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (ratpt.generate), cut before the first stop string; requests that share
        generation arguments share batches, longest prompts first."""
        outputs = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(request.args for request in requests):
            groups.setdefault(_generation_key(gen_kwargs, self.eot_token_id), []).append(index)
        for (stops, max_new), indices in groups.items():
            prompts = {i: generation_context(self.tok_encode(requests[i].args[0]), self.max_length, max_new,
                                             self.eot_token_id) for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                new = generate(self.model, [prompts[i] for i in batch], max_new, eos_id=self.eot_token_id)
                for i, tokens in zip(batch, new):
                    outputs[i] = _cut(self.tokenizer_.decode([t for t in tokens if t != self.eot_token_id]), stops)
        return outputs


@torch.no_grad()
def score_continuations(model: RATLM, pairs: list[tuple[list[int], list[int]]], batch_size: int, max_length: int,
                        device: torch.device | str = "cpu") -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) for each pair of token
    lists; the context is cut from the left to max_length tokens of input."""
    inputs = [(context + continuation)[-(max_length + 1):][:-1] for context, continuation in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(inputs[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        tokens = torch.zeros(len(batch), len(inputs[batch[0]]), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            tokens[row, :len(inputs[i])] = torch.tensor(inputs[i], device=device)
        logprobs = model(tokens).float().log_softmax(-1)
        for row, i in enumerate(batch):
            continuation = torch.tensor(pairs[i][1], device=device)
            end = len(inputs[i])
            scored = logprobs[row, end - len(continuation):end]
            results[i] = (float(scored.gather(-1, continuation[:, None]).sum()),
                          bool((scored.argmax(-1) == continuation).all()))
    return results


def generation_context(tokens: list[int], max_length: int, max_new_tokens: int, eos_id: int) -> list[int]:
    """The last tokens of a generation request's context, as many as leave room for its max_new_tokens within
    max_length, and at least one (the EOS for an empty context): a request that asks for max_length new tokens
    or more keeps only its last token, where a plain `tokens[-(max_length - max_new_tokens):]` would keep the
    whole context (at 0) or cut its start instead (below 0)."""
    return tokens[-max(max_length - max_new_tokens, 1):] or [eos_id]


def _generation_key(gen_kwargs: dict, eos_id: int) -> tuple[tuple[str, ...], int]:
    """(stop strings, new tokens): what a greedy generation request asks for."""
    until = gen_kwargs.get("until") or []
    stops = tuple([until] if isinstance(until, str) else until)
    return stops, int(gen_kwargs.get("max_gen_toks", 256))


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """text up to the first occurrence of any stop string."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def evaluate_tasks(model_dir: str | os.PathLike, tasks: list[str], batch_size: int = 8, limit: float | None = None,
                   num_fewshot: int | None = None, include_path: str | None = None, device: str | None = None,
                   dtype: str = "float32", max_length: int = MAX_LENGTH, log_samples: bool = False,
                   bootstrap_iters: int = 100000) -> dict:
    """lm-eval's `simple_evaluate` of the model in `model_dir` on `tasks` (names lm-eval knows, or tasks of
    the YAML files under `include_path`); its results dict. `bootstrap_iters` resamplings estimate the
    standard errors (lm-eval's default; 0 skips them, which on a few documents saves most of the time)."""
    manager = task_manager(tasks, include_path)
    lm = RATPTLM(str(model_dir), batch_size=batch_size, device=device, dtype=dtype, max_length=max_length)
    return evaluate_lm(lm, tasks, manager, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
                       bootstrap_iters=bootstrap_iters)


def evaluate_lm(lm: RATPTLM, tasks: list[str], manager: TaskManager, limit: float | None = None,
                num_fewshot: int | None = None, log_samples: bool = False, bootstrap_iters: int = 100000) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on `tasks`, which `manager` (task_manager) knows; its results dict."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                           task_manager=manager, batch_size=lm.batch_size, bootstrap_iters=bootstrap_iters)


def task_manager(tasks: list[str], include_path: str | None = None) -> TaskManager:
    """lm-eval's index of tasks holding every one of `tasks`, or a ValueError naming those it lacks. When the
    YAML files under `include_path` define them all, only those are indexed: lm-eval's own thousands of task
    files take about 20 s to index on two CPU cores."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if not _unknown_tasks(local, tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = _unknown_tasks(manager, tasks)
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(map(repr, unknown))} (`lm_eval --tasks list` lists its "
                         f"tasks; a task of your own is a YAML file in the include path"
                         f"{f', {include_path}' if include_path else ''})")
    return manager


def _unknown_tasks(manager: TaskManager, tasks: list[str]) -> list[str]:
    return [task for task in tasks if not manager.match_tasks([task])]


def metric_values(results: dict) -> dict[str, float]:
    """{"task/metric": value} of every number in lm-eval's results (standard errors left out); a metric's
    filter is appended ("exact_match/strict-match") unless it is lm-eval's "none"."""
    values = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if filter_name and not metric.endswith("_stderr") and type(value) in (int, float):  # "N/A" is a str
                values[f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    return values
