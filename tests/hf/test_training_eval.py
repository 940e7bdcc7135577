"""lm-eval tasks and passkey retrieval during training (eval.tasks, eval.passkey): what each evaluation logs
is what `ratpt evaluate` and `ratpt evaluate-long` give on the checkpoint of that step, and what cannot run
is refused before training starts."""
import functools
import json
import re
import sys

import pytest
import torch
from hf_helpers import CHOICE_TASK, ROLLING_TASK, write_task
from run_helpers import small_run

from ratpt.cli import main as ratpt_main
from ratpt.config import ConfigError, load_config
from ratpt.hf import lm_eval_model
from ratpt.hf.lm_eval_model import evaluate_tasks
from ratpt.hf.passkey import accuracy_by_length
from ratpt.train.downstream import DownstreamEval
from ratpt.train.trainer import train

TASKS = ["toy_choice", "toy_rolling"]
PASSKEY = 256  # tokens (bytes): the shortest prompt of the byte tokenizer is about 220


def local_tasks(folder):
    write_task(folder, "toy_choice", CHOICE_TASK,
               [{"context": "The for statement", "choices": [" iterates", " sleeps"], "label": 0},
                {"context": "A module is a file", "choices": [" of Python code", " of paper"], "label": 1}])
    write_task(folder, "toy_rolling", ROLLING_TASK, [{"text": "Every object has an identity, a type and a value."}])
    return folder


@pytest.fixture(scope="module")
def trained(byte_data, tmp_path_factory):
    """4 steps of a tiny model, evaluated (and checkpointed) at steps 2 and 4."""
    tasks = local_tasks(tmp_path_factory.mktemp("tasks"))
    run_dir = tmp_path_factory.mktemp("run")
    # in this process: lm-eval, imported here already, takes seconds to import in another
    train(run_config(byte_data, f"out_dir={run_dir}", "train.steps=4", "checkpoint.interval=2", "eval.interval=2",
                     "eval.max_samples=4", "logging.tensorboard=true", f"eval.tasks=[{','.join(TASKS)}]",
                     f"eval.task_include_path={tasks}", f"eval.passkey.lengths=[{PASSKEY}]", "eval.passkey.depths=[0.5]",
                     "eval.passkey.trials=1"))
    return run_dir, tasks


def logged(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_each_evaluation_logs_what_the_commands_give_on_that_steps_checkpoint(trained, tmp_path):
    run_dir, tasks = trained
    scalars = logged(run_dir)
    metrics = {"lm_eval/toy_choice/acc": ("toy_choice", "acc,none"),
               "lm_eval/toy_rolling/word_perplexity": ("toy_rolling", "word_perplexity,none")}
    for tag in [*metrics, f"passkey/{PASSKEY}", "val/loss"]:
        assert sorted(scalars[tag]) == [2, 4], tag
    perplexity = scalars["lm_eval/toy_rolling/word_perplexity"]
    assert perplexity[2] != perplexity[4], "each evaluation scores the weights of its step"

    export = tmp_path / "export"
    assert ratpt_main(["export", str(run_dir / "checkpoints" / "step_00000002"), "--out", str(export)]) == 0
    results = evaluate_tasks(export, TASKS, include_path=str(tasks), bootstrap_iters=0)["results"]
    for tag, (task, key) in metrics.items():
        assert scalars[tag][2] == pytest.approx(results[task][key], rel=1e-6), tag  # TensorBoard keeps float32

    assert ratpt_main(["evaluate-long", str(export), "--lengths", str(PASSKEY), "--depths", "0.5", "--trials", "1",
                       "--out", str(tmp_path / "passkey")]) == 0
    command = json.loads((tmp_path / "passkey" / "passkey.json").read_text())
    during = json.loads((run_dir / "evals" / "step_00000002" / "passkey.json").read_text())
    assert during["records"] == command["records"]  # the same keys, the same answers, token for token
    assert scalars[f"passkey/{PASSKEY}"][2] == accuracy_by_length(command)[PASSKEY]
    assert (run_dir / "evals" / "step_00000004" / "lm_eval.json").is_file()


def run_config(data, *overrides: str):
    path, *keys = small_run(data, "unused", *overrides)
    return load_config(path, keys)


def start(data, *overrides: str) -> DownstreamEval:
    return DownstreamEval(run_config(data, "eval.interval=1", *overrides), torch.device("cpu"))


@pytest.mark.parametrize("overrides, key", [
    (["eval.interval=0", "eval.tasks=[toy_choice]"], "eval.interval > 0"),
    (["eval.tasks=[a,a]"], "eval.tasks must name each"),
    (["eval.task_limit=-1"], "eval.task_limit"),
    (["eval.passkey.lengths=[0]"], "eval.passkey.lengths"),
    (["eval.passkey.lengths=[4096]", "eval.passkey.depths=[1.5]"], "eval.passkey.depths"),
    (["eval.passkey.lengths=[4096]", "eval.passkey.piece=100"], "eval.passkey.piece"),
])
def test_settings_that_cannot_run_are_refused_when_the_config_loads(byte_data, overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        run_config(byte_data, "eval.interval=1", *overrides)


def test_an_unknown_task_is_refused_when_the_run_starts(byte_data, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    # lm-eval's own index (about 20 s to build) left out: the task is in neither
    monkeypatch.setattr(lm_eval_model, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    tasks = local_tasks(tmp_path)
    with pytest.raises(ConfigError, match="eval.tasks: lm-eval knows no task 'toy_missing'"):
        start(byte_data, "eval.tasks=[toy_choice,toy_missing]", f"eval.task_include_path={tasks}")


def test_missing_lm_eval_a_missing_task_folder_or_tokenizer_and_a_short_passkey_are_refused(byte_data, tmp_path,
                                                                                          monkeypatch):
    with pytest.raises(ConfigError, match="eval.task_include_path .* is not a folder"):
        start(byte_data, "eval.tasks=[toy_choice]", f"eval.task_include_path={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="eval.passkey.lengths: length 100 is too short"):
        start(byte_data, "eval.passkey.lengths=[100]")
    with pytest.raises(ConfigError, match="has no tokenizer/ folder"):
        start(tmp_path, "eval.passkey.lengths=[300]")  # a data folder without a tokenizer
    monkeypatch.setitem(sys.modules, "ratpt.hf.lm_eval_model", None)  # as if lm-eval were not installed
    with pytest.raises(ConfigError, match="eval.tasks runs lm-evaluation-harness, which cannot be imported"):
        start(byte_data, "eval.tasks=[toy_choice]")
