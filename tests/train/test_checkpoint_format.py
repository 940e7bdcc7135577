"""`checkpoint.format` / `checkpoint.async_save` are validated, and the pieces a rank writes of a
distributed checkpoint cover exactly its part of every plain parameter (the multi-process behaviour
is tested in tests/parallel/test_dist_checkpoint.py)."""
import itertools
import pickle

import pytest
import torch

from ratpt.config import ConfigError, load_config
from ratpt.engines.megatron_checkpoint import DIST_DIR, _Layout, _pieces, _rectangles, read_plain_state
from ratpt.checkpoint import CheckpointError
from run_helpers import CodeRunningPayload

VALID = ["data.streams=[{path: data}]"]


@pytest.mark.parametrize("overrides, key", [
    (["checkpoint.format=sharded"], "checkpoint.format"),
    (["checkpoint.async_save=true"], "checkpoint.async_save"),
    (["checkpoint.format=distributed", "train.engine=deepspeed"], "train.engine=deepspeed"),
])
def test_impossible_checkpoint_formats_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, VALID + overrides)


def test_a_distributed_background_save_is_a_valid_config():
    cfg = load_config(None, VALID + ["checkpoint.format=distributed", "checkpoint.async_save=true"])
    assert cfg.checkpoint.format == "distributed" and cfg.checkpoint.async_save


@pytest.mark.parametrize("shape", [(7,), (1, 5), (5, 3), (4, 6)], ids=str)
def test_every_flat_range_is_tiled_exactly_by_its_rectangles(shape):
    numel = torch.Size(shape).numel()
    index = torch.arange(numel).view(shape)
    for start, end in itertools.combinations(range(numel + 1), 2):
        covered = []
        for offset, size, first in _rectangles(shape, start, end):
            block = index[tuple(slice(o, o + s) for o, s in zip(offset, size))]
            assert block.numel() == torch.Size(size).numel()  # inside the tensor
            assert block.flatten().tolist() == list(range(first, first + block.numel()))  # contiguous from `first`
            covered += block.flatten().tolist()
        assert covered == list(range(start, end)), (shape, start, end)


def test_pieces_put_a_tensor_parallel_shard_back_where_it_lies_in_the_plain_parameter():
    # RAT's fused in_proj under TP 2 (D = 4, q/k rows 2): rank 1 holds z, v, f rows 2-3, 6-7, 10-11, then q/k 12-13
    plain = torch.randn(14, 3)
    rows = torch.tensor([2, 3, 6, 7, 10, 11, 12, 13])
    local = plain.index_select(0, rows)
    layout = _Layout("in_proj", (14, 3), 0, ((0, 2, 2), (2, 6, 2), (4, 10, 2), (6, 12, 2)), False, False)
    for start, end in [(0, local.numel()), (4, 17), (7, 8)]:  # the whole shard, ranges ending mid-row
        rebuilt = torch.full_like(plain, float("nan"))
        for piece, offset in _pieces(local.view(-1)[start:], start, start, end, tuple(local.shape), layout):
            rebuilt[offset[0]:offset[0] + piece.shape[0], offset[1]:offset[1] + piece.shape[1]] = piece
        expected = torch.full_like(plain, float("nan"))
        flat = expected.index_select(0, rows).view(-1)
        flat[start:end] = local.view(-1)[start:end]
        expected[rows] = flat.view(-1, 3)
        torch.testing.assert_close(rebuilt, expected, equal_nan=True, rtol=0, atol=0)


def test_shard_metadata_that_would_run_code_is_refused(tmp_path, capsys):
    (tmp_path / DIST_DIR).mkdir()
    (tmp_path / DIST_DIR / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": CodeRunningPayload()}))
    with pytest.raises(CheckpointError, match=".metadata"):
        read_plain_state(tmp_path)
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_a_checkpoint_missing_pieces_of_a_tensor_is_refused(tmp_path):
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, TensorProperties,
                                                       TensorStorageMetadata)

    half = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3]))
    stored = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([4, 3]), [half])
    (tmp_path / DIST_DIR).mkdir()
    (tmp_path / DIST_DIR / ".metadata").write_bytes(pickle.dumps(Metadata({"model.w": stored})))
    with pytest.raises(CheckpointError, match="model.w has 6 of its 12 elements"):
        read_plain_state(tmp_path)


def _checkpoint_of(writer: str, out_dir, world_size: int = 1):
    """A complete, checksummed checkpoint of step 2 in the form `writer` writes (its state files are stand-ins):
    an engine (DeepSpeed's of `world_size` processes), or DeepSpeed's consolidation (weights alone)."""
    from ratpt.checkpoint import finish_checkpoint, start_checkpoint
    from ratpt.engines.deepspeed_checkpoint import TAG

    tmp = start_checkpoint(out_dir / "checkpoints", 2)
    if writer == "deepspeed":
        (tmp / TAG).mkdir()
        for rank in range(world_size):
            torch.save({"partition": torch.zeros(2)}, tmp / TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        state = {"engine": "deepspeed", "step": 2}
    elif writer == "consolidation":
        state = {"model": {}, "step": 2}
    else:
        state = {"model": {}, "optimizer": {}, "step": 2, "data": {}, "rng": {}, "bad_in_a_row": 0}
    return finish_checkpoint(tmp, state, "name: t\n", None, None)


@pytest.mark.parametrize("written_by, resumed_by", [("deepspeed", "megatron"), ("megatron", "deepspeed")])
def test_a_checkpoint_of_another_engine_is_refused_before_any_engine_is_built(tmp_path, written_by, resumed_by):
    # a DeepSpeed checkpoint resumed by train.engine=megatron failed with KeyError: 'model' in the engine's load;
    # DeepSpeed refused a megatron checkpoint, but only once its engine was built
    from ratpt.train.checkpointer import resume_path

    _checkpoint_of(written_by, tmp_path)
    cfg = load_config(None, VALID + [f"out_dir={tmp_path}", f"train.engine={resumed_by}"])
    with pytest.raises(CheckpointError, match=rf"written by train.engine={written_by}.*set train.engine={written_by}"
                                              r".*checkpoint.init_from="):
        resume_path(cfg, world_size=1)


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_a_consolidated_checkpoint_is_refused_for_resume_naming_init_from(tmp_path, engine):
    # its weights alone failed in the engine's load with KeyError: 'optimizer'
    from ratpt.train.checkpointer import resume_path

    _checkpoint_of("consolidation", tmp_path)
    cfg = load_config(None, VALID + [f"out_dir={tmp_path}", f"train.engine={engine}"])
    with pytest.raises(CheckpointError, match=r"holds model weights alone .* checkpoint.init_from="):
        resume_path(cfg, world_size=1)


def test_a_deepspeed_checkpoint_is_resumed_on_as_many_processes_as_wrote_it_only(tmp_path):
    # on another number, DeepSpeed's load raised ZeRORuntimeException ("Automatic adjustment of ZeRO's optimizer
    # state partitioning with a new world size is not currently supported"), a traceback on every rank
    from ratpt.train.checkpointer import check_resumable, resume_path

    checkpoint = _checkpoint_of("deepspeed", tmp_path, world_size=2)
    cfg = load_config(None, VALID + [f"out_dir={tmp_path}", "train.engine=deepspeed"])
    with pytest.raises(CheckpointError, match=r"partitioned over 2 processes, .* this run has 1: launch 2, or "
                                              r"consolidate it .*checkpoint.init_from="):
        resume_path(cfg, world_size=1)
    check_resumable(cfg, checkpoint, world_size=2)
