"""Import of reference-format (CLAIRE-Labo/RAT) checkpoints: same logits, clear errors."""
import argparse

import pytest
import torch

import ratpt
from dense_reference import random_reference_state, reference_lm_logits
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
                ngroups=2, mixers="rat", window=1024, allow_pickle=False)
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
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="'task'"):
        load_reference_state(str(tmp_path / "other.pt"))
    torch.save({"task": {}, "cfg": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_reference_state(str(tmp_path / "pickled.pt"))
    assert load_reference_state(str(tmp_path / "pickled.pt"), allow_pickle=True) == {}
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for allow_pickle in (False, True):  # no checkpoint at all: no advice to unpickle it
        with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint"):
            load_reference_state(str(tmp_path / "garbage.pt"), allow_pickle=allow_pickle)
