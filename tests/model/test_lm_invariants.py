"""The invariants of the whole LM (docs/design.md#invariants), for every mixer and the hybrid."""
import dataclasses

import pytest
import torch

from ratpt.model import ModelConfig, build_model, validate_model_config

MIXER_PATTERNS = [["rat"], ["attention"], ["swa"], ["rnn"], ["rat", "swa"]]
PATTERN_IDS = ["rat", "attention", "swa", "rnn", "rat+swa"]


def tiny(mixers, L=4, G=2, window=3, ffn="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=2, head_dim=4, ngroups=G, chunk_size=L,
                      mixers=mixers, window=window, ffn=ffn, init_std=0.3)
    return build_model(cfg).double(), cfg


@pytest.mark.parametrize("T", [8, 11], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("L,G", [(1, 1), (3, 2), (4, 4)], ids=lambda v: str(v))
@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_perturbing_a_later_token_changes_no_earlier_output(mixers, L, G, T):
    model, _ = tiny(mixers, L=L, G=G)
    tokens = torch.randint(0, 37, (2, T))
    base = model(tokens)
    for t in (0, T // 2, T - 1):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 37
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-9


def decode_ragged(model, lengths, steps, capacity=None, seed=0):
    """Prefill prompts of `lengths` in one right-padded batch, then decode `steps` - 1 tokens each;
    return the sequences, the logits of every step [steps][B, vocab] and the cache (on the model's device)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    seqs = [torch.randint(0, 37, (n + steps,)) for n in lengths]
    prompts = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        prompts[b, :n] = seqs[b][:n]
    logits, cache = model.prefill(prompts.to(device), torch.tensor(lengths, device=device), capacity=capacity)
    stepwise = [logits]
    for s in range(steps - 1):
        step_tokens = torch.stack([seq[n + s] for seq, n in zip(seqs, lengths)]).to(device)
        stepwise.append(model.decode_step(step_tokens, cache))
    return seqs, stepwise, cache


def cache_tensors(cache):
    return [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)] + [cache.lengths]


@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("L", [1, 3, 4, 16], ids=lambda l: f"L{l}")  # 16: prompts shorter than a chunk
@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_prefill_then_decode_equals_full_forward_on_a_ragged_batch(mixers, L, static):
    """Prompts of lengths 1, 5 and 9 in one batch, then 8 decode steps each (crossing chunk
    boundaries and wrapping the sliding-window ring); static: a cache of exactly the final length."""
    model, _ = tiny(mixers, L=L)
    lengths, steps = [1, 5, 9], 8
    seqs, stepwise, _ = decode_ragged(model, lengths, steps, capacity=max(lengths) + steps - 1 if static else None)
    for b, n in enumerate(lengths):
        full = model(seqs[b][None])[0]
        for s in range(steps):
            torch.testing.assert_close(stepwise[s][b], full[n - 1 + s], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_static_cache_decodes_in_place_in_the_tensors_of_the_prefill(mixers):
    """What a CUDA graph needs: every decode step reads and writes the same storage."""
    model, _ = tiny(mixers, L=4)
    logits, cache = model.prefill(torch.randint(0, 37, (2, 6)), capacity=12)
    before = [(t.data_ptr(), t.shape) for t in cache_tensors(cache)]
    for _ in range(6):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache)
    assert [(t.data_ptr(), t.shape) for t in cache_tensors(cache)] == before
    assert cache.lengths.tolist() == [12, 12]


def test_static_cache_refuses_to_decode_past_its_capacity():
    model, _ = tiny(["rat", "swa"])
    _, cache = model.prefill(torch.randint(0, 37, (1, 5)), capacity=6)
    model.decode_step(torch.zeros(1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="capacity"):
        model.decode_step(torch.zeros(1, dtype=torch.long), cache)


@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_repeated_cache_decodes_every_copy_like_its_source(mixers):
    model, _ = tiny(mixers, L=4)
    prompts = torch.randint(0, 37, (2, 7))
    logits, cache = model.prefill(prompts, torch.tensor([7, 3]), capacity=12)
    copies = cache.repeat_interleave(3)
    tokens = torch.tensor([5, 9])
    torch.testing.assert_close(model.decode_step(tokens.repeat_interleave(3), copies),
                               model.decode_step(tokens, cache).repeat_interleave(3, 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,capacity,slots", [(12, None, 3), (13, 21, 6)], ids=["exact", "capacity"])
def test_rat_cache_holds_one_summary_slot_per_chunk_and_one_running_state(T, capacity, slots):
    """T / L summaries (docs/design.md#invariants), or one slot per chunk of the capacity, the last maybe partial."""
    model, cfg = tiny(["rat"], L=4)
    _, cache = model.prefill(torch.randint(0, 37, (1, T)), capacity=capacity)
    layer = cache.layers[0]
    assert layer.summary_k.shape == layer.summary_v.shape == (1, 4, slots, 4)  # [B, H, slots, d]
    assert layer.running_k.shape == layer.running_v.shape == (1, 16)


def test_sliding_window_cache_keeps_only_the_window_and_the_token():
    model, cfg = tiny(["swa"], window=3)
    _, cache = model.prefill(torch.randint(0, 37, (2, 20)))
    for _ in range(5):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache)
    assert cache.layers[0].k.shape[2] == 3 + 1


@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("mixers", MIXER_PATTERNS, ids=PATTERN_IDS)
def test_gradients_reach_every_parameter(mixers, ffn):
    model, _ = tiny(mixers, ffn=ffn)
    tokens = torch.randint(0, 37, (2, 10))
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_forward_under_bf16_autocast_gives_bf16_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, d_model=16, n_layers=2, head_dim=4, chunk_size=4, mixers=["rat", "swa"], window=3,
                      init_std=0.3)  # logits of order 1, so that the bound below is about the layers, not the head
    model = build_model(cfg)
    tokens = torch.randint(0, 37, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 10, 37)
    want = model(tokens)
    # bf16 keeps 8 bits of mantissa: a few roundings per layer stay well inside 2% of the logits' norm
    assert (logits.float() - want).norm() <= 2e-2 * want.norm()


def test_hidden_states_then_logits_equals_forward():
    model, _ = tiny(["rat", "swa"])
    tokens = torch.randint(0, 37, (2, 7))
    torch.testing.assert_close(model.logits(model.hidden_states(tokens)), model(tokens))


def test_parameter_names_are_the_stable_public_layout():
    model, _ = tiny(["rat", "swa"])
    names = set(dict(model.named_parameters()))
    assert {"embedding.weight", "final_norm.weight", "layers.0.mixer.input_norm.weight",
            "layers.0.mixer.in_proj.weight", "layers.0.mixer.gate_bias", "layers.0.mixer.out_proj.weight",
            "layers.1.mixer.in_proj.weight", "layers.0.ffn_norm.weight", "layers.0.ffn.fc1.weight",
            "layers.0.ffn.fc2.weight"} <= names
    assert "layers.1.mixer.gate_bias" not in names


@pytest.mark.parametrize("change,field", [
    ({"d_model": 30}, "head_dim"),
    ({"ngroups": 3}, "ngroups"),
    ({"mixers": ["rat", "mamba"]}, "mixers"),
    ({"mixers": []}, "mixers"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"window": 0}, "window"),
    ({"ffn": "relu"}, "ffn"),
    ({"head_dim": 5, "d_model": 20}, "head_dim"),
], ids=["d_model%head_dim", "heads%ngroups", "unknown-mixer", "no-mixer", "chunk_size", "window", "ffn", "odd-head_dim"])
def test_invalid_config_names_the_field(change, field):
    cfg = ModelConfig(**{"d_model": 32, "head_dim": 8, "ngroups": 2, **change})
    with pytest.raises(ValueError, match=field):
        validate_model_config(cfg)


def test_prefill_and_decode_on_the_kernels_equal_the_reference_full_forward():
    """The RAT layers' prefill and decode through the Triton kernels (fp32; the interpreter on CPU, compiled
    on a GPU machine): the cache they hand each other continues the sequence exactly as the reference
    model's full forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, d_model=64, n_layers=2, head_dim=32, ngroups=2, chunk_size=4,
                      mixers=["rat"], init_std=0.3)
    reference = build_model(cfg).eval()
    kernel_model = build_model(dataclasses.replace(cfg, kernels="triton")).eval()
    kernel_model.load_state_dict(reference.state_dict())
    kernel_model.to("cuda" if torch.cuda.is_available() else "cpu")
    lengths, steps = [9, 4], 6
    seqs, stepwise, _ = decode_ragged(kernel_model, lengths, steps, capacity=max(lengths) + steps - 1)
    with torch.no_grad():
        for b, n in enumerate(lengths):
            full = reference(seqs[b][None])[0]
            for s in range(steps):
                torch.testing.assert_close(stepwise[s][b].cpu(), full[n - 1 + s], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixers", [["rat"], ["rat", "swa"]], ids=["rat", "rat+swa"])
def test_forward_with_labels_is_the_summed_loss_of_the_logits_with_the_same_gradients(mixers):
    model, _ = tiny(mixers)
    tokens = torch.randint(0, 37, (2, 11))
    labels = torch.randint(0, 37, (2, 11))
    labels[0, :3] = -100
    fused = model(tokens, labels=labels)
    grads = torch.autograd.grad(fused, list(model.parameters()))
    want64 = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    want_grads = torch.autograd.grad(want64, list(model.parameters()))
    torch.testing.assert_close(fused, want64, rtol=1e-12, atol=0)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
