"""benchmarks/persistent_linears.py: its chain of linears computes the chain, one launch per linear (the
interpreter) and one persistent launch with grid barriers (GPU), against float64 matmuls."""
import pytest
import torch

import persistent_linears as probe


def small_chain(device, dtype) -> probe.Chain:
    """Two layers at widths that leave in_proj a partial last column tile (400 = 6·64 + 16)."""
    torch.manual_seed(0)
    return probe.Chain.random(layers=2, d=128, n1=400, f=512, rows=16, device=device, dtype=dtype)


def float64_chain(chain: probe.Chain) -> torch.Tensor:
    return probe.reference(probe.Chain(*(t.double() for t in (chain.w_in, chain.w_out, chain.w_fc1, chain.w_fc2,
                                                              chain.x))))


@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("tiles", [(64, 16, 64, 16, 1, 1), (32, 32, 128, 64, 4, 2)])
def test_chain_by_launches_equals_float64_matmuls(tiles, tma):
    """Column tiles, unsplit and in pieces of K whose partial products are summed after; weights loaded by
    pointers or through TMA descriptors (whose blocks past the last column read zeros)."""
    chain = small_chain("cpu", torch.float32)
    expected = float64_chain(chain)
    out = probe.run_by_launches(chain, probe.Launch(*tiles, bk=32, tma=tma))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize(("prefetch", "tma"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("tiles", [(64, 64, 64, 64, 4, 4), (32, 32, 64, 32, 1, 1)])
def test_persistent_chain_equals_the_same_tiles_launched_one_linear_at_a_time(tiles, prefetch, tma):
    """The barriers order the linears: a linear that read its input before the one before had written
    all of it would be far off. The two launches may round differently (the compiler may pick other
    tensor-core instructions inside the persistent loops), so they agree to bf16's rounding."""
    chain = small_chain("cuda", torch.bfloat16)
    x0, expected = chain.x.clone(), float64_chain(chain)
    launch = probe.Launch(*tiles, bk=32, prefetch=prefetch, tma=tma)
    by_launches = probe.run_by_launches(chain, launch).clone()
    chain.x.copy_(x0)
    probe.persistent_call(chain, launch)()
    scale = by_launches.abs().max().item()
    torch.testing.assert_close(chain.x, by_launches, rtol=1e-2, atol=1e-2 * scale)
    torch.testing.assert_close(chain.x.double(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
