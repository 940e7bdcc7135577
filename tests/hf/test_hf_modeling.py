"""RATForCausalLM (the exported modeling code) against ratpt's own model: logits, padding, the cache, generate()."""
import re

import pytest
import torch
from hf_helpers import VOCAB, hf_model_of, random_model, small_config

from ratpt.generate import generate as ratpt_generate

MIXERS = {"rat": ["rat"], "attention": ["attention"], "swa": ["swa"], "rnn": ["rnn"], "rat+swa": ["rat", "swa"],
          "all": ["rat", "swa", "attention", "rnn"]}
T = 23  # not a multiple of the chunk size 4, longer than the window 5


@pytest.mark.parametrize("mixers", MIXERS.values(), ids=MIXERS.keys())
def test_logits_equal_ratpt_logits(mixers):
    model = random_model(small_config(mixers))
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        torch.testing.assert_close(hf_model_of(model)(tokens).logits, model(tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_each_sequence_its_own_logits(side):
    model = random_model(small_config(["rat", "swa"]))
    long, short = torch.randint(0, VOCAB, (T,)), torch.randint(0, VOCAB, (9,))
    pad = torch.zeros(T - 9, dtype=torch.long)
    padded = torch.cat((pad, short)) if side == "left" else torch.cat((short, pad))
    mask = torch.cat((torch.zeros(T - 9), torch.ones(9))) if side == "left" else torch.cat((torch.ones(9), torch.zeros(T - 9)))
    with torch.no_grad():
        logits = hf_model_of(model)(torch.stack((long, padded)), attention_mask=torch.stack((torch.ones(T), mask))).logits
        real = logits[1, T - 9:] if side == "left" else logits[1, :9]
        torch.testing.assert_close(logits[0], model(long[None])[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(real, model(short[None])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mixers", [MIXERS["rat"], MIXERS["all"]], ids=["rat", "all"])
def test_cached_decoding_equals_full_forwards(mixers):
    model = random_model(small_config(mixers))
    hf_model = hf_model_of(model)
    tokens = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        out = hf_model(tokens[:, :5], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(5, 30):
            out = hf_model(tokens[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_generate_greedy_equals_ratpt_generate_for_prompts_of_different_lengths():
    model = random_model(small_config(["rat", "swa", "attention", "rnn"]))
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (T, 6)]
    expected = ratpt_generate(model, prompts, max_new_tokens=15)
    input_ids = torch.tensor([prompts[0], [0] * (T - 6) + prompts[1]])
    mask = torch.tensor([[1] * T, [0] * (T - 6) + [1] * 6])
    out = hf_model_of(model).generate(input_ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
    assert out[:, T:].tolist() == expected


def test_generate_feeds_one_token_per_step_after_the_prompt():
    model = random_model(small_config(["rat"]))
    hf_model = hf_model_of(model)
    shapes = []
    hf_model.model.embedding.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    hf_model.generate(torch.randint(0, VOCAB, (2, T)), attention_mask=torch.ones(2, T, dtype=torch.long),
                      max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert shapes == [(2, T)] + [(2,)] * 5


def test_the_cache_holds_one_summary_per_chunk_and_a_window_ring():
    cfg = small_config(["rat", "swa"])
    hf_model = hf_model_of(random_model(cfg))
    H, d, L = cfg.d_model // cfg.head_dim, cfg.head_dim, cfg.chunk_size
    sizes = {}
    with torch.no_grad():
        for length in (40, 400):
            out = hf_model(torch.randint(0, VOCAB, (1, length)), use_cache=True)
            cache = out.past_key_values
            rat, swa = cache.layers
            assert rat.summary_k.shape == rat.summary_v.shape == (1, H, -(-length // L), d)
            assert rat.running_k.shape == rat.running_v.shape == (1, cfg.d_model)
            assert swa.k.shape == swa.v.shape == (1, H, cfg.window + 1, d)
            sizes[length] = cache.nbytes()
    summary_bytes = 2 * H * d * 4  # one more chunk: a k and a v summary of every head, fp32
    assert sizes[400] - sizes[40] == (400 - 40) // L * summary_bytes


def test_beam_search_with_the_cache_equals_beam_search_without():
    hf_model = hf_model_of(random_model(small_config(["rat", "attention"])))
    prompt = torch.randint(0, VOCAB, (2, T))
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, num_beams=3, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
    assert torch.equal(hf_model.generate(prompt, use_cache=True, **kwargs),
                       hf_model.generate(prompt, use_cache=False, **kwargs))


def test_an_empty_transformers_cache_means_a_prefill_and_a_filled_one_is_an_error():
    from transformers import DynamicCache  # what transformers >= 5 hands the first forward of generate()

    from ratpt.hf.cache_rat import RATCache

    model = random_model(small_config(["rat", "swa"]))
    hf_model = hf_model_of(model)
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        out = hf_model(tokens, past_key_values=DynamicCache(), use_cache=True)
        torch.testing.assert_close(out.logits, model(tokens), rtol=1e-6, atol=1e-6)
        assert isinstance(out.past_key_values, RATCache)
        filled = DynamicCache()
        filled.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 0)
        with pytest.raises(ValueError, match="RATCache only"):
            hf_model(tokens, past_key_values=filled, use_cache=True)


@pytest.mark.parametrize("key, value", [("chunk_size", "16"), ("chunk_size", 16.0), ("n_layers", 4.0), ("d_model", "128"),
                                        ("vocab_size", None), ("ngroups", True), ("ffn_mult", "4"), ("norm_eps", -1.0),
                                        ("rope_base", 0.0), ("rope_base", "10000"), ("mixers", "rat")])
def test_a_config_value_of_the_wrong_type_or_range_is_an_error_naming_the_field(key, value):
    from ratpt.hf.configuration_rat import RATConfig

    with pytest.raises(ValueError, match=rf"RATConfig\.{key} must be .*got {re.escape(repr(value))}"):
        RATConfig(**{key: value})


def test_return_dict_false_gives_the_outputs_as_a_tuple():
    hf_model = hf_model_of(random_model(small_config(["rat", "swa"])))
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        full = hf_model(tokens, labels=tokens, use_cache=True)
        loss, logits, cache = hf_model(tokens, labels=tokens, use_cache=True, return_dict=False)
    assert torch.equal(loss, full.loss) and torch.equal(logits, full.logits)
    assert type(cache) is type(full.past_key_values)


@pytest.mark.parametrize("name, value", [("inputs_embeds", torch.zeros(2, T, 32)), ("position_ids", torch.arange(T)[None] + 5),
                                         ("output_attentions", True), ("output_hidden_states", True)])
def test_arguments_the_model_cannot_honour_are_refused_by_name(name, value):
    hf_model = hf_model_of(random_model(small_config(["rat"])))
    with pytest.raises(ValueError, match=f"does not take {name}"):
        hf_model(torch.randint(0, VOCAB, (2, T)), **{name: value})


@pytest.mark.parametrize("input_ids, message", [
    (None, "needs input_ids"), (torch.zeros(T, dtype=torch.long), r"input_ids must be \[batch, tokens\].*\(23,\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"input_ids must be \[batch, tokens\].*\(2, 0\)"),
    (torch.zeros(2, T), "input_ids must be integer token ids, got torch.float32"),
    (torch.full((2, T), VOCAB), rf"input_ids must lie in \[0, {VOCAB}\).*from {VOCAB} to {VOCAB}"),
    (torch.full((2, T), -1), "input_ids must lie in .* from -1 to -1")])
def test_input_ids_that_are_no_token_ids_are_an_error_naming_them(input_ids, message):
    hf_model = hf_model_of(random_model(small_config(["rat"])))
    with pytest.raises(ValueError, match=message):
        hf_model(input_ids)


def test_labels_give_the_cross_entropy_of_ratpts_logits_and_misfit_labels_are_refused():
    model = random_model(small_config(["rat", "swa"]))
    hf_model = hf_model_of(model)
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        torch.testing.assert_close(hf_model(tokens, labels=tokens.int()).loss, expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(2, 23\).*got shape \(2, 5\)"):
            hf_model(tokens, labels=tokens[:, :5])
        with pytest.raises(ValueError, match="labels .* logits_to_keep 1"):
            hf_model(tokens, labels=tokens, logits_to_keep=1)


def test_an_attention_mask_of_another_shape_is_named_as_such():
    hf_model = hf_model_of(random_model(small_config(["rat"])))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 23\), got \(2, 5\)"):
        hf_model(torch.randint(0, VOCAB, (2, T)), attention_mask=torch.ones(2, 5))


def test_a_cache_of_another_batch_or_model_or_a_masked_new_token_is_refused():
    hf_model = hf_model_of(random_model(small_config(["rat", "swa"])))
    other = hf_model_of(random_model(small_config(["rat"])))
    tokens = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        cache = hf_model(tokens, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="past_key_values holds 2 sequences, input_ids 3"):
            hf_model(torch.randint(0, VOCAB, (3, 1)), past_key_values=cache)
        with pytest.raises(ValueError, match=r"past_key_values holds the layers \['rat', 'rat'\], not this model's"):
            hf_model(tokens[:, :1], past_key_values=other(tokens, use_cache=True).past_key_values)
        with pytest.raises(ValueError, match="attention_mask must mark the new tokens of a cached batch real"):
            hf_model(tokens[:, :1], past_key_values=cache, attention_mask=torch.tensor([[1] * 24, [1] * 23 + [0]]))
