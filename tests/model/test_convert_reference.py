"""Import of reference-format (CLAIRE-Labo/RAT) checkpoints: same logits, clear errors."""
import argparse
import json
import logging
import re
import sys

import pytest
import torch

import ratpt
from dense_reference import random_reference_state, reference_lm_logits
from public_checkpoint import EasyDict, module_named, public_run_config, save_public_checkpoint
from ratpt.cli import main
from ratpt.convert import run
from ratpt.model.convert import convert_reference_state, load_reference_state
from ratpt.model.lm import build_model

VOCAB, D, HEAD_DIM, FFN = 41, 16, 4, 64


@pytest.mark.parametrize("mixers,L,G", [
    (["rat"], 4, 2), (["rat"], 3, 1), (["attention"], 4, 2), (["rat", "swa"], 4, 2), (["rnn"], 4, 2),
], ids=["rat-L4-G2", "rat-L3-G1", "attention", "rat+swa", "rnn"])
def test_converted_model_gives_the_reference_logits(mixers, L, G):
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=mixers, head_dim=HEAD_DIM, ngroups=G, ffn=FFN)
    converted, cfg = convert_reference_state(state, chunk_size=L, head_dim=HEAD_DIM, ngroups=G,
                                             mixers=mixers, window=3)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.ffn_mult) == (VOCAB, D, 2, FFN / D)
    model = build_model(cfg).double()
    model.load_state_dict(converted)
    tokens = torch.randint(0, VOCAB, (11,))
    expected = reference_lm_logits(state, tokens, mixers, L, HEAD_DIM, G, window=3)
    torch.testing.assert_close(model(tokens[None])[0], expected, rtol=1e-9, atol=1e-9)


def convert_args(ckpt, out, **flags):
    base = dict(source="reference", checkpoint=str(ckpt), out=str(out), chunk_size=4, head_dim=HEAD_DIM,
                ngroups=None, mixers=None, window=None, allow_pickle=False)
    return argparse.Namespace(**{**base, **flags})


def test_cli_converts_a_compiled_checkpoint_file_and_load_pretrained_reads_it(tmp_path):
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=["rat"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    compiled = {f"_orig_mod.{k}": v.float() for k, v in state.items()}
    torch.save({"task": compiled, "step": 100}, tmp_path / "ref.pt")
    assert run(convert_args(tmp_path / "ref.pt", tmp_path / "out")) == 0
    model, cfg = ratpt.load_pretrained(tmp_path / "out")
    tokens = torch.randint(0, VOCAB, (9,))
    expected = reference_lm_logits(state, tokens, ["rat"], 4, HEAD_DIM, 2, window=1024)
    torch.testing.assert_close(model(tokens[None])[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_mixers_naming_no_mixer_is_refused_not_read_as_the_default(tmp_path):
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=["rat"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    torch.save({"task": state}, tmp_path / "ref.pt")
    with pytest.raises(ValueError, match="--mixers ' , ' names no mixer: give a comma-separated pattern from rat,"):
        run(convert_args(tmp_path / "ref.pt", tmp_path / "out", mixers=" , "))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (dict(ngroups=1), "--ngroups 2"),
    (dict(mixers=["attention"]), "is a RAT layer .* --mixers makes layer 0 'attention'"),
    (dict(head_dim=5), "head_dim"),
    (dict(mixers=["rat", "bogus"]), "unknown mixer"),
], ids=["wrong-ngroups", "wrong-mixer", "head_dim-not-dividing", "unknown-mixer"])
def test_flags_that_disagree_with_the_shapes_are_clear_errors(flags, message):
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=["rat"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    kwargs = dict(chunk_size=4, head_dim=HEAD_DIM, ngroups=2, mixers=["rat"], window=3) | flags
    with pytest.raises(ValueError, match=message):
        convert_reference_state(state, **kwargs)


def test_rat_flags_on_an_attention_checkpoint_are_a_clear_error():
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=["attention"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    with pytest.raises(ValueError, match="--mixers"):
        convert_reference_state(state, chunk_size=4, head_dim=HEAD_DIM, ngroups=2, mixers=["rat"])


def test_untied_head_and_unknown_keys_are_errors():
    state = random_reference_state(VOCAB, D, n_layers=1, mixers=["rat"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    untied = dict(state, **{"head.lm_head.weight": state["embedding.wte.weight"] + 1})
    with pytest.raises(ValueError, match="ties the head"):
        convert_reference_state(untied, chunk_size=4, head_dim=HEAD_DIM)
    extra = dict(state, **{"backbone.layers.0.seq_layer.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key"):
        convert_reference_state(extra, chunk_size=4, head_dim=HEAD_DIM)


def test_missing_file_and_non_reference_payloads_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reference_state(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=f"reference checkpoint {tmp_path} is a folder: name the .pt file"):
        load_reference_state(str(tmp_path))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'task'"):
        load_reference_state(str(tmp_path / "other.pt"))
    torch.save({"task": {}, "cfg": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_reference_state(str(tmp_path / "pickled.pt"))
    assert load_reference_state(str(tmp_path / "pickled.pt"), allow_pickle=True) == {}
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for allow_pickle in (False, True):  # no checkpoint at all: no advice to unpickle it
        with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint") as refused:
            load_reference_state(str(tmp_path / "garbage.pt"), allow_pickle=allow_pickle)
        assert "weights_only" not in str(refused.value) and "--allow-pickle" not in str(refused.value)


# The paper's three released models, as the public trainers save them (tests/model/public_checkpoint.py).
MODELS = {"rat": ["rat"], "attention": ["attention"], "rat+swa": ["rat", "swa"]}
L_SAVED, G_SAVED, W_SAVED = 3, 1, 5  # unlike the defaults (16, 2, 1024): the stored config must supply them


def write_public_file(tmp_path, model: str, trainer: str = "ddp"):
    mixers = MODELS[model]
    state = random_reference_state(VOCAB, D, n_layers=2, mixers=mixers, head_dim=HEAD_DIM, ngroups=G_SAVED, ffn=FFN)
    run_config = public_run_config(mixers, VOCAB, D, n_layers=2, ffn=FFN, head_dim=HEAD_DIM, L=L_SAVED, G=G_SAVED,
                                   window=W_SAVED)
    path = tmp_path / "9.pth"
    save_public_checkpoint(path, state, run_config, trainer)
    return path, state, run_config


def convert_cli(*argv) -> int:
    return main(["convert", "reference", *map(str, argv)])


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_public_trainer_file_converts_without_flags_to_the_reference_logits(tmp_path, model, trainer):
    path, state, run_config = write_public_file(tmp_path, model, trainer)
    assert convert_cli(path, "--out", tmp_path / "out") == 0
    assert "easydict" not in sys.modules  # read as plain dicts, never imported
    converted, cfg = ratpt.load_pretrained(tmp_path / "out")
    assert cfg.mixers == MODELS[model] and cfg.head_dim == HEAD_DIM
    if "rat" in cfg.mixers:
        assert (cfg.chunk_size, cfg.ngroups) == (L_SAVED, G_SAVED)
    if "swa" in cfg.mixers:
        assert cfg.window == W_SAVED
    assert json.loads((tmp_path / "out" / "reference_config.json").read_text()) == run_config
    saved = {k: v.float().double() for k, v in state.items()}  # the file holds float32 weights
    tokens = torch.randint(0, VOCAB, (11,))
    expected = reference_lm_logits(saved, tokens, MODELS[model], L_SAVED, HEAD_DIM, G_SAVED, window=W_SAVED)
    torch.testing.assert_close(converted.double()(tokens[None])[0], expected, rtol=1e-9, atol=1e-9)


def test_flags_that_agree_with_the_stored_config_are_accepted(tmp_path):
    path, _, _ = write_public_file(tmp_path, "rat+swa")
    assert convert_cli(path, "--out", tmp_path / "out", "--chunk-size", L_SAVED, "--head-dim", HEAD_DIM,
                       "--ngroups", G_SAVED, "--mixers", "rat,swa", "--window", W_SAVED) == 0


@pytest.mark.parametrize("flag,value,stored", [
    ("--chunk-size", "4", str(L_SAVED)), ("--head-dim", "8", str(HEAD_DIM)), ("--ngroups", "2", str(G_SAVED)),
    ("--mixers", "rat", "rat,swa"), ("--window", "1024", str(W_SAVED)),
])
def test_a_flag_that_disagrees_with_the_stored_config_is_an_error_naming_both(tmp_path, capsys, flag, value, stored):
    path, _, _ = write_public_file(tmp_path, "rat+swa")
    assert convert_cli(path, "--out", tmp_path / "out", flag, value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(rf"{flag} {value} .*says {stored}\b", err), err
    assert not (tmp_path / "out").exists()


def test_an_existing_export_is_never_replaced(tmp_path, capsys):
    """A non-empty --out (an earlier export, say with its tokenizer) or a file is refused before the checkpoint
    loads, and left as it was."""
    path, _, _ = write_public_file(tmp_path, "rat")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.yaml").write_text("model: {}\n")
    (tmp_path / "a-file").write_text("keep\n")
    assert convert_cli(path, "--out", tmp_path / "export") == 2
    assert "export folder " + str(tmp_path / "export") + " is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["config.yaml"]
    assert convert_cli(path, "--out", tmp_path / "a-file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "keep\n"


def test_training_state_is_ignored_and_said_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path, _, _ = write_public_file(tmp_path, "rat", "fsdp")
    assert convert_cli(path, "--out", tmp_path / "out") == 0
    ignored = [r.getMessage() for r in caplog.records if "ignor" in r.getMessage()]
    assert ignored and all(name in ignored[0] for name in ("optimizer", "lr_scheduler", "resume_kwargs")), ignored


class Evil:  # any class but EasyDict, in the easydict module's name
    pass


Evil.__module__ = "easydict"


@pytest.mark.parametrize("make_config,name", [
    (lambda: argparse.Namespace(lr=1.0), "argparse.Namespace"), (Evil, "easydict.Evil"),
], ids=["namespace", "other-easydict-class"])
def test_a_file_naming_any_other_class_is_refused_in_one_line(tmp_path, capsys, make_config, name):
    state = random_reference_state(VOCAB, D, n_layers=1, mixers=["rat"], head_dim=HEAD_DIM, ngroups=2, ffn=FFN)
    with module_named("easydict", EasyDict=EasyDict, Evil=Evil):
        torch.save({"task": state, "config": EasyDict({"model": {}, "extra": make_config()})}, tmp_path / "x.pth")
    assert convert_cli(tmp_path / "x.pth", "--out", tmp_path / "out", "--chunk-size", 4, "--head-dim", HEAD_DIM) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "--allow-pickle" in err, err


def test_a_truncated_file_says_it_is_truncated(tmp_path, capsys):
    path, _, _ = write_public_file(tmp_path, "rat")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert convert_cli(path, "--out", tmp_path / "out", "--chunk-size", L_SAVED, "--head-dim", HEAD_DIM) == 2
    assert "is truncated" in capsys.readouterr().err


def test_allow_pickle_with_a_module_that_is_not_installed_names_the_module(tmp_path, capsys):
    path, _, _ = write_public_file(tmp_path, "rat")
    assert convert_cli(path, "--out", tmp_path / "out", "--chunk-size", L_SAVED, "--head-dim", HEAD_DIM,
                       "--allow-pickle") == 2
    err = capsys.readouterr().err
    assert "'easydict'" in err and "not installed" in err and "truncated" not in err, err
