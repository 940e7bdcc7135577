"""Prefill in pieces equals the one-shot prefill: the last position's logits, the cache it leaves (every
decode step after it) and the greedy answer, for every mixer and the hybrids."""
import pytest
import torch
from hf_helpers import VOCAB, random_model, small_config

from ratpt.generate import generate
from ratpt.hf.long_prefill import greedy_answer, prefill_in_pieces

MIXERS = {"rat": ["rat"], "rat+swa": ["rat", "swa"], "rat+swa+attention": ["rat", "swa", "attention"],
          "rnn": ["rnn"], "all": ["rat", "swa", "attention", "rnn"]}
T = 61  # four pieces of 16 tokens (chunks of 4), the last one partial: 13 tokens, 3 whole chunks and 1 token


@pytest.mark.parametrize("window", [5, 20], ids=["window<piece", "window>piece"])
@pytest.mark.parametrize("mixers", MIXERS.values(), ids=MIXERS.keys())
def test_pieces_give_the_one_shot_logits_and_cache(mixers, window):
    model = random_model(small_config(mixers, window=window))
    tokens = torch.randint(0, VOCAB, (2, T + 12))
    capacity = T + 12
    expected, one_shot = model.prefill(tokens[:, :T], capacity=capacity)
    logits, pieces = prefill_in_pieces(model, tokens[:, :T], capacity=capacity, piece=16)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert pieces.lengths.tolist() == [T, T] and pieces.bound == T
    for t in range(T, T + 12):  # the caches continue alike, across a chunk boundary and the window
        torch.testing.assert_close(model.decode_step(tokens[:, t], pieces), model.decode_step(tokens[:, t], one_shot),
                                   rtol=1e-5, atol=1e-5)


def test_the_greedy_answer_is_ratpt_generate_s():
    model = random_model(small_config(["rat", "swa", "attention", "rnn"]))
    prompt = torch.randint(0, VOCAB, (T,)).tolist()
    expected = generate(model, [prompt], max_new_tokens=10, eos_id=7)[0]
    assert greedy_answer(model, prompt, max_new_tokens=10, eos_id=7, piece=16) == expected


def test_a_piece_that_splits_a_chunk_is_an_error():
    model = random_model(small_config(["rat"]))
    with pytest.raises(ValueError, match="multiple of the chunk size 4"):
        prefill_in_pieces(model, torch.zeros(1, T, dtype=torch.long), capacity=T, piece=6)


def test_extend_refuses_a_cache_without_room_or_a_growing_one():
    model = random_model(small_config(["rat", "swa"]))
    tokens = torch.randint(0, VOCAB, (1, 32))
    _, cache = model.prefill(tokens[:, :16], capacity=24)
    with pytest.raises(ValueError, match="holds 24 tokens per sequence"):
        model.extend(tokens[:, 16:32], cache)
    _, growing = model.prefill(tokens[:, :16])
    with pytest.raises(ValueError, match="explicit capacity"):
        model.extend(tokens[:, 16:20], growing)


def test_a_rat_continuation_must_start_a_chunk():
    model = random_model(small_config(["rat"]))
    _, cache = model.prefill(torch.zeros(1, 6, dtype=torch.long), capacity=16)
    with pytest.raises(ValueError, match="not a multiple of the chunk size 4"):
        model.extend(torch.zeros(1, 4, dtype=torch.long), cache)
