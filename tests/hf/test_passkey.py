"""The passkey harness itself: exact prompt lengths, the needle where it was asked, scoring that a copying
model passes and a guessing one fails, and the command's report."""
import json
import re

import pytest
from hf_helpers import random_model, small_config
from run_helpers import ratpt

from data_prep.train_tokenizer import train_bpe
from ratpt.data.tokenizer import load_tokenizer
from ratpt.hf.passkey import NEEDLE, PromptBuilder, haystack_text, run_passkey
from ratpt.model.pretrained import save_pretrained


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(haystack_text()[:200_000])
    return load_tokenizer(train_bpe([str(corpus)], vocab_size=600, out=corpus.parent / "bpe"))


@pytest.mark.parametrize("tokenizer_kind", ["byte", "bpe"])
@pytest.mark.parametrize("length", [300, 1000, 4096])
@pytest.mark.parametrize("depth", [0, 0.25, 0.5, 1])
def test_prompts_have_the_exact_length_and_the_needle_at_its_depth(tokenizer_kind, length, depth, bpe):
    tokenizer = load_tokenizer("byte") if tokenizer_kind == "byte" else bpe
    builder = PromptBuilder(tokenizer)
    prompt = builder.build(length, depth, "48151")
    needle = tokenizer.encode(NEEDLE.format(key="48151"))
    assert len(prompt.tokens) == length
    assert prompt.tokens[prompt.needle_start:prompt.needle_start + len(needle)] == needle
    haystack = length - len(builder.intro) - len(needle) - len(builder.question)
    assert prompt.needle_start - len(builder.intro) == round(depth * haystack)
    assert re.findall(r"\d{5}", tokenizer.decode(prompt.tokens)).count("48151") == 2  # twice in the needle, nowhere else


def test_a_prompt_too_short_for_the_question_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        PromptBuilder(load_tokenizer("byte")).build(50, 0.5, "12345")


def test_a_model_that_copies_the_key_gets_everything_right_and_a_guesser_nothing():
    tokenizer = load_tokenizer("byte")

    def copier(prompt, max_new_tokens):  # reads the key back from the prompt, as a perfect retriever would
        key = re.search(r"pass key is (\d+)", tokenizer.decode(prompt)).group(1)
        return tokenizer.encode(f" {key}. It was hidden in the text.")[:max_new_tokens]

    def guesser(prompt, max_new_tokens):
        return tokenizer.encode(" 12345.")

    lengths, depths = [512, 2048], [0, 0.5, 1]
    perfect = run_passkey(copier, tokenizer, lengths, depths, trials=3)
    assert all(value == 1.0 for row in perfect["accuracy"].values() for value in row.values())
    wrong = run_passkey(guesser, tokenizer, lengths, depths, trials=3)
    assert all(value == 0.0 for row in wrong["accuracy"].values() for value in row.values())
    assert len({record["key"] for record in perfect["records"]}) > 1


def test_evaluate_long_writes_the_accuracy_grid_and_heatmap(tmp_path):
    model = random_model(small_config(["rat", "swa"], vocab_size=257))
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "meta.json").write_text(json.dumps({"kind": "byte"}))
    save_pretrained(model, model.cfg, tmp_path / "model", tokenizer_dir=tokenizer)
    done = ratpt("evaluate-long", str(tmp_path / "model"), "--lengths", "256,600", "--depths", "0,1",
                 "--trials", "2", "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "report" / "passkey.json").read_text())
    assert set(results["accuracy"]) == {"256", "600"} and set(results["accuracy"]["600"]) == {"0.0", "1.0"}
    assert len(results["records"]) == 2 * 2 * 2
    assert (tmp_path / "report" / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
