"""`ratpt evaluate` through lm-evaluation-harness on local tasks: every score is ratpt's own."""
import json
from types import SimpleNamespace

import pytest
import torch
from hf_helpers import CHOICE_TASK, GENERATION_TASK, ROLLING_TASK, random_model, small_config, write_task
from run_helpers import ratpt

from ratpt.data.tokenizer import load_tokenizer
from ratpt.generate import generate
from ratpt.hf import lm_eval_model
from ratpt.hf.convert import load_model_dir
from ratpt.hf.lm_eval_model import RATPTLM, evaluate_tasks
from ratpt.model.pretrained import save_pretrained


def byte_logprob(model, context: str, continuation: str) -> float:
    """log p(continuation | context) from ratpt's logits over the byte tokens of one sequence."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    with torch.no_grad():
        logprobs = model(torch.tensor([ctx + cont])).float().log_softmax(-1)[0]
    return float(sum(logprobs[len(ctx) - 1 + i, token] for i, token in enumerate(cont)))


def copying_model():
    """Embedding-only RAT (mixers and FFNs zeroed): logits = RMSNorm(E[t])·Eᵀ, largest at t itself in 256
    dimensions, so the model predicts its last byte again."""
    model = random_model(small_config(["rat"], d_model=256, head_dim=32, vocab_size=257))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                param.zero_()
            if name == "final_norm.weight":
                param.fill_(1.0)
    return model


def export_with_byte_tokenizer(model, folder):
    tokenizer = folder.parent / "byte_tokenizer"
    tokenizer.mkdir()
    (tokenizer / "meta.json").write_text(json.dumps({"kind": "byte"}))
    return save_pretrained(model, model.cfg, folder, tokenizer_dir=tokenizer)


def test_every_loglikelihood_is_ratpts_own(tmp_path):
    model = random_model(small_config(["rat", "swa", "rnn"], vocab_size=257))
    folder = export_with_byte_tokenizer(model, tmp_path / "model")
    docs = [{"context": "Question: what is two plus two? Answer:", "choices": [" four", " five", " twenty-two"], "label": 0},
            {"context": "The cat sat on the", "choices": [" mat", " hat"], "label": 1},
            {"context": "x", "choices": ["y", " a much longer continuation than the others"], "label": 0}]
    write_task(tmp_path, "toy_choice", CHOICE_TASK, docs)
    results = evaluate_tasks(folder, ["toy_choice"], batch_size=2, include_path=str(tmp_path), log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"]["toy_choice"], key=lambda s: s["doc_id"])
    for doc, sample in zip(docs, samples):
        got = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [byte_logprob(model, doc["context"], choice) for choice in doc["choices"]]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_rolling_loglikelihood_sums_the_documents_tokens_after_eos(tmp_path):
    model = random_model(small_config(["rat"], vocab_size=257))
    folder = export_with_byte_tokenizer(model, tmp_path / "model")
    text = "A short document about chunked recurrences."
    write_task(tmp_path, "toy_rolling", ROLLING_TASK, [{"text": text}])
    results = evaluate_tasks(folder, ["toy_rolling"], include_path=str(tmp_path), log_samples=True, bootstrap_iters=0)
    got = float(results["samples"]["toy_rolling"][0]["resps"][0][0])
    tokens = [256] + list(text.encode())
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]])).log_softmax(-1)[0]
    assert got == pytest.approx(float(logprobs.gather(-1, torch.tensor(tokens[1:])[:, None]).sum()), rel=1e-5)


def test_a_model_that_repeats_its_last_byte_scores_full_marks_through_the_cli(tmp_path):
    folder = export_with_byte_tokenizer(copying_model(), tmp_path / "model")
    choices = [{"context": f"{word}", "choices": [word[-1] * 4, "abab"[:3] + "c"], "label": 0}
               for word in ("xyzz", "qqq", "hello")]
    choices += [{"context": "mmm", "choices": ["abcd", "mmmm"], "label": 1}]
    write_task(tmp_path, "repeat_choice", CHOICE_TASK, choices)
    write_task(tmp_path, "repeat_gen", GENERATION_TASK,
               [{"context": f"say {c}", "answer": c * 5} for c in "abcxyz"])
    out = tmp_path / "results.json"
    done = ratpt("evaluate", str(folder), "--tasks", "repeat_choice,repeat_gen", "--include-path", str(tmp_path),
                 "--batch-size", "3", "--bootstrap-iters", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["repeat_choice"]["acc,none"] == 1.0
    assert results["repeat_gen"]["exact_match,none"] == 1.0


def test_limit_evaluates_only_the_first_documents(tmp_path):
    folder = export_with_byte_tokenizer(copying_model(), tmp_path / "model")
    write_task(tmp_path, "limited", CHOICE_TASK, [{"context": "aa", "choices": ["a", "b"], "label": i % 2} for i in range(6)])
    results = evaluate_tasks(folder, ["limited"], limit=2, include_path=str(tmp_path), log_samples=True, bootstrap_iters=0)
    assert len(results["samples"]["limited"]) == 2


@pytest.mark.parametrize("max_new", [4, 6, 2], ids=["as-many-as-max-length", "more-than-max-length", "fewer"])
def test_a_generation_request_keeps_the_end_of_its_context_within_max_length(monkeypatch, max_new):
    """max_length 4: the prompt is the context's last max(4 - max_new, 1) tokens, never its whole or its middle."""
    prompts = []

    def recording(model, batch, *args, **kwargs):  # the real generate, noting the prompts it is given
        prompts.extend(batch)
        return generate(model, batch, *args, **kwargs)

    monkeypatch.setattr(lm_eval_model, "generate", recording)
    lm = RATPTLM(model=copying_model(), tokenizer=load_tokenizer("byte"), max_length=4)
    request = SimpleNamespace(args=("abcdefgh", {"until": ["."], "max_gen_toks": max_new}))
    lm.generate_until([request])
    assert prompts == [list(b"abcdefgh")[-max(4 - max_new, 1):]]


def test_a_folder_whose_tokenizer_outgrows_the_models_vocabulary_is_refused_naming_both(tmp_path):
    """What `ratpt evaluate` and `evaluate-long` load: the byte tokenizer's 257 ids against 100 embeddings would
    index past the embedding (an IndexError mid-evaluation, a device assert on a GPU)."""
    folder = export_with_byte_tokenizer(random_model(small_config(["rat"], vocab_size=100)), tmp_path / "model")
    with pytest.raises(ValueError, match=f"{folder}: the tokenizer has 257 tokens, more than the model's vocabulary "
                                         r"\(100\)"):
        load_model_dir(folder, "cpu")
