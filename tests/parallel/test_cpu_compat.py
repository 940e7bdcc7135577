"""The CPU compatibility layer for megatron-core: what it changes, and that it changes nothing else."""
import importlib

import pytest
import torch

from ratpt.parallel import cpu_compat


@pytest.fixture(scope="module")
def installed():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the layer is inactive by design")
    assert cpu_compat.install()
    return [importlib.import_module(name) for name in cpu_compat.PATCHED_MODULES]


def test_megatron_modules_see_the_cpu_as_their_cuda_device(installed):
    for module in installed:
        assert module.torch.cuda.current_device() == torch.device("cpu"), module.__name__
        assert module.torch.zeros(2, device="cuda").device.type == "cpu"
        assert module.torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"


def test_torch_itself_is_untouched(installed):
    assert torch.zeros(1).type() == "torch.FloatTensor"
    assert torch.cuda.current_device is not installed[0].torch.cuda.current_device
    assert not hasattr(torch.Tensor.type, "__wrapped__")


def test_optimizer_type_checks_accept_cpu_tensors_only_inside_megatron_calls(installed):
    with cpu_compat._cpu_tensors_pass_cuda_type_checks():
        with cpu_compat._cpu_tensors_pass_cuda_type_checks():  # nested (the optimizer builds inside __init__)
            assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_install_is_a_no_op_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.install() is False
