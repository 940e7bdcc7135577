"""generate(): greedy equals repeated full forwards; batching, EOS, sampling controls, CLI."""
import argparse
import json

import pytest
import torch

from ratpt.data.tokenizer import load_tokenizer
from ratpt.decoder import GraphedDecodeStep
from ratpt.generate import generate, run, sample_next
from ratpt.model import ModelConfig, build_model
from ratpt.model.pretrained import save_pretrained


def tiny_model(mixers=("rat", "swa"), vocab=37, head_dim=4, kernels="auto"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=4 * head_dim, n_layers=2, head_dim=head_dim, chunk_size=4,
                      mixers=list(mixers), window=3, init_std=0.5, kernels=kernels)
    return build_model(cfg).eval(), cfg


def greedy_by_full_forward(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(model(torch.tensor([tokens], device=next(model.parameters()).device))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("mixers", [("rat",), ("attention",), ("rnn",), ("rat", "swa")], ids="+".join)
def test_greedy_batch_equals_one_prompt_at_a_time_full_forward(mixers):
    model, _ = tiny_model(mixers)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
    out = generate(model, prompts, max_new_tokens=9)
    assert out == [greedy_by_full_forward(model, p, 9) for p in prompts]


def test_greedy_with_the_length_aware_attention_decode_kernel_equals_full_forward():
    """Attention and the window's ring decode through the Triton kernel (the interpreter on CPU)."""
    model, _ = tiny_model(("attention", "swa"), head_dim=32, kernels="triton")
    prompts = [[5], [7, 8, 9, 10, 11, 12]]  # the window's ring (4 slots) fills during the decode and after the prefill
    assert generate(model, prompts, max_new_tokens=6) == [greedy_by_full_forward(model, p, 6) for p in prompts]


def test_generation_stops_at_eos_and_keeps_it():
    model, _ = tiny_model()
    free = generate(model, [[1, 2, 3], [4]], max_new_tokens=8)
    eos = free[0][2]
    stopped = generate(model, [[1, 2, 3], [4]], max_new_tokens=8, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    assert len(stopped[1]) <= 8


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model, _ = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 10, temperature=1.0, seed=3)
    assert a == generate(model, prompts, 10, temperature=1.0, seed=3)
    assert generate(model, prompts, 10, temperature=1.0, top_k=1, seed=7) == generate(model, prompts, 10)
    assert generate(model, prompts, 10, temperature=1.0, top_p=1e-6, seed=7) == generate(model, prompts, 10)


def test_a_temperature_near_zero_samples_the_top_token_rather_than_failing_on_overflow():
    logits = torch.tensor([[3.0, 9.5, -2.0, 9.0], [-40.0, -41.0, -45.0, -60.0]])
    for temperature in (1e-45, 1e-30):  # logits / temperature overflow float32
        assert sample_next(logits, temperature=temperature).tolist() == [1, 0]


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.66, 0.24, 0.09, ...: top_p 0.8 keeps tokens 0 and 1
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).tolist()) == {0, 1}


def test_top_p_zero_keeps_the_top_token():
    logits = torch.tensor([[4.0, 3.0, 2.0], [0.0, 5.0, 1.0]])
    assert sample_next(logits, 1.0, top_p=0.0).tolist() == [0, 1]


def cli_args(model_dir, **flags) -> argparse.Namespace:
    defaults = dict(model_dir=str(model_dir), prompt=["hello", "a"], prompts=None, batch_size=32, out=None,
                    max_new_tokens=5, temperature=0.0, top_k=0, top_p=1.0, seed=0, device="cpu", dtype="float32",
                    tokenizer="byte", cuda_graph=None, compile=False)
    return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.parametrize("flags, named", [
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": -1.0}, "--temperature"),
    ({"top_k": -2}, "--top-k"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
], ids=["no-new-tokens", "negative-temperature", "negative-top-k", "top-p-0", "top-p-above-1"])
def test_cli_rejects_meaningless_sampling_flags_naming_them(tmp_path, flags, named):
    with pytest.raises(ValueError, match=named):
        run(cli_args(tmp_path / "never-loaded", **flags))


def test_cli_rejects_a_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    model, cfg = tiny_model(vocab=37)
    save_pretrained(model, cfg, tmp_path / "m")
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        run(cli_args(tmp_path / "m"))  # the byte tokenizer has 257 tokens


def greedy_by_full_forwards(model, tokens: list[int], n: int, eos_id: int | None) -> list[int]:
    """The greedy continuation recomputed from scratch each token: no cache, no generate()."""
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([tokens + new]))[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
    return new


def test_cli_prints_the_greedy_continuation_and_tokens_per_second(tmp_path, capsys):
    model, cfg = tiny_model(vocab=257)
    save_pretrained(model, cfg, tmp_path / "m")
    assert run(cli_args(tmp_path / "m")) == 0
    printed = capsys.readouterr()
    tokenizer = load_tokenizer("byte")
    for prompt in ("hello", "a"):
        new = greedy_by_full_forwards(model.eval(), tokenizer.encode(prompt), 5, tokenizer.eos_id)
        assert prompt + tokenizer.decode(new) + "\n" in printed.out
    assert "start-up: load" in printed.err and "tokens/s" in printed.err


def test_cuda_graph_decode_needs_a_static_cache():
    model, _ = tiny_model()
    _, growing = model.prefill(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="capacity"):
        GraphedDecodeStep(model, growing)


@pytest.mark.gpu
@pytest.mark.parametrize("mixers", [("rat",), ("attention",), ("rnn",), ("rat", "swa")], ids="+".join)
def test_cuda_graph_generation_equals_eager_generation(mixers):
    """Replaying the captured decode step gives the eager step's tokens, past warmup and capture
    (head_dim 32: RAT decodes with the Triton kernel)."""
    model, _ = tiny_model(mixers, head_dim=32)
    model = model.cuda()
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]]
    eager = generate(model, prompts, max_new_tokens=12)
    assert generate(model, prompts, max_new_tokens=12, cuda_graph=True) == eager


@pytest.mark.gpu
@pytest.mark.parametrize("prompts", [[[1, 2, 3], [5], [7, 8, 9, 10, 11, 12]],
                                     [[1 + i, 2 * i + 3, 5] for i in range(8)] + [[7, 8, 9, 10, 11, 12]]],
                         ids=["3-prompts", "9-prompts"])
@pytest.mark.parametrize("mixers", [("rat",), ("attention",), ("rat", "swa")], ids="+".join)
def test_greedy_through_the_fused_decode_kernels_equals_full_forward_on_the_gpu(mixers, prompts):
    """With model.kernels=triton a decode step runs the Triton kernels throughout (head_dim 32): the fused
    norm, projections, activation, residuals and head (ops.decode_linear, at 3 prompts; at 9, past its
    FMA rows, cuBLAS) and the mixing; replayed as a CUDA graph, greedy decoding still gives the full
    forward's tokens."""
    model, _ = tiny_model(mixers, head_dim=32, kernels="triton")
    model = model.cuda()
    assert generate(model, prompts, max_new_tokens=12, cuda_graph=True) == [
        greedy_by_full_forward(model, p, 12) for p in prompts]


def test_cli_refuses_a_tokenizer_other_than_the_one_the_model_was_exported_with(tmp_path):
    from data_prep.train_tokenizer import train_bpe

    (tmp_path / "corpus.txt").write_text("the model was trained on these words, and on these words only. " * 20)
    bpe = train_bpe([str(tmp_path / "corpus.txt")], vocab_size=300, out=tmp_path / "bpe")
    model, cfg = tiny_model(vocab=300)
    save_pretrained(model, cfg, tmp_path / "m", tokenizer_dir=bpe.parent)
    with pytest.raises(ValueError, match=r"--tokenizer byte.*not the tokenizer .* exported with.*leave out --tokenizer"):
        run(cli_args(tmp_path / "m", tokenizer="byte"))
    assert run(cli_args(tmp_path / "m", tokenizer=str(bpe))) == 0  # the same tokenizer, named by its file


def test_cli_on_an_export_without_a_tokenizer_asks_for_one(tmp_path):
    model, cfg = tiny_model(vocab=257)
    save_pretrained(model, cfg, tmp_path / "m")  # as `ratpt export --no-tokenizer` writes it
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'm'} has no tokenizer/ folder .*--tokenizer byte"):
        run(cli_args(tmp_path / "m", tokenizer=None))
    assert run(cli_args(tmp_path / "m", tokenizer="byte")) == 0


def test_cli_rejects_an_unknown_device_naming_the_flag(tmp_path):
    model, cfg = tiny_model(vocab=257)
    save_pretrained(model, cfg, tmp_path / "m")
    with pytest.raises(ValueError, match="--device 'banana' is not a device"):
        run(cli_args(tmp_path / "m", device="banana"))


@pytest.mark.parametrize("where", ["run", "run/checkpoints", "run/checkpoints/step_00000002"])
def test_cli_pointed_at_a_run_or_its_checkpoints_says_to_export_first(tmp_path, where):
    """Named as a run, not as a folder without a tokenizer (the tokenizer was looked up first before)."""
    (tmp_path / "run" / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "state.pt").touch()
    with pytest.raises(FileNotFoundError, match=r"is a training run or checkpoint; .*`ratpt export "):
        run(cli_args(tmp_path / where, tokenizer=None))  # the default: the folder's own tokenizer


def test_cli_writes_one_jsonl_record_per_prompt_of_a_file_in_batches(tmp_path):
    model, cfg = tiny_model(vocab=257)
    save_pretrained(model, cfg, tmp_path / "m")
    (tmp_path / "prompts.JSONL").write_text(  # the suffix in any case
        '{"prompt": "hello", "id": 7}\n\n{"prompt": "a"}\n{"prompt": "to be"}\n')
    assert run(cli_args(tmp_path / "m", prompt=None, prompts=str(tmp_path / "prompts.JSONL"), batch_size=2,
                        out=str(tmp_path / "out.jsonl"))) == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer("byte")
    assert [(r["prompt"], r.get("id")) for r in records] == [("hello", 7), ("a", None), ("to be", None)]
    for record in records:
        new = greedy_by_full_forwards(model.eval(), tokenizer.encode(record["prompt"]), 5, tokenizer.eos_id)
        assert record["completion"] == tokenizer.decode(new)


def test_an_interrupted_run_leaves_no_half_output_and_the_earlier_file_as_it_was(tmp_path, monkeypatch):
    """Ctrl-C (or any failure) in the second of three batches: --out keeps what it held, nothing is half written."""
    model, cfg = tiny_model(vocab=257)
    save_pretrained(model, cfg, tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "out.jsonl").write_text('{"prompt": "earlier run"}\n')
    batches = []

    def interrupted_on_the_second_batch(*args, **kwargs):
        batches.append(args[1])
        if len(batches) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr("ratpt.generate.generate", interrupted_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run(cli_args(tmp_path / "m", prompt=None, prompts=str(tmp_path / "prompts.txt"), batch_size=1,
                     out=str(tmp_path / "out.jsonl")))
    assert (tmp_path / "out.jsonl").read_text() == '{"prompt": "earlier run"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.jsonl", "prompts.txt"]


@pytest.mark.parametrize("name, text, error", [
    ("missing.txt", None, "no such file"),
    (".", None, "a folder, not a file"),
    ("blank.txt", "\n  \n", "holds no prompt"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', "line 2: not JSON"),
    ("no-prompt.jsonl", '{"text": "a"}\n', 'line 1: no "prompt" string'),
    ("latin1.txt", "hello\ncaf\xe9\n".encode("latin-1"), "line 2: not UTF-8 .byte 0xe9.; save the file as UTF-8"),
    ("records.json", 'hello\n {"prompt": "a", "id": 1}\n',
     r'line 2 is a JSON object with a "prompt" field, but only a \.jsonl file .*: rename it to records\.jsonl'),
], ids=["missing", "a-folder", "empty", "bad-json-line", "no-prompt-field", "not-utf8",
        "jsonl-records-not-named-jsonl"])
def test_cli_rejects_a_bad_prompt_file_naming_file_and_line(tmp_path, name, text, error):
    if isinstance(text, bytes):
        (tmp_path / name).write_bytes(text)
    elif text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=f"--prompts {tmp_path / name}.*{error}"):
        run(cli_args(tmp_path / "never-loaded", prompt=None, prompts=str(tmp_path / name)))


@pytest.mark.parametrize("out, error", [
    ("missing-folder/out.jsonl", "the folder .*missing-folder does not exist"),
    (".", "is a folder: name the file to write in it"),
    ("prompts.txt", "is the --prompts file: writing the outputs would overwrite the prompts"),
], ids=["folder-missing", "a-folder", "the-prompt-file"])
def test_cli_rejects_an_unwritable_out_before_loading_the_model(tmp_path, out, error):
    """The model folder does not exist: the --out check must come first, before any load or capture."""
    (tmp_path / "prompts.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=f"--out .*{error}"):
        run(cli_args(tmp_path / "never-loaded", prompt=None, prompts=str(tmp_path / "prompts.txt"),
                     out=str(tmp_path / out)))
    assert (tmp_path / "prompts.txt").read_text() == "hello\n"
