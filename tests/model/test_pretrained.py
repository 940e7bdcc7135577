"""save_pretrained / load_pretrained: round trip, atomic replace, checksums, permissions, clear errors."""
import os
import stat

import pytest
import torch
from omegaconf import OmegaConf

import ratpt
from ratpt.model import ModelConfig, build_model
from ratpt.model.pretrained import save_pretrained


def tiny_cfg():
    return ModelConfig(vocab_size=37, d_model=16, n_layers=2, head_dim=4, chunk_size=4, mixers=["rat", "swa"], window=3)


def test_round_trip_gives_the_same_logits(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    save_pretrained(model, cfg, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["checksums.json", "config.yaml", "model.safetensors"]
    loaded, loaded_cfg = ratpt.load_pretrained(tmp_path / "m")
    assert loaded_cfg == cfg
    tokens = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_saving_over_an_existing_folder_replaces_it(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    model = build_model(cfg)
    save_pretrained(model, cfg, tmp_path / "m")
    loaded, _ = ratpt.load_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.embedding.weight, model.embedding.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_missing_folder_and_missing_weights_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ratpt.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        ratpt.load_pretrained(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ratpt export"):
        ratpt.load_pretrained(tmp_path / "run")


def test_a_file_given_for_the_folder_is_named_as_a_file(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file: name the pretrained folder"):
        ratpt.load_pretrained(tmp_path / "m" / "model.safetensors")


def test_config_that_disagrees_with_the_weights_is_an_error(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    conf = OmegaConf.load(tmp_path / "m" / "config.yaml")
    conf.model.ngroups = 4
    OmegaConf.save(conf, tmp_path / "m" / "config.yaml")
    with pytest.raises(ValueError, match="in_proj"):
        ratpt.load_pretrained(tmp_path / "m")


def test_unknown_config_key_is_an_error(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    conf = OmegaConf.load(tmp_path / "m" / "config.yaml")
    conf.model.n_heads = 4
    OmegaConf.save(conf, tmp_path / "m" / "config.yaml")
    with pytest.raises(ValueError, match="n_heads"):
        ratpt.load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("text, message", [
    ("model:\n  vocab_size: [37\n", "is not valid YAML: while parsing a flow sequence"),
    (b"\xff\xfe model", "is not valid YAML: 'utf-8' codec can't decode byte 0xff"),
    ("model: hello\n", "the model's config is 'hello', not a mapping of its fields"),
    ("- model\n", "has no 'model:' section"),
    ("model:\n  n_layers: four\n", "model.n_layers: Value 'four' of type 'str' could not be converted to Integer"),
    ("model:\n  n_layers: -4\n", "model.n_layers must be >= 1, got -4"),
], ids=["not-yaml", "not-utf8", "model-not-a-mapping", "a-list", "wrong-type", "out-of-range"])
def test_a_broken_config_file_is_one_error_naming_the_file_and_the_key(tmp_path, text, message):
    """What a hand edit of config.yaml can do: each a ValueError (one line at the command line) that starts
    with the file's path, never yaml's or OmegaConf's own exception, nor a message without the file."""
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    config = tmp_path / "m" / "config.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as error:
        ratpt.load_pretrained(tmp_path / "m")
    assert str(error.value).startswith(str(config)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_device_that_is_not_one_is_named_as_the_device_not_as_a_corrupt_file(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    with pytest.raises(ValueError, match="^device 'banana' is not a device: use cpu, cuda or cuda:N$"):
        ratpt.load_pretrained(tmp_path / "m", device="banana")
    with pytest.raises(ValueError, match="^device cuda:99: (CUDA is not available here|this machine has)"):
        ratpt.load_pretrained(tmp_path / "m", device="cuda:99")


def test_truncated_weights_are_an_error_naming_the_file(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"model.safetensors has 50 bytes.*truncated"):
        ratpt.load_pretrained(tmp_path / "m")


def test_a_changed_byte_in_the_weights_is_named_at_load(tmp_path):
    cfg = tiny_cfg()
    save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors differs from its checksum.*ratpt export"):
        ratpt.load_pretrained(tmp_path / "m")


def test_an_exported_folder_gets_the_umasks_permissions(tmp_path):
    """Shared clusters: a group-readable umask gives a group-readable model (tempfile's folders are 0700)."""
    cfg = tiny_cfg()
    before = os.umask(0o022)
    try:
        save_pretrained(build_model(cfg), cfg, tmp_path / "m")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "m", *(tmp_path / "m").iterdir()]}
    assert modes == {"m": 0o755, "checksums.json": 0o644, "config.yaml": 0o644, "model.safetensors": 0o644}
