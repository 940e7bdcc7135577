"""The exported Hugging Face folder: what transformers loads from it, byte-stable re-saving, clear errors,
tokenizers with ratpt's ids, and the way back to ratpt."""
import json
import re
import shutil
import sys

import pytest
import sentencepiece as spm
import torch
from hf_helpers import VOCAB, random_model, small_config
from run_helpers import REPO, ratpt
from transformers import AutoModelForCausalLM, AutoTokenizer

import ratpt as ratpt_lib
from data_prep.train_tokenizer import train_bpe
from ratpt.checkpoint import load_checkpoint
from ratpt.config import load_config
from ratpt.data.tokenizer import load_tokenizer
from ratpt.generate import generate as ratpt_generate
from ratpt.hf.convert import read_hf_folder
from ratpt.hf.export import export_hf
from ratpt.model import build_model
from ratpt.model.pretrained import save_pretrained

sys.path.insert(0, str(REPO / "tests" / "data"))
from data_helpers import make_documents  # noqa: E402

TEXTS = ["Hello, wörld! def f(x):\n    return x ** 2  # ünïcode ✓", " leading space", "a  b\n\n\tc ", "日本語 テスト"]


def load_hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_documents(200, seed=1) + TEXTS * 20))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A hybrid model exported with the byte tokenizer."""
    model = random_model(small_config(["rat", "swa", "attention", "rnn"]))
    folder = export_hf(model, model.cfg, tmp_path_factory.mktemp("hf") / "model", "byte")
    return model, folder


def test_transformers_loads_the_folder_and_gives_ratpt_logits(exported):
    model, folder = exported
    hf_model = load_hf(folder)
    assert type(hf_model).__module__.startswith("transformers_modules")  # the folder's code, not ratpt's
    tokens = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-6, atol=1e-6)


def test_generate_from_text_equals_ratpt_generate(exported):
    model, folder = exported
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "The for statement"
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids.input_ids[0].tolist() == load_tokenizer("byte").encode(prompt)
    out = load_hf(folder).generate(**ids, max_new_tokens=12, do_sample=False)
    expected = ratpt_generate(model, [ids.input_ids[0].tolist()], 12, eos_id=256)[0]
    assert out[0, ids.input_ids.shape[1]:].tolist()[:len(expected)] == expected


def test_save_load_save_is_byte_stable(exported, tmp_path):
    _, folder = exported
    load_hf(folder).save_pretrained(tmp_path / "again")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "again")
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir())
    assert {"config.json", "model.safetensors", "modeling_rat.py", "tokenizer.json"} <= set(files)
    for name in files:
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


@pytest.mark.parametrize("key, value, message", [("n_layers", 5, "missing_keys"), ("ngroups", 1, "size mismatch")])
def test_a_config_that_does_not_fit_the_weights_is_an_error(exported, tmp_path, key, value, message):
    _, folder = exported
    broken = shutil.copytree(folder, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(ValueError, match=f"do not fit config.json.*{message}"):
        load_hf(broken)
    done = ratpt("convert", "hf", str(broken), "--out", str(tmp_path / "back"))
    assert done.returncode == 2 and "does not match" in done.stderr


@pytest.mark.parametrize("text, message", [
    ('{"model_type": "rat",', "config.json is not a JSON file (Expecting property name"),
    ("[1, 2]", "config.json: model_type is None, not 'rat'"),
    ({"n_layers": "four"}, "config.json: model.n_layers: Value 'four' of type 'str' could not be converted"),
    ({"head_dim": 0}, "config.json: model.head_dim must be >= 1, got 0"),
], ids=["not-json", "a-list", "wrong-type", "out-of-range"])
def test_a_broken_config_json_is_one_error_naming_the_file(exported, tmp_path, text, message):
    """`ratpt convert hf` and `ratpt evaluate` read config.json as data: a ValueError naming it, never a
    TypeError or AttributeError from deep inside."""
    _, folder = exported
    broken = shutil.copytree(folder, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(text if isinstance(text, str) else json.dumps(config | text))
    with pytest.raises(ValueError, match=re.escape(f"{broken}/{message}")):
        read_hf_folder(broken)


def test_each_format_given_for_the_other_is_named_with_the_command_that_reads_it(exported, tmp_path):
    model, folder = exported
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder} is a Hugging Face folder (config.json); "
                                                          f"`ratpt convert hf {folder} --out DIR`")):
        ratpt_lib.load_pretrained(folder)  # what `ratpt generate` and `ratpt export-hf` load
    save_pretrained(model, model.cfg, tmp_path / "ratpt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'ratpt'} is a ratpt pretrained folder "
                                                          f"(config.yaml) already")):
        read_hf_folder(tmp_path / "ratpt")  # what `ratpt convert hf` reads


def sentencepiece_file(corpus, tmp_path, **options):
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, **options)
    return tmp_path / "sp.model"


@pytest.mark.parametrize("kind", ["byte", "bpe", "sentencepiece", "sentencepiece-keep-spaces"])
def test_exported_tokenizers_give_ratpts_ids(kind, corpus, tmp_path):
    spec = {"byte": lambda: "byte",
            "bpe": lambda: train_bpe([str(corpus)], vocab_size=400, out=tmp_path / "bpe"),
            "sentencepiece": lambda: sentencepiece_file(corpus, tmp_path),
            "sentencepiece-keep-spaces": lambda: sentencepiece_file(corpus, tmp_path, remove_extra_whitespaces=False),
            }[kind]()
    cfg = small_config(["rat"], vocab_size=512)
    export_hf(build_model(cfg), cfg, tmp_path / "hf", spec)
    ours, theirs = load_tokenizer(spec), AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token_id == ours.eos_id
    for text in TEXTS + make_documents(10, seed=7):
        assert theirs(text).input_ids == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_convert_hf_gives_back_the_ratpt_model_and_tokenizer(exported, tmp_path):
    model, folder = exported
    done = ratpt("convert", "hf", str(folder), "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back, cfg = ratpt_lib.load_pretrained(tmp_path / "back")
    assert cfg == model.cfg
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    tokenizer = load_tokenizer(tmp_path / "back" / "tokenizer")
    assert tokenizer.eos_id == 256 and tokenizer.encode(TEXTS[0]) == list(TEXTS[0].encode())


def test_the_quickstart_model_exports_through_the_cli_and_loads_back(corpus, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    model = random_model(cfg)
    bpe = load_tokenizer(train_bpe([str(corpus)], vocab_size=cfg.vocab_size, out=tmp_path / "bpe"))
    tokenizer_dir = tmp_path / "bpe"  # as data_prep records it: the file and its identity
    (tokenizer_dir / "meta.json").write_text(json.dumps(bpe.identity()))
    save_pretrained(model, cfg, tmp_path / "export", tokenizer_dir=tokenizer_dir)
    done = ratpt("export-hf", str(tmp_path / "export"), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    tokens = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXTS[0]).input_ids])
    assert tokens[0].tolist() == bpe.encode(TEXTS[0])
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
    done = ratpt("export-hf", str(tmp_path / "export"), "--out", str(tmp_path / "hf"))
    assert done.returncode == 2 and "not empty" in done.stderr


def test_a_training_checkpoint_exports_to_hugging_face_with_the_trained_logits(trained_run, tmp_path):
    done = ratpt("export", str(trained_run), "--out", str(tmp_path / "hf"), "--format", "hf")
    assert done.returncode == 0, done.stderr
    trained = load_checkpoint(trained_run / "checkpoints")["model"]
    model = build_model(load_config(trained_run / "config.yaml").model)
    model.load_state_dict(trained)
    tokens = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXTS[0]).input_ids])
    assert tokens[0].tolist() == list(TEXTS[0].encode())  # the run's byte tokenizer, exported with it
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "hf")(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
