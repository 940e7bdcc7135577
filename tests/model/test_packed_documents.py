"""Packed documents that do not see each other (docs/design.md#packed-documents): for every mixer and the
hybrid, a packed sequence's logits and gradients equal those of each document run alone (float64, CPU)."""
import pytest
import torch

from ratpt.model import ModelConfig, build_model

MIXER_PATTERNS = [["rat"], ["attention"], ["swa"], ["rnn"], ["rat", "swa"]]
PATTERN_IDS = ["rat", "attention", "swa", "rnn", "rat+swa"]
L, WINDOW, VOCAB = 4, 5, 37
# documents shorter than a chunk (3, 1), of exactly one (4), of several and a partial one (13), and a row
# whose documents are longer than the window; both rows hold 28 tokens
ROWS = [[3, 4, 1, 13, 7], [9, 19]]


def tiny(mixers):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=2, head_dim=4, ngroups=2, chunk_size=L,
                      mixers=mixers, window=WINDOW, init_std=0.3)
    return build_model(cfg).double()


def positions_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def logits_and_grads(model, run):
    """The logits `run` returns and the gradients of sum(logits · w) for fixed random w (every logit counts)."""
    model.zero_grad()
    logits = run()
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=logits.dtype)).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_packed_documents_give_the_logits_and_gradients_of_each_document_alone(mixers):
    model = tiny(mixers)
    tokens = torch.randint(0, VOCAB, (len(ROWS), 28), generator=torch.Generator().manual_seed(2))
    packed, packed_grads = logits_and_grads(model, lambda: model(tokens, positions=positions_of(ROWS)))

    def alone():
        rows = []
        for b, row in enumerate(ROWS):
            bounds = torch.tensor([0, *row]).cumsum(0).tolist()
            rows.append(torch.cat([model(tokens[b:b + 1, s:e]) for s, e in zip(bounds, bounds[1:])], dim=1))
        return torch.cat(rows)

    separate, separate_grads = logits_and_grads(model, alone)
    torch.testing.assert_close(packed, separate, rtol=1e-10, atol=1e-12)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_a_sequence_of_one_document_gives_exactly_the_unmasked_output(mixers):
    model = tiny(mixers)
    tokens = torch.randint(0, VOCAB, (2, 28))
    assert torch.equal(model(tokens, positions=positions_of([[28], [28]])), model(tokens))


def test_positions_that_do_not_start_a_document_are_refused():
    model = tiny(["rat"])
    with pytest.raises(ValueError, match="0 at every sequence's first token"):
        model(torch.zeros(1, 8, dtype=torch.long), positions=torch.arange(3, 11).unsqueeze(0))


def test_a_compiled_block_takes_other_documents_without_compiling_again():
    # the chunk table's width is rounded up (DocumentChunks), so batches of other documents share one graph
    from torch._dynamo.testing import CompileCounterWithBackend

    from ratpt.ops import separate_documents

    block = tiny(["rat"]).layers[0]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block.forward, dynamic=False, backend=counter)
    x = torch.randn(2, 28, 16, dtype=torch.float64)
    for rows in (ROWS, [[28], [5, 23]]):  # 9 and 8 chunks
        documents = separate_documents(positions_of(rows), L)
        torch.testing.assert_close(compiled(x, documents), block(x, documents), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
