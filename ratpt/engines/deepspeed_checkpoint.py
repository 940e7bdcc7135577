"""Checkpoints of the DeepSpeed engine: DeepSpeed's own save/load inside ratpt's checkpoint
directories, and consolidation into a plain ratpt checkpoint.

    step_XXXXXXXX/
        deepspeed/     DeepSpeed's save_checkpoint (tag "deepspeed"): every rank's ZeRO partitions
                       of the fp32 weights and AdamW state, and the client state (step, data-loader
                       position, RNG, bad-step count) that the trainer resumes from
        state.pt       {"engine": "deepspeed", "step"}: tells ratpt which engine wrote it
        config.yaml, tokenizer/   as for every ratpt checkpoint
        zero_to_fp32.py           DeepSpeed's own consolidation script, which it copies in

Through ratpt.checkpoint (start_checkpoint / finish_checkpoint) the directory is written
under a temporary name, its files (every rank's, hashed by share) listed in checksums.json, and
renamed into place, so `checkpoint.resume: auto` finds only complete checkpoints, and only the
newest `checkpoint.keep` are kept. `consolidate` turns one (any ZeRO
stage) into a plain ratpt checkpoint
(`state.pt` with the full fp32 "model") for `ratpt eval`, `ratpt generate` and `ratpt export`:

    python -m ratpt.engines.deepspeed_checkpoint runs/NAME/checkpoints/step_00001000 OUT_FOLDER
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ratpt.files import fsync_path
from ratpt.checkpoint import (CONFIG_FILE, STATE_FILE, TOKENIZER_DIR, CheckpointError, checkpoint_name,
                              checksums_by_rank, finish_checkpoint, resolve_checkpoint, save_checkpoint,
                              start_checkpoint, temporary_dir, verify_checkpoint, weights_only_loads)
from ratpt.folder_lock import FolderLocked, FolderUnwritable, hold_folder
from ratpt.parallel.process_group import on_rank0


TAG = "deepspeed"  # DeepSpeed's checkpoint tag: its files live in step_XXXXXXXX/deepspeed/


def save_deepspeed_checkpoint(ds_engine, directory: Path, step: int, client_state: dict[str, Any],
                              config_yaml: str, tokenizer_dir: Optional[Path], keep: int) -> Path:
    """Write checkpoint `step` through DeepSpeed's save_checkpoint, atomically (every rank calls it)."""
    main = dist.get_rank() == 0
    tmp = start_checkpoint(directory, step) if main else temporary_dir(directory, step)
    dist.barrier()
    ds_engine.save_checkpoint(str(tmp), tag=TAG, client_state=client_state, save_latest=False)
    _fsync_files(tmp / TAG, str(dist.get_rank()))  # each rank its own files (DeepSpeed names them by rank)
    checksums = checksums_by_rank(tmp)
    return on_rank0(lambda: finish_checkpoint(tmp, {"engine": "deepspeed", "step": step}, config_yaml,
                                              tokenizer_dir, keep, checksums))


def _fsync_files(root: Path, contains: str) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and contains in path.name:
            fsync_path(path)


def deepspeed_checkpoint_dir(path: Path) -> Path:
    """The step directory of a DeepSpeed checkpoint at `path` (a step, run or checkpoints folder)."""
    checkpoint = resolve_checkpoint(path)
    if not (checkpoint / TAG).is_dir():
        raise CheckpointError(f"{checkpoint} was not written by train.engine=deepspeed (no {TAG}/ folder): "
                              "a plain checkpoint, which eval, export and generate read as it is, and which the DeepSpeed "
                              "engine cannot resume")
    return checkpoint


def deepspeed_data_classes() -> list[type]:
    """The data-only classes DeepSpeed pickles into its checkpoints besides tensors and containers, the
    only ones their loading may construct: the enum of its ZeRO stage, and plain attribute holders (its
    loss scaler, the dataclass of a parameter fragment's address) restored into bare instances, since
    none defines __setstate__ or __reduce__."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_deepspeed_checkpoint(ds_engine, path: Path) -> dict[str, Any]:
    """Load model and optimizer through DeepSpeed's load_checkpoint; return the client state."""
    checkpoint = deepspeed_checkpoint_dir(path)
    with weights_only_loads(deepspeed_data_classes()):
        loaded, client_state = ds_engine.load_checkpoint(str(checkpoint), tag=TAG, load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {checkpoint / TAG}")
    return client_state


def consolidate(path: Path, out: Path) -> Path:
    """A plain ratpt checkpoint `out/step_XXXXXXXX` (full fp32 model from the ZeRO partitions,
    via DeepSpeed's zero_to_fp32; config and tokenizer copied) from a DeepSpeed one."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = deepspeed_checkpoint_dir(verify_checkpoint(path))
    step = torch.load(checkpoint / STATE_FILE, weights_only=True)["step"]
    with weights_only_loads(deepspeed_data_classes()):
        model = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    final = out / checkpoint_name(step)
    if final.exists():
        raise FileExistsError(f"{final} exists: choose another output folder")
    tokenizer = checkpoint / TOKENIZER_DIR
    with hold_folder(out, purpose="consolidating a DeepSpeed checkpoint"):  # its stale *.tmp are then ours
        return save_checkpoint(out, step, {"model": {k: v.contiguous() for k, v in model.items()}, "step": step},
                               (checkpoint / CONFIG_FILE).read_text(), tokenizer if tokenizer.is_dir() else None,
                               keep=None)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Consolidate a DeepSpeed (ZeRO) ratpt checkpoint into a "
                                     "plain one for eval, generate and export.")
    parser.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run folder (newest checkpoint)")
    parser.add_argument("out", help="folder to write the plain step_XXXXXXXX checkpoint into")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        print(consolidate(Path(args.checkpoint), Path(args.out)))
    except (CheckpointError, FileExistsError, FolderLocked, FolderUnwritable) as err:  # the message names the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
