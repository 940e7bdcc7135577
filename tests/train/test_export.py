"""A trained checkpoint evaluates, exports to safetensors and generates through the CLI."""
import re
import shutil

import pytest
import torch

import ratpt
from ratpt.config import load_config
from ratpt.model import build_model
from ratpt.checkpoint import load_checkpoint
from ratpt.cli import main
from ratpt.files import write_checksums

from run_helpers import ratpt as run_ratpt, train_here


@pytest.fixture(scope="module")
def trained(byte_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = train_here(byte_data, run_dir, "train.steps=6", "eval.interval=6", "eval.max_samples=8",
                        "model.mixers=[rat, swa]", "model.window=8")
    return run_dir, result.val_loss


@pytest.fixture(scope="module")
def evaluated(trained) -> str:
    """`ratpt eval` of the run, once for the tests that read what it says."""
    done = run_ratpt("eval", str(trained[0]))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_eval_of_the_final_checkpoint_matches_the_trainers_validation(trained, evaluated):
    assert float(re.search(r"val loss ([0-9.]+)", evaluated).group(1)) == pytest.approx(trained[1], abs=1e-4)


def test_export_gives_the_checkpoints_logits_and_generates(trained, tmp_path):
    run_dir, _ = trained
    out = tmp_path / "export"
    done = run_ratpt("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer" / "meta.json").is_file()

    cfg = load_config(run_dir / "config.yaml")
    reference = build_model(cfg.model)
    reference.load_state_dict(load_checkpoint(run_dir)["model"])
    exported, exported_cfg = ratpt.load_pretrained(out)
    assert exported_cfg == cfg.model
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40))
    torch.testing.assert_close(exported(tokens), reference(tokens), rtol=0, atol=0)

    sample = run_ratpt("generate", str(out), "--prompt", "The for statement", "--max-new-tokens", "12")
    assert sample.returncode == 0, sample.stderr
    assert "The for statement" in sample.stdout and "tokens/s" in sample.stderr  # the timing report: stderr


def test_export_refuses_a_non_empty_folder(trained, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = run_ratpt("export", str(trained[0]), "--out", str(tmp_path))
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_an_unconsolidated_deepspeed_checkpoint_is_refused_with_the_command_to_fix_it(trained, tmp_path):
    fake = tmp_path / "step_00000001"
    fake.mkdir()
    torch.save({"engine": "deepspeed", "step": 1}, fake / "state.pt")
    (fake / "config.yaml").write_text((trained[0] / "config.yaml").read_text())
    done = run_ratpt("export", str(fake), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "python -m ratpt.engines.deepspeed_checkpoint" in done.stderr


def test_eval_says_which_checkpoint_it_evaluated(trained, evaluated):
    assert f"{trained[0] / 'checkpoints' / 'step_00000006'}: val loss" in evaluated


def test_eval_says_how_many_sequences_it_evaluated_not_how_many_were_asked_for(trained):
    """eval.max_samples beyond the split's size: the line counts the sequences the loss is over (the whole
    split, in whole micro-batches), not the number asked for."""
    from ratpt.data.batches import build_val_batches

    cfg = load_config(trained[0] / "config.yaml")
    micro_batches = len(build_val_batches(cfg.data, vocab_size=cfg.model.vocab_size, micro_batch=cfg.train.micro_batch,
                                          dp_rank=0, dp_size=1, max_samples=None))
    done = run_ratpt("eval", str(trained[0]), "eval.max_samples=100000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"| {micro_batches * cfg.train.micro_batch} sequences" in done.stdout, done.stdout


def test_eval_with_fewer_samples_than_a_micro_batch_names_eval_max_samples(trained):
    """eval.interval=0 passes the config's check (a training run then skips validation); `ratpt eval` still
    validates, and the batches it opens said the split was too small."""
    done = run_ratpt("eval", str(trained[0]), "eval.max_samples=2", "eval.interval=0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "eval.max_samples (2) is fewer than one micro-batch (4) per rank (1): raise it to at least 4" in done.stderr


def test_eval_with_another_model_is_refused_naming_the_keys(trained):
    done = run_ratpt("eval", str(trained[0]), "model.n_layers=3")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.n_layers: 2 there, 3 here" in done.stderr and "drop those model.* overrides)" in done.stderr
    assert "train a new one" not in done.stderr, "training advice for a command that trains nothing"


def test_eval_and_export_of_a_corrupt_checkpoint_name_the_file(trained, tmp_path):
    copy = tmp_path / "step_00000006"
    shutil.copytree(trained[0] / "checkpoints" / "step_00000006", copy)
    state = copy / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: torch would load it
    state.write_bytes(bytes(data))
    for done in (run_ratpt("eval", str(copy)), run_ratpt("export", str(copy), "--out", str(tmp_path / "out"))):
        assert done.returncode == 2 and f"{state} differs from its checksum" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_whose_config_was_edited_names_the_tensors_not_a_traceback(trained, tmp_path, capsys):
    """A checkpoint without checksums.json (written before ratpt kept them) whose config.yaml says one layer
    fewer than its weights hold."""
    copy = tmp_path / "step_00000006"
    shutil.copytree(trained[0] / "checkpoints" / "step_00000006", copy)
    (copy / "checksums.json").unlink()
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("n_layers: 2", "n_layers: 1"))
    assert main(["export", str(copy), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {copy} does not match {config}: missing [], unexpected ['layers.1." in err
    assert not (tmp_path / "out").exists()


def test_export_without_a_tokenizer_is_refused_unless_asked_for(trained, tmp_path):
    copy = tmp_path / "step_00000006"
    shutil.copytree(trained[0] / "checkpoints" / "step_00000006", copy)
    shutil.rmtree(copy / "tokenizer")
    write_checksums(copy)  # a checkpoint of data without a tokenizer folder
    refused = run_ratpt("export", str(copy), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "--no-tokenizer" in refused.stderr, refused.stderr[-2000:]
    done = run_ratpt("export", str(copy), "--out", str(tmp_path / "out"), "--no-tokenizer")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "tokenizer").exists()
