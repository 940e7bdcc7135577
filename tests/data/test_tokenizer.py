"""Tokenizers: round trips, EOS, identity, and loading from a data_prep tokenizer folder."""
import json
import re
import shutil
from pathlib import Path

import pytest
from data_helpers import make_documents

from data_prep.train_tokenizer import train_bpe
from ratpt.data.tokenizer import ByteTokenizer, load_tokenizer

TEXT = "Hello, wörld! def f(x):\n    return x ** 2  # ünïcode ✓"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text("\n".join(make_documents(200, seed=1) + [TEXT] * 20))
    return path


@pytest.fixture(scope="module")
def sentencepiece_model(corpus_file: Path) -> Path:
    import sentencepiece as spm

    prefix = corpus_file.parent / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus_file), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, minloglevel=2,
    )
    return prefix.with_suffix(".model")


def test_byte_tokenizer_maps_utf8_bytes_and_eos_256():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode([104, 105, 256, 104]) == "hi<|endoftext|>h"


def test_trained_bpe_round_trips_and_has_eos(corpus_file, tmp_path):
    path = train_bpe([str(corpus_file)], vocab_size=400, out=tmp_path / "bpe")
    tok = load_tokenizer(path)
    assert tok.kind == "hf" and tok.vocab_size == 400 and tok.eos_id == 0
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "x"]) == [ids, tok.encode("x")]


def test_sentencepiece_round_trips_with_its_eos(sentencepiece_model):
    tok = load_tokenizer(sentencepiece_model)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400 and tok.eos_id == 2
    assert tok.decode(tok.encode("return x ** 2")) == "return x ** 2"
    assert "</s>" in tok.decode(tok.encode("a") + [tok.eos_id])


def test_identity_records_file_hash(sentencepiece_model):
    ident = load_tokenizer(sentencepiece_model).identity()
    assert ident["kind"] == "sentencepiece" and ident["file"] == "sp.model" and len(ident["sha256"]) == 64


def test_meta_folder_loads_the_recorded_tokenizer_and_rejects_a_changed_file(sentencepiece_model, tmp_path):
    tok = load_tokenizer(sentencepiece_model)
    shutil.copy(sentencepiece_model, tmp_path / "sp.model")
    (tmp_path / "meta.json").write_text(json.dumps(tok.identity()))
    assert load_tokenizer(tmp_path).encode(TEXT) == tok.encode(TEXT)
    (tmp_path / "sp.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sha256 differs"):
        load_tokenizer(tmp_path)


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="broken.json is not a Hugging Face tokenizers JSON file"):
        load_tokenizer(tmp_path / "broken.json")


@pytest.mark.parametrize("text, message", [
    ("{bad", "meta.json is not a JSON file (Expecting property name"), ("[1]", "meta.json: unknown tokenizer kind None"),
], ids=["not-json", "not-an-object"])
def test_a_damaged_meta_json_is_named(tmp_path, text, message):
    (tmp_path / "meta.json").write_text(text)
    with pytest.raises(ValueError, match="^" + re.escape(f"{tmp_path}/{message}")):
        load_tokenizer(tmp_path)
