"""Config loading: defaults, YAML + overrides, and a clear error for each kind of mistake."""
from pathlib import Path

import pytest

from ratpt.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
STREAM = ["data.streams=[{path: data/x}]"]


def test_defaults_are_the_papers_rat_1p3b():
    cfg = load_config(None, STREAM)
    assert isinstance(cfg, Config)
    m, t, o = cfg.model, cfg.train, cfg.optimizer
    assert (m.n_layers, m.d_model, m.head_dim, m.ngroups, m.chunk_size, m.vocab_size) == (24, 2048, 128, 2, 16, 32000)
    assert (cfg.data.seq_len, t.global_batch, o.lr, o.betas, o.weight_decay, o.grad_clip) == (
        4096, 512, 8e-4, [0.9, 0.95], 0.1, 1.0)
    assert cfg.schedule.kind == "cosine" and cfg.schedule.warmup_fraction == 0.05


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_win_over_yaml_and_interpolate_out_dir(tmp_path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: a\ntrain:\n  steps: 5\n")
    cfg = load_config(yaml, STREAM + ["train.steps=7", "name=b"])
    assert cfg.train.steps == 7 and cfg.out_dir == "runs/b"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.stepz=3"], "train.stepz"),
        (["train.steps=many"], "train.steps"),
        (["model.mixers=[rat, mamba]"], "mamba"),
        (["train.global_batch=10", "train.micro_batch=4"], "train.global_batch"),
        (["data.seq_len=100"], "model.chunk_size"),
        (["schedule.kind=linear"], "schedule.kind"),
        (["optimizer.betas=[0.9]"], "optimizer.betas"),
        (["model.d_model=100"], "head_dim"),
        (["train.steps"], "key=value"),
        (["train.compile_backend=cudagraphs"], "train.compile_backend must be inductor|aot_eager"),
        (["optimizer.lr=inf"], "optimizer.lr"),
        (["optimizer.eps=-1"], "optimizer.eps"),
        (["optimizer.weight_decay=-5"], "optimizer.weight_decay"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["eval.max_samples=0"], "eval.max_samples"),
        (["data.streams=[{path: data/x, min_doc_tokens: -1}]"], "data.streams[0].min_doc_tokens must be >= 0"),
        (["logging.peak_tflops=-5"], "logging.peak_tflops must be >= 0"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-mixer", "batch-indivisible", "seq-vs-chunk",
         "bad-schedule", "bad-betas", "width-vs-heads", "override-without-value", "bad-compile-backend",
         "infinite-lr", "negative-eps", "negative-weight-decay", "negative-workers", "no-validation-batch",
         "negative-min-doc-tokens", "negative-peak"],
)
def test_mistakes_raise_config_error_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, STREAM + overrides)


def test_empty_streams_is_an_error():
    with pytest.raises(ConfigError, match="data.streams"):
        load_config(None, [])


@pytest.mark.parametrize("text, named", [("train:\n  steps: [3\n", "not valid YAML"),
                                         ("- train\n- model\n", "mapping of sections")],
                         ids=["syntax-error", "a-list"])
def test_a_config_file_that_is_no_config_is_an_error_naming_it(tmp_path, text, named):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(path, STREAM)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_global_batch_must_divide_over_data_parallel_ranks():
    from ratpt.config import validate_config

    cfg = load_config(None, STREAM + ["train.global_batch=8", "train.micro_batch=4"])
    validate_config(cfg, dp_size=2)
    with pytest.raises(ConfigError, match="data-parallel size"):
        validate_config(cfg, dp_size=3)
