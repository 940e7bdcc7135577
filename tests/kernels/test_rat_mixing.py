"""The fused Triton RAT mixing against the PyTorch reference ops: output and every gradient.

On CPU the kernels run in the Triton interpreter (tests/kernels/conftest.py), in fp32, on
small shapes that still cross several query blocks and summary blocks (the interpreter uses
16-row blocks), partial final chunks, T < L, G in {1, 2, 4} and d in {32, 64, 128}.

Tolerance: both sides are compared with a float64 evaluation of the reference on the same
inputs. The kernels keep every reduction in fp32, so their error is a few fp32 ulps times the
reduction lengths here (<= 2·d products, <= T/L summaries, <= L recurrence steps): below 1e-5
for these O(1) values; 1e-4 leaves room without hiding a wrong term (a wrong term is O(1)).
"""
import pytest
import torch

from ratpt_kernels import rat_mixing
from ratpt import ops
from ratpt.ops.rat_mixing import use_triton

ROPE_BASE = 10000.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine the same tests run compiled


def make_inputs(B, T, H, G, d, dtype=torch.float32, device=DEVICE, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, G * d, dtype=dtype, device=device)
    k = torch.randn(B, T, G * d, dtype=dtype, device=device)
    v = torch.randn(B, T, H * d, dtype=dtype, device=device)
    f = torch.randn(B, T, H * d, dtype=dtype, device=device)
    bias = torch.randn(H * d, dtype=torch.float32, device=device)
    return [t.requires_grad_() for t in (q, k, v, f, bias)]


def projection_inputs(B, T, H, G, d, dtype=torch.float32, device=DEVICE, seed=0):
    """The layer's input projection [B, T, 3·H·d + 2·G·d] (z, v, f, q, k) and the gate bias, as leaves."""
    torch.manual_seed(seed)
    proj = torch.randn(B, T, 3 * H * d + 2 * G * d, dtype=dtype, device=device)
    bias = torch.randn(H * d, dtype=torch.float32, device=device)
    return [proj.requires_grad_(), bias.requires_grad_()]


NAMES = ["out", "dz", "dv", "df", "dq", "dk", "dgate_bias"]


def reference_mixing(proj, gate_bias, L, d, G, rope_base):
    return ops.rat_mixing(proj, gate_bias, L, d, G, rope_base, kernels="torch")


def output_and_grads(fn, inputs, w, L, d, G):
    """The gated output and the gradients of every column slice of the projection, and of the gate bias."""
    out = fn(*inputs, L, d, G, ROPE_BASE)
    dproj, dbias = torch.autograd.grad((out * w).sum(), inputs)
    return [out, *ops.split_projection(dproj, d, G), dbias]


CASES = {  # name: (B, T, H, G, d, L)
    "partial-last-chunk": (2, 37, 2, 1, 32, 4),
    "groups2-L8": (1, 33, 4, 2, 32, 8),
    "groups4-L8": (1, 17, 4, 4, 32, 8),
    "3-heads-per-group-L4": (1, 21, 6, 2, 32, 4),  # group sums over an odd number of heads
    "d64-L16": (1, 40, 2, 2, 64, 16),
    "d128-L8": (1, 24, 2, 1, 128, 8),
    "T-below-L": (2, 5, 2, 1, 32, 16),
    "many-summary-blocks-L4": (1, 96, 2, 1, 32, 4),
    "L1": (1, 19, 2, 1, 32, 1),
}


DETERMINISTIC_CASES = ("partial-last-chunk", "groups2-L8", "many-summary-blocks-L4")


@pytest.mark.parametrize("shape,deterministic",
                         [(shape, False) for shape in CASES.values()]
                         + [(CASES[name], True) for name in DETERMINISTIC_CASES],
                         ids=[*CASES, *(f"{name}-deterministic" for name in DETERMINISTIC_CASES)],
                         indirect=["deterministic"])
def test_triton_mixing_equals_reference_output_and_gradients(shape, deterministic):
    B, T, H, G, d, L = shape
    inputs = projection_inputs(B, T, H, G, d)
    w = torch.randn(B, T, H * d, device=DEVICE)
    got = output_and_grads(rat_mixing, inputs, w, L, d, G)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want = output_and_grads(reference_mixing, wide, w.double(), L, d, G)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dispatch_picks_reference_on_cpu_and_rejects_unknown_backends(monkeypatch):
    v = torch.zeros(1, 4, 8)
    assert not use_triton("auto", v, 16, 64)
    assert not use_triton("torch", v, 16, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # on CPU tensors only in the interpreter (also on a CUDA machine)
    assert use_triton("triton", v, 16, 64)
    if torch.cuda.is_available():
        assert use_triton("auto", v.cuda(), 16, 64) and not use_triton("auto", v.cuda().double(), 16, 64)
    with pytest.raises(ValueError, match="power of two"):
        use_triton("triton", v, 12, 64)
    with pytest.raises(ValueError, match="kernels must be"):
        use_triton("cuda", v, 16, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need the tensors on a CUDA GPU"):
        use_triton("triton", v, 16, 64)


def twin_rat_layers() -> dict:
    """A RAT layer on the reference ops ("torch") and one on the kernels ("triton"), same weights."""
    from ratpt.model.config import ModelConfig
    from ratpt.model.rat import RATMixer

    layers = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layers[kernels] = RATMixer(ModelConfig(d_model=64, head_dim=32, ngroups=2, chunk_size=4, kernels=kernels))
        layers[kernels].reset_gate_bias()
        layers[kernels].to(DEVICE)
    return layers


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_rat_layer_with_triton_kernels_equals_torch_reference(compiled):
    # compiled: the kernels are torch.library custom ops, so the whole layer compiles as one graph
    # (fullgraph raises on a graph break) and its output and gradients stay the reference's
    layers = twin_rat_layers()
    kernel_layer = torch.compile(layers["triton"], fullgraph=True) if compiled else layers["triton"]
    x = torch.randn(2, 13, 64, requires_grad=True, device=DEVICE)
    w = torch.randn_like(x)
    got, want = kernel_layer(x), layers["torch"](x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    got_grads = torch.autograd.grad((got * w).sum(), [x, *layers["triton"].parameters()])
    want_grads = torch.autograd.grad((want * w).sum(), [x, *layers["torch"].parameters()])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def block_reference(q, k, v, f, gate_bias, prior, later, first_chunk, L, d, rope_base):
    """One block of a longer sequence, from the reference ops: its chunks are first_chunk, first_chunk + 1, ...
    of the sequence; `prior` / `later` (Ks, Vs of the chunks before / after it, rotated) are leaves.
    Returns y, the block's own summaries Ks, Vs, and the whole sequence's summary buffer it attends to."""
    from ratpt import ops

    B, T, D = v.shape
    H, G = D // d, q.shape[-1] // d
    g = torch.sigmoid(f + gate_bias)
    k_state = ops.chunk_scan(k.repeat(1, 1, H // G), g, L)
    v_state = ops.chunk_scan(v, g, L)
    chunk = first_chunk + torch.arange(T, device=v.device) // L
    cos, sin = ops.rope_cos_sin(chunk, d, rope_base, v.dtype)

    def heads(t):
        return t.reshape(B, T, H, d).transpose(1, 2)

    q_rot = ops.apply_rope(heads(q.repeat(1, 1, H // G)), cos, sin)
    k_rot, v_heads = ops.apply_rope(heads(k_state), cos, sin), heads(v_state)
    ends = torch.arange(T // L, device=v.device) * L + L - 1
    own_k, own_v = k_rot[:, :, ends], v_heads[:, :, ends]
    ks = torch.cat((prior[0], own_k, later[0]), dim=2)
    vs = torch.cat((prior[1], own_v, later[1]), dim=2)
    visible = torch.arange(ks.shape[2], device=v.device) < chunk.unsqueeze(-1)
    inter = torch.matmul(q_rot, ks.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    scores = torch.cat((inter, (q_rot * k_rot).sum(-1, keepdim=True)), dim=-1) / d ** 0.5
    p = torch.softmax(scores, dim=-1)
    y = torch.matmul(p[..., :-1], vs) + p[..., -1:] * v_heads
    return y.transpose(1, 2).reshape(B, T, D), own_k, own_v, (ks, vs)


@pytest.mark.parametrize("first_chunk,deterministic", [(0, False), (3, False), (5, False), (3, True)],
                         ids=["first-chunk-0", "first-chunk-3", "first-chunk-5", "first-chunk-3-deterministic"],
                         indirect=["deterministic"])
def test_a_block_with_the_sequences_summaries_and_its_chunk_offset_equals_reference(first_chunk, deterministic):
    # context parallelism runs the kernels' phases on one block of a sequence: its states, then the
    # attention over the whole sequence's summaries, then the summary gradients (reduced across ranks
    # in between) and the input gradients; each phase equals the float64 reference of that block
    from ratpt_kernels.rat_bwd import input_gradients, summary_gradients
    from ratpt_kernels.rat_fwd import rat_states, summary_attention

    B, H, G, d, L, T = 2, 2, 2, 32, 4, 20  # 5 chunks in the block; 2 later chunks in the sequence
    inputs = make_inputs(B, T, H, G, d)
    offset = torch.full((B,), first_chunk, dtype=torch.int32, device=DEVICE)
    torch.manual_seed(1)
    prior = [torch.randn(B, H, first_chunk, d, device=DEVICE) for _ in range(2)]
    later = [torch.randn(B, H, 2, d, device=DEVICE) for _ in range(2)]
    wide = [t.detach().double().requires_grad_() for t in (*inputs, *prior)]
    y_ref, own_k, own_v, buffer = block_reference(*wide[:5], wide[5:], [t.double() for t in later], first_chunk,
                                                  L, d, ROPE_BASE)
    w = torch.randn(B, T, H * d, device=DEVICE)
    q, k, v, f, bias = inputs
    kst, vst, ks_own, vs_own = rat_states(k, v, f, bias, L, d, ROPE_BASE, chunk_offset=offset)
    torch.testing.assert_close(ks_own.double(), own_k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vs_own.double(), own_v, rtol=1e-4, atol=1e-4)
    ks, vs = (torch.cat((p, o, t), dim=2) for p, o, t in zip(prior, (ks_own, vs_own), later))
    y, lse = summary_attention(q, kst, vst, ks, vs, L, d, ROPE_BASE, chunk_offset=offset)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)

    want = torch.autograd.grad((y_ref * w.double()).sum(), wide)
    dks, dvs, reused = summary_gradients(w, q, y, lse, ks, vs, L, d, ROPE_BASE, chunk_offset=offset)
    own = slice(first_chunk, first_chunk + T // L)
    got = input_gradients(q, k, v, f, bias, lse, ks, vs, reused, dks[:, :, own], dvs[:, :, own], L, d, ROPE_BASE,
                          chunk_offset=offset)
    names = ["dq", "dk", "dv", "df", "dgate_bias", "d prior Ks", "d prior Vs"]
    for name, a, b in zip(names, [*got, dks[:, :, :first_chunk], dvs[:, :, :first_chunk]], want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert not dks[:, :, own.stop:].any() and not dvs[:, :, own.stop:].any()  # later chunks are invisible


@pytest.mark.parametrize("T,L,lengths", [(37, 8, [37, 16, 1]), (5, 8, [5, 3])],
                         ids=["ragged-ends-in-and-at-chunks", "T-below-L"])
def test_prefill_on_the_kernels_equals_reference_output_and_cache(T, L, lengths):
    # y, the summaries of every complete chunk (rotated), and the running states at each sequence's
    # last prompt token (mid-chunk, at a chunk end, the first token), against float64
    from ratpt_kernels import rat_prefill
    from ratpt.ops import rat_prefill_reference

    inputs = [t.detach() for t in make_inputs(len(lengths), T, 4, 2, 32)]
    positions = torch.tensor(lengths, device=DEVICE)
    got = rat_prefill(*inputs, positions, L, 32, ROPE_BASE)
    want = rat_prefill_reference(*(t.double() for t in inputs), positions, L, 32, ROPE_BASE)
    assert got[1].shape == want[1].shape == (len(lengths), 4, T // L, 32)
    for name, a, b in zip(("y", "Ks", "Vs", "running k", "running v"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
