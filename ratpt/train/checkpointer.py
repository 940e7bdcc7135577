"""The run's checkpoints: which one to resume, and every save, whatever the engine.

The engine writes and reads its own state (ratpt.engines.contract); this module decides where
checkpoints go, which one a run resumes (`checkpoint.resume`), and refuses a resume that would
load another model, another tokenizer's data, or interleave two histories in one run folder.
`resume: auto` takes the newest checkpoint whose files match their checksums: a newer one that is
provably broken (a file missing, truncated or changed) is moved aside to `step_N.broken` with a
warning, so the run goes on from the one before it instead of failing on every restart. A run with
no checkpoint of its own may start from another run's weights (`checkpoint.init_from`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

import torch

from ratpt.checkpoint import (CONFIG_FILE, CheckpointError, checkpoint_step, list_checkpoints, load_checkpoint,
                              set_aside, verify_checkpoint)
from ratpt.config import Config
from ratpt.data.dataset import check_trained_tokenizer
from ratpt.engines import Engine
from ratpt.engines.deepspeed_checkpoint import TAG as DEEPSPEED_TAG
from ratpt.engines.megatron_checkpoint import is_distributed, read_plain_state
from ratpt.files import checksum_mismatch
from ratpt.parallel.process_group import on_rank0

log = logging.getLogger("ratpt.train")

# model keys a run may change when it resumes: the kernels' dispatch, and what only the initialisation reads
RESUMABLE_MODEL_CHANGES = frozenset({"kernels", "init_std"})
# ... and when it starts from another run's weights (checkpoint.init_from): also RoPE's base, which a
# context extension may raise (no weight depends on it)
INIT_MODEL_CHANGES = RESUMABLE_MODEL_CHANGES | {"rope_base"}
# where checkpoint.init_from applies: the advice to start a new run from a checkpoint that cannot be resumed
NEW_RUN = " in an out_dir that holds no checkpoint (checkpoint.resume=auto)"


def tokenizer_folder(cfg: Config) -> Optional[Path]:
    """The tokenizer the training data was made with (copied into every checkpoint), if any."""
    folder = Path(cfg.data.streams[0].path) / "tokenizer"
    return folder if folder.is_dir() else None


class Checkpointer:
    """Saves and resumes the checkpoints of one run (`<out_dir>/checkpoints`) through its engine."""

    def __init__(self, cfg: Config, engine: Engine, config_yaml: str) -> None:
        self.cfg, self.engine, self.config_yaml = cfg, engine, config_yaml
        self.directory = Path(cfg.out_dir) / "checkpoints"
        self.tokenizer = tokenizer_folder(cfg)

    def load(self, path: Path) -> dict[str, Any]:
        """Model and optimizer into the engine; returns the train state saved with them."""
        state = self.engine.load_checkpoint(path)
        log.info("resumed from %s at step %d", path, state["step"])
        return state

    def save(self, step: int, train_state: dict[str, Any]) -> Path:
        return self.engine.save_checkpoint(self.directory, step, train_state, self.config_yaml, self.tokenizer,
                                           self.cfg.checkpoint.keep)

    def poll(self) -> None:
        self.engine.poll()

    def wait(self) -> None:
        self.engine.wait()


def resume_path(cfg: Config, world_size: int) -> Optional[Path]:
    """The checkpoint this run of `world_size` processes continues from (checkpoint.resume), verified against its
    checksums and checked against the run, or None. Rank 0 decides (it reads the files and may move broken ones
    aside) and every rank gets its answer, or its error (collective)."""
    return on_rank0(lambda: _choose_resume(cfg, world_size))


def _choose_resume(cfg: Config, world_size: int) -> Optional[Path]:
    resume, directory = cfg.checkpoint.resume, Path(cfg.out_dir) / "checkpoints"
    if resume == "never":
        return None
    if resume == "auto":
        path = newest_intact_checkpoint(directory)
    else:
        path = verify_checkpoint(Path(resume))
        check_no_newer_checkpoints(path, resume, directory)
    if path is not None:
        check_resumable(cfg, path, world_size)
        check_same_model(cfg, path)
        check_trained_tokenizer(str(path), cfg.data.streams, cfg.model.vocab_size)
    return path


def initial_weights(cfg: Config) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint.init_from, for a run that starts from them (collective: rank 0
    verifies the files and checks the model, then every rank reads the weights, memory-mapped)."""
    def check() -> Path:
        try:
            path = verify_checkpoint(Path(cfg.checkpoint.init_from))
        except CheckpointError as err:  # named, so that the key to fix is clear among a run's settings
            raise CheckpointError(f"checkpoint.init_from: {err}") from None
        check_same_model(cfg, path, INIT_MODEL_CHANGES, "checkpoint.init_from")
        check_trained_tokenizer(str(path), cfg.data.streams, cfg.model.vocab_size)
        trained_base = saved_model(path).get("rope_base", cfg.model.rope_base)
        if trained_base != cfg.model.rope_base:
            log.info("model.rope_base: %s in %s, %s here: the weights are the same, the rotary angles of every "
                     "position change (RAT: of every chunk index)", trained_base, path, cfg.model.rope_base)
        return path

    path = on_rank0(check)
    log.info("starting from the weights of %s (checkpoint.init_from): new optimizer, schedule and data position",
             path)
    return trained_weights(path)


def trained_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The plain model's weights in checkpoint directory `checkpoint`, gathered or distributed (a DeepSpeed
    one must be consolidated first); memory-mapped, so that the optimizer state beside them is never read."""
    state = load_checkpoint(checkpoint, mmap=True)
    if state.get("engine") == "deepspeed":
        raise CheckpointError(
            f"{checkpoint} is a DeepSpeed checkpoint: consolidate it first with "
            f"`python -m ratpt.engines.deepspeed_checkpoint {checkpoint} OUT_DIR`, then use OUT_DIR/step_*")
    if is_distributed(state):  # every rank's shards: read the full tensors here
        return read_plain_state(checkpoint, optimizer=False)["model"]
    return state["model"]


def newest_intact_checkpoint(directory: Path) -> Optional[Path]:
    """The newest checkpoint in `directory` whose files match their checksums, moving the provably broken
    newer ones aside (`step_N.broken`); None if there is none. Refuses to return None after moving one:
    a run whose every checkpoint is broken must not silently start again from step 0."""
    moved = []
    for path in reversed(list_checkpoints(directory)):
        broken = checksum_mismatch(path)
        if broken is None:
            return path
        moved.append(set_aside(path))
        log.warning("checkpoint %s is broken (%s): moved it aside to %s; trying the one before it",
                    path, broken, moved[-1])
    if moved:
        raise CheckpointError(f"every checkpoint in {directory} is broken (moved aside: "
                              f"{', '.join(p.name for p in moved)}): start afresh with checkpoint.resume=never "
                              "(or another out_dir), or restore an intact copy")
    return None


def saved_model(checkpoint: Path) -> dict[str, Any]:
    """The model section of the config a checkpoint directory was written with ({} for a checkpoint
    written before checkpoints carried their config)."""
    saved_yaml = checkpoint / CONFIG_FILE
    return OmegaConf.to_container(OmegaConf.load(saved_yaml)).get("model", {}) if saved_yaml.is_file() else {}


CHECKPOINT_USES = {  # how a command came to a checkpoint -> what else may fix a refusal besides the overrides
    "checkpoint.resume": ", or train a new one (another out_dir, or checkpoint.resume=never)",
    "checkpoint.init_from": ", or start from a checkpoint of this model",
    "the checkpoint read": "",  # eval, export: the overrides are the only thing to change
}


def check_same_model(cfg: Config, checkpoint: Path, may_change: frozenset[str] = RESUMABLE_MODEL_CHANGES,
                     use: str = "checkpoint.resume") -> None:
    """Refuse to load the checkpoint directory `checkpoint` if it holds another model, naming the keys
    that differ beyond `may_change` (its weights would fail to load with a size mismatch, or, worse, load
    into a model they were not trained for); `use`, a key of CHECKPOINT_USES, names how the command came to
    it."""
    saved = saved_model(checkpoint)
    if not saved:
        return  # written before checkpoints carried their config: nothing to compare
    current = OmegaConf.to_container(OmegaConf.structured(cfg).model)
    changed = [f"model.{key}: {saved.get(key)!r} there, {value!r} here" for key, value in current.items()
               if key not in may_change and saved.get(key) != value]
    if changed:
        raise CheckpointError(f"{checkpoint} ({use}) holds another model ({'; '.join(changed)}): use the model it "
                              f"was trained with (drop those model.* overrides){CHECKPOINT_USES[use]}")


def check_resumable(cfg: Config, checkpoint: Path, world_size: int) -> None:
    """Refuse, before any engine is built, to resume the checkpoint directory `checkpoint` with another engine's
    state format (DeepSpeed's ZeRO partitions only DeepSpeed reads, and DeepSpeed reads nothing else), DeepSpeed's
    partitions on another number of processes than `world_size` (DeepSpeed cannot re-partition them), or one that
    holds weights alone (a consolidated DeepSpeed checkpoint: no optimizer, data position or RNG). The engines
    failed on each with a traceback (DeepSpeed only after its start-up)."""
    written_by_deepspeed = (checkpoint / DEEPSPEED_TAG).is_dir()
    consolidate = (f"consolidate it (`python -m ratpt.engines.deepspeed_checkpoint {checkpoint} OUT_DIR`) and start "
                   f"a new run from its weights with checkpoint.init_from=OUT_DIR{NEW_RUN}")
    if written_by_deepspeed and cfg.train.engine != "deepspeed":
        raise CheckpointError(f"{checkpoint} (checkpoint.resume) was written by train.engine=deepspeed, which alone "
                              f"resumes it: set train.engine=deepspeed, or {consolidate}")
    if written_by_deepspeed:
        partitions = len(list((checkpoint / DEEPSPEED_TAG).glob("*zero_pp_rank_*_optim_states.pt")))
        if partitions and partitions != world_size:
            raise CheckpointError(f"{checkpoint} (checkpoint.resume) holds DeepSpeed's ZeRO state partitioned over "
                                  f"{partitions} processes, which DeepSpeed resumes on as many only, and this run "
                                  f"has {world_size}: launch {partitions}, or {consolidate}")
        return
    if "data" not in load_checkpoint(checkpoint, mmap=True):
        raise CheckpointError(
            f"{checkpoint} (checkpoint.resume) holds model weights alone (a consolidated DeepSpeed checkpoint), no "
            f"optimizer state or data position to continue from: start a new run from them with "
            f"checkpoint.init_from={checkpoint}{NEW_RUN}")
    if cfg.train.engine == "deepspeed":
        raise CheckpointError(
            f"{checkpoint} (checkpoint.resume) was written by train.engine=megatron, which alone resumes it: set "
            f"train.engine=megatron, or start a new DeepSpeed run from its weights with "
            f"checkpoint.init_from={checkpoint}{NEW_RUN}")


def schedule_change(cfg: Config, checkpoint: Path, step: int) -> Optional[str]:
    """A note if resuming `checkpoint` at `step` changes the learning-rate schedule (train.steps,
    optimizer.lr or schedule.* differ from the run that wrote it), naming the keys; else None."""
    saved_yaml = checkpoint / CONFIG_FILE
    if not saved_yaml.is_file():
        return None
    saved = OmegaConf.to_container(OmegaConf.load(saved_yaml))
    current = OmegaConf.to_container(OmegaConf.structured(cfg))
    keys = [("train", "steps"), ("optimizer", "lr"), *(("schedule", key) for key in current["schedule"])]
    changed = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} there, {current[section][key]!r} here"
               for section, key in keys if saved.get(section, {}).get(key) != current[section][key]]
    if not changed:
        return None
    return (f"resuming {checkpoint} at step {step} with another learning-rate schedule ({'; '.join(changed)}): "
            f"the LR from step {step} on follows the new one")


def check_no_newer_checkpoints(checkpoint: Path, resume: str, ckpt_dir: Path) -> None:
    """Refuse an explicit resume (`resume`, resolved to the directory `checkpoint`) into a run folder
    that holds checkpoints newer than it (going back after a divergence, say): the run's checkpoints
    would interleave two histories, and a requeued job with the same arguments would go back again
    and lose what it trained since."""
    step = checkpoint_step(checkpoint)
    if step is None:
        return
    newer = [p.name for p in list_checkpoints(ckpt_dir) if checkpoint_step(p) > step]
    if newer:
        raise CheckpointError(
            f"checkpoint.resume={resume} is step {step}, but {ckpt_dir} holds newer checkpoints "
            f"({', '.join(newer)}): move those out of {ckpt_dir} (or write to another out_dir) to go back to "
            f"step {step}, or set checkpoint.resume=auto to continue from the newest")
