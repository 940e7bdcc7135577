"""ratpt.decoder.Decoder: persistent per-bucket caches reused across prompt batches give the
tokens of the previous decode path (a fresh cache per batch, eager steps), on CPU; the CUDA
graphs and the compiled step on a GPU."""
import pytest
import torch

from ratpt.decoder import Decoder, compile_decode
from ratpt.generate import generate
from ratpt.model import ModelConfig, build_model

PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12], [4, 4], [30, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
BATCHES = [PROMPTS[:3], PROMPTS[3:], PROMPTS[:3], PROMPTS[4:]]  # buckets 4 (1 padding row), 2, 4 again, 1
NEW = 9


def tiny_model(mixers, head_dim=4, device="cpu", kernels="auto"):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, d_model=4 * head_dim, n_layers=2, head_dim=head_dim, chunk_size=4,
                      mixers=list(mixers), window=3, init_std=0.5, kernels=kernels)
    return build_model(cfg).to(device).eval()


@torch.no_grad()
def greedy_by_decode_steps(model, prompts, n):
    """The previous decode path: one prefill into a cache of this batch's own, then eager decode steps."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    logits, cache = model.prefill(tokens, lengths, capacity=tokens.shape[1] + n)
    new = [logits.argmax(-1)]
    for _ in range(n - 1):
        new.append(model.decode_step(new[-1], cache).argmax(-1))
    return torch.stack(new, 1).tolist()


def decoded_batches(model, decoder):
    return [generate(model, batch, NEW, decoder=decoder) for batch in BATCHES]


@pytest.mark.parametrize("mixers", [("rat",), ("attention",), ("rnn",), ("rat", "swa")], ids="+".join)
def test_a_decoder_reused_across_batches_gives_the_previous_paths_tokens(mixers):
    model = tiny_model(mixers)
    decoder = Decoder(model, capacity=24, cuda_graph=False)
    assert decoded_batches(model, decoder) == [greedy_by_decode_steps(model, batch, NEW) for batch in BATCHES]
    assert sorted(decoder.buckets) == [1, 2, 4]  # one persistent cache per bucket, reused


def test_a_prompt_past_the_decoders_capacity_is_refused():
    model = tiny_model(("rat",))
    with pytest.raises(ValueError, match="does not fit the decoder's capacity of 8 tokens"):
        generate(model, [[1, 2, 3]], 6, decoder=Decoder(model, capacity=8, cuda_graph=False))


@pytest.mark.gpu
@pytest.mark.parametrize("mixers, compiled, kernels", [(("rat", "swa"), False, "auto"), (("rat",), True, "auto"),
                                                       (("attention", "swa"), True, "auto"),
                                                       (("rat",), True, "triton")],
                         ids=["graphed", "compiled+graphed", "attention-compiled+graphed", "fused-compiled+graphed"])
def test_graphed_decoder_reused_across_batches_gives_the_eager_tokens(mixers, compiled, kernels):
    """head_dim 32: RAT and attention decode with their Triton kernels, custom ops inside the compiled step;
    with model.kernels=triton the linears too (ops.decode_linear)."""
    model = tiny_model(mixers, head_dim=32, device="cuda", kernels=kernels)
    eager = [greedy_by_decode_steps(model, batch, NEW) for batch in BATCHES]
    if compiled:
        compile_decode(model)
    assert decoded_batches(model, Decoder(model, capacity=24, cuda_graph=True)) == eager
