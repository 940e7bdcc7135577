"""Fixtures of the kernel tests."""
import pytest
import torch


@pytest.fixture
def deterministic(request):
    """torch.use_deterministic_algorithms set to the test's parameter (indirect parametrization), then
    restored: True selects the kernels' bit-reproducible two-pass backward, False the default one whose
    summary side adds dq atomically. warn_only, so that the reference's cuBLAS calls may still run."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
