"""train.compile: auto compiles on CUDA and not on the CPU; true/false force it; anything else is refused."""
import pytest

from ratpt.config import ConfigError, compiles, load_config

VALID = ["data.streams=[{path: unused}]"]


@pytest.mark.parametrize("value, cuda, cpu", [("auto", True, False), ("true", True, True), ("false", False, False),
                                              ("True", True, True)])
def test_compile_choice_by_device(value, cuda, cpu):
    train = load_config(None, VALID + [f"train.compile={value}"]).train
    assert (compiles(train, "cuda"), compiles(train, "cpu")) == (cuda, cpu)


def test_the_default_compiles_on_gpus_only():
    train = load_config(None, VALID).train
    assert compiles(train, "cuda") and not compiles(train, "cpu")


def test_an_unknown_compile_value_names_the_key():
    with pytest.raises(ConfigError, match="train.compile must be auto|true|false"):
        load_config(None, VALID + ["train.compile=sometimes"])
