"""`parallel` is validated before anything runs, with messages that name the keys and the fix."""
import pytest

from ratpt.config import ConfigError, data_parallel_size, load_config

BASE = ["model.d_model=64", "model.head_dim=16", "model.n_layers=4", "model.vocab_size=96", "data.seq_len=128",
        "model.chunk_size=16", "train.global_batch=8", "train.micro_batch=1", "data.streams=[{path: unused}]"]


def test_data_parallel_takes_the_ranks_left_after_tensor_pipeline_and_context():
    cfg = load_config(None, BASE + ["parallel.tensor=2", "parallel.context=2"])
    assert data_parallel_size(cfg, 8) == 2
    assert data_parallel_size(load_config(None, BASE), 4) == 4


def test_a_world_size_that_does_not_divide_is_refused_by_name():
    cfg = load_config(None, BASE + ["parallel.context=2", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match=r"world size \(6 processes\).*parallel.tensor × parallel.pipeline"):
        data_parallel_size(cfg, 6)


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor=3", "parallel.tensor .3. must divide the number of heads"),
    ("parallel.context=3", r"data.seq_len \(128\) must be a multiple of 2 × parallel.context \(3\) × "
                           r"model.chunk_size \(16\) = 96 .*or set parallel.context_layout=contiguous"),
    ("parallel.context_layout=ring", r"parallel.context_layout must be contiguous\|zigzag, got 'ring'"),
    ("parallel.pipeline=5", r"model.n_layers \(4\) must be >= parallel.pipeline"),
    ("parallel.context=0", "parallel.context must be >= 1"),
])
def test_impossible_layouts_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + [override])


def test_zigzag_needs_two_blocks_of_whole_chunks_per_rank_contiguous_one():
    # 128 tokens = 8 chunks: CP 8 holds one chunk per rank contiguously, but cannot cut 16 zigzag blocks
    load_config(None, BASE + ["parallel.context=8", "parallel.context_layout=contiguous"])
    with pytest.raises(ConfigError, match=r"2 × parallel.context \(8\) × model.chunk_size \(16\) = 256"):
        load_config(None, BASE + ["parallel.context=8", "parallel.context_layout=zigzag"])
    with pytest.raises(ConfigError, match=r"data.seq_len \(128\) must be a multiple of parallel.context \(3\) × "
                                          r"model.chunk_size \(16\) = 48 so every context-parallel rank holds"):
        load_config(None, BASE + ["parallel.context=3", "parallel.context_layout=contiguous"])


@pytest.mark.parametrize("layout, message", [
    ("contiguous", r"data.seq_len / parallel.context \(32\) >= model.window \(64\)"),
    ("zigzag", r"data.seq_len / \(2 × parallel.context\) \(16\) >= model.window \(64\)"),
])
def test_sliding_window_context_parallelism_needs_a_window_per_block(layout, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + ["model.mixers=[rat,swa]", "model.window=64", "parallel.context=4",
                                  f"parallel.context_layout={layout}"])
    load_config(None, BASE + ["model.mixers=[rat,swa]", "model.window=16", "parallel.context=4",
                              f"parallel.context_layout={layout}"])


def test_tensor_parallel_must_leave_whole_query_key_groups_per_rank():
    # 4 heads, 2 groups: TP 2 leaves 2 heads (one per group) per rank; TP 4 one head, which cannot tile 2 groups
    load_config(None, BASE + ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match=r"parallel.tensor \(4\) must leave a multiple of model.ngroups \(2\)"):
        load_config(None, BASE + ["parallel.tensor=4"])
    load_config(None, BASE + ["parallel.tensor=4", "model.mixers=[attention]"])


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_virtual_stages_without_a_pipeline_are_refused_naming_both_keys(engine):
    # megatron-core raised "pipeline-model-parallel size should be greater than 1" on every rank; one process
    # and DeepSpeed ignored the key
    with pytest.raises(ConfigError, match=r"parallel.virtual_stages \(2\).*parallel.pipeline is 1"):
        load_config(None, BASE + ["parallel.virtual_stages=2", f"train.engine={engine}"])
    load_config(None, BASE + ["parallel.virtual_stages=2", "parallel.pipeline=2"])


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_context_parallelism_of_rnn_layers_is_refused_naming_the_keys(engine):
    # the engines raised NotImplementedError from apply_context_parallel, a traceback on every rank
    with pytest.raises(ConfigError, match=r"parallel.context \(2\).*rnn layers of model.mixers"):
        load_config(None, BASE + ["model.mixers=[rat,rnn]", "parallel.context=2", f"train.engine={engine}"])
    load_config(None, BASE + ["model.mixers=[rat,rnn]", "parallel.tensor=2"])


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=127", "parallel.tensor=2"], r"data.seq_len \(127\) must be a multiple of parallel.context × "
                                                r"parallel.tensor = 1 × 2 = 2"),
    (["data.seq_len=130", "parallel.tensor=2", "parallel.context=2", "parallel.context_layout=contiguous"],
     r"data.seq_len \(130\) must be a multiple of parallel.context × parallel.tensor = 2 × 2 = 4"),
])
def test_sequence_parallelism_needs_each_context_ranks_tokens_to_split_over_tensor_ranks(overrides, message):
    # megatron's scatter to the sequence-parallel region failed with an AssertionError traceback on every rank
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + ["model.mixers=[attention]", *overrides])
    load_config(None, BASE + ["model.mixers=[attention]", "data.seq_len=132", "parallel.tensor=2",
                              "parallel.context=2", "parallel.context_layout=contiguous"])
