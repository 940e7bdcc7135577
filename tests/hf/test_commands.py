"""`ratpt evaluate`, `evaluate-long` and `export-hf` refuse bad flags and unwritable outputs before any model
loads (an evaluation can take hours, and its results are written at the end), naming the flag and the fix.
The model folder exists but is empty: a command that got past its checks would fail loading it, with
another message."""
import os
import re

import pytest

import ratpt.hf.lm_eval_model
from ratpt.cli import main


def refused(capsys, *argv: str) -> str:
    """stderr of a command that must end with the user-error exit code."""
    assert main(list(argv)) == 2
    return capsys.readouterr().err


@pytest.fixture
def empty_model(tmp_path):
    (tmp_path / "model").mkdir()
    return str(tmp_path / "model")


@pytest.mark.parametrize("flags, message", [
    (["--tasks", " , "], "--tasks names no task"),
    (["--tasks", "t", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--tasks", "t", "--limit", "-1"], r"--limit must be > 0 \(a fraction if < 1\), got -1.0"),
    (["--tasks", "t", "--num-fewshot", "-2"], "--num-fewshot must be >= 0, got -2"),
    (["--tasks", "t", "--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["--tasks", "t", "--bootstrap-iters", "-1"], r"--bootstrap-iters must be >= 0 \(0: none\), got -1"),
    (["--tasks", "t", "--out", "{tmp}/missing/results.json"], "the folder .*missing does not exist"),
    (["--tasks", "t", "--out", "{tmp}"], "is a folder: name the file to write in it"),
    (["--tasks", "t", "--device", "banana"], "--device 'banana' is not a device: use cpu, cuda or cuda:N"),
    (["--tasks", "t", "--device", "cuda:99"], "--device cuda:99: (CUDA is not available here|this machine has)"),
    (["--tasks", "t", "--include-path", "{tmp}/tasks"], "--include-path .*tasks is not a folder"),
], ids=["no-task", "batch-size", "limit", "num-fewshot", "max-length", "bootstrap-iters", "out-folder-missing",
        "out-a-folder", "device-unknown", "device-absent", "include-path-missing"])
def test_evaluate_refuses_bad_flags_before_loading(tmp_path, capsys, empty_model, flags, message):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert re.search(message, refused(capsys, "evaluate", empty_model, *flags))


def test_evaluate_without_the_hub_says_how_to_run_offline(capsys, empty_model, monkeypatch):
    def offline(*args, **kwargs):  # what datasets raises for a hub task without network
        raise ConnectionError("Couldn't reach 'EleutherAI/lambada_openai' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(ratpt.hf.lm_eval_model, "evaluate_tasks", offline)
    err = refused(capsys, "evaluate", empty_model, "--tasks", "lambada_openai")
    assert "could not fetch a task's data: Couldn't reach 'EleutherAI/lambada_openai'" in err
    assert "HF_DATASETS_OFFLINE=1" in err and "--include-path" in err


@pytest.mark.parametrize("flags, message", [
    (["--lengths", "1024,abc"], "--lengths '1024,abc': 'abc' is not an integer; .* e.g. --lengths 1024,4096"),
    (["--lengths", " , "], "--lengths names no value"),
    (["--depths", "0.5,half"], "--depths '0.5,half': 'half' is not a number; .* e.g. --depths 0,0.5,1"),
    (["--lengths", "4096,0"], "--lengths must be positive token counts, got 0"),
    (["--depths", "0,1.5"], r"--depths must be fractions of the haystack in \[0, 1\], got 0,1.5"),
    (["--piece", "-16"], "--piece must be >= 1 .*, got -16"),
    (["--trials", "0"], "--trials must be >= 1, got 0"),
    (["--out", "{tmp}/a-file"], "--out .*a-file is a file: name the folder for passkey.json"),
    (["--device", "banana"], "--device 'banana' is not a device: use cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: (CUDA is not available here|this machine has)"),
    (["--out", "{tmp}/a-file/passkey"], "--out .*a-file/passkey: .*a-file is a file, so nothing can be made under it"),
], ids=["length-not-integer", "no-length", "depth-not-number", "length-not-positive", "depth-outside",
        "piece-not-positive", "no-trials", "out-a-file", "device-unknown", "device-absent", "out-under-a-file"])
def test_evaluate_long_refuses_bad_flags_before_loading(tmp_path, capsys, empty_model, flags, message):
    (tmp_path / "a-file").touch()
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert re.search(message, refused(capsys, "evaluate-long", empty_model, *flags))


def test_export_hf_refuses_an_out_that_is_a_file(tmp_path, capsys, empty_model):
    (tmp_path / "a-file").touch()
    assert "--out " + str(tmp_path / "a-file") + " is a file, not a folder: name a new folder" in refused(
        capsys, "export-hf", empty_model, "--out", str(tmp_path / "a-file"))


def test_a_file_given_for_the_model_folder_is_named_as_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(SystemExit):
        main(["export-hf", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "hf")])
    assert f"pretrained folder {tmp_path / 'model.safetensors'} is a file: name the folder" in capsys.readouterr().err


def test_export_hf_refuses_an_out_under_a_file(tmp_path, capsys, empty_model):
    (tmp_path / "a-file").touch()
    err = refused(capsys, "export-hf", empty_model, "--out", str(tmp_path / "a-file" / "hf"))
    assert f"{tmp_path / 'a-file'} is a file, so nothing can be made under it" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any folder")
@pytest.mark.parametrize("command", [["export-hf"], ["evaluate-long"], ["evaluate", "--tasks", "t"]])
def test_an_out_in_a_folder_this_user_cannot_write_is_refused_before_loading(tmp_path, capsys, empty_model, command):
    """Found before the work, not by a PermissionError traceback after it (evaluate-long writes at the end)."""
    (tmp_path / "locked").mkdir(mode=0o500)
    err = refused(capsys, command[0], empty_model, *command[1:], "--out", str(tmp_path / "locked" / "out"))
    assert f"{tmp_path / 'locked'} is not writable by this user" in err
