"""RATForCausalLM on ratpt's Triton kernels (config.kernels) against its own plain PyTorch: the full forward,
the cached prefill and the decoding that continues from it. On CPU the kernels run in Triton's interpreter."""
from dataclasses import asdict
from unittest import mock

import pytest
import torch
from hf_helpers import VOCAB, random_model, small_config

import ratpt_kernels
from ratpt.hf.configuration_rat import RATConfig
from ratpt.hf.modeling_rat import RATForCausalLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L = 8  # the kernels take chunks of a power of two and heads of 32, 64 or 128


def twins() -> dict[str, RATForCausalLM]:
    """The same RAT weights under kernels="torch" (rat_ops) and kernels="triton" (ratpt's kernels)."""
    model = random_model(small_config(["rat"], d_model=64, head_dim=32, chunk_size=L))
    models = {}
    for kernels in ("torch", "triton"):
        models[kernels] = RATForCausalLM(RATConfig(**(asdict(model.cfg) | {"kernels": kernels}))).eval()
        models[kernels].model.load_state_dict(model.state_dict())
        models[kernels].to(DEVICE)
    return models


def spying(name: str):
    """Patch ratpt_kernels.`name` with a wrapper that counts its calls (ratpt.ops imports it when called)."""
    return mock.patch.object(ratpt_kernels, name, side_effect=getattr(ratpt_kernels, name))


def test_the_full_forward_runs_the_kernels_and_equals_plain_pytorch():
    models = twins()
    tokens = torch.randint(0, VOCAB, (2, 19), device=DEVICE)
    with torch.no_grad(), spying("rat_mixing") as kernel:
        got = models["triton"](tokens, use_cache=False).logits
    assert kernel.call_count == 2  # both RAT layers
    with torch.no_grad():
        torch.testing.assert_close(got, models["torch"](tokens, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_the_cached_prefill_runs_the_kernels_and_its_cache_decodes_as_plain_pytorchs():
    # a left-padded batch: one prompt ends mid-chunk, the other at a chunk's end
    models = twins()
    tokens = torch.randint(0, VOCAB, (2, 19), device=DEVICE)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # 16 real tokens: two whole chunks
    outs = {}
    with torch.no_grad():
        for kernels, model in models.items():
            with spying("rat_prefill") as kernel:
                out = model(tokens, attention_mask=mask, use_cache=True)
            assert kernel.call_count == (2 if kernels == "triton" else 0)
            logits = [out.logits[:, -1]]
            for step in range(3):
                out = model(logits[-1].argmax(-1, keepdim=True), past_key_values=out.past_key_values, use_cache=True)
                logits.append(out.logits[:, -1])
            outs[kernels] = (torch.stack(logits, 1), out.past_key_values)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-4, atol=1e-4)
    for got, want in zip(outs["triton"][1].layers, outs["torch"][1].layers):
        for name in ("summary_k", "summary_v", "running_k", "running_v"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-4, msg=name)


def test_an_unknown_kernels_choice_is_refused():
    with pytest.raises(ValueError, match="RATConfig.kernels must be one of"):
        RATConfig(kernels="cuda")
