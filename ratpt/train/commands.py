"""`ratpt train`, `ratpt eval` and `ratpt export`: thin command-line shells over the library."""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from ratpt.config import Config, load_config
from ratpt.files import check_new_folder
from ratpt.checkpoint import (CONFIG_FILE, TOKENIZER_DIR, CheckpointError, resolve_checkpoint,
                              verify_checkpoint)

log = logging.getLogger("ratpt")


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train", help="pretrain a model from a YAML config",
        description="Pretrain from CONFIG (a YAML file under configs/) with key=value overrides, "
                    "e.g. `ratpt train configs/tiny.yaml train.steps=100`. Resumes automatically "
                    "from the newest checkpoint in <out_dir>/checkpoints.",
    )
    train_parser.add_argument("config", help="YAML config file")
    train_parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    train_parser.set_defaults(func=run_train)

    eval_parser = subparsers.add_parser(
        "eval", help="validation loss and perplexity of a checkpoint",
        description="Evaluate a training checkpoint on the validation split of its data "
                    "(overridable with key=value, e.g. eval.max_samples=64).",
    )
    eval_parser.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run folder (newest checkpoint)")
    eval_parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    eval_parser.set_defaults(func=run_eval)

    export_parser = subparsers.add_parser(
        "export", help="consolidate a checkpoint into safetensors + config for generation",
        description="Write one model.safetensors, config.yaml and the tokenizer into OUT, "
                    "loadable by ratpt.load_pretrained and `ratpt generate OUT`.",
    )
    export_parser.add_argument("checkpoint", help="a step_XXXXXXXX directory, or a run folder (newest checkpoint)")
    export_parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    export_parser.add_argument("--no-tokenizer", action="store_true",
                               help="export a checkpoint that has no tokenizer folder (generate then needs "
                                    "--tokenizer)")
    export_parser.add_argument("--format", choices=["ratpt", "hf"], default="ratpt",
                               help="ratpt: for ratpt.load_pretrained and `ratpt generate`; hf: a Hugging Face "
                                    "transformers folder (docs/hf.md)")
    export_parser.set_defaults(func=run_export)


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # first: a mistake in it is told before seconds of imports
    from ratpt.train.trainer import train

    result = train(cfg)
    if result.stopped_early:
        log.info("stopped at step %d on request; resume with the same command", result.step)
    return 0


def checkpoint_config(checkpoint: Path, overrides: list[str] | None = None) -> Config:
    """The run config saved in a checkpoint, with optional overrides."""
    return load_config(resolve_checkpoint(checkpoint) / CONFIG_FILE, overrides)


def load_trained_model(checkpoint: Path, cfg: Config):
    """The plain model of a gathered or distributed checkpoint (a DeepSpeed one must be consolidated first),
    its files verified against their checksums, its model checked against `cfg.model`, and its weights against
    the model built from it (a config.yaml edited in a checkpoint without checksums would otherwise fail in
    torch's load_state_dict with a traceback)."""
    from ratpt.model import build_model
    from ratpt.model.pretrained import load_matching_state
    from ratpt.train.checkpointer import check_same_model, trained_weights

    checkpoint = verify_checkpoint(checkpoint)
    check_same_model(cfg, checkpoint, use="the checkpoint read")
    model = build_model(cfg.model)
    load_matching_state(model, trained_weights(checkpoint), checkpoint, checkpoint / CONFIG_FILE)
    return model


def run_eval(args: argparse.Namespace) -> int:
    from ratpt.data.dataset import check_trained_tokenizer
    from ratpt.parallel.mesh import leave_distributed
    from ratpt.parallel.process_group import init_distributed
    from ratpt.train.trainer import evaluate

    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    cfg = checkpoint_config(checkpoint, args.overrides)
    ctx = init_distributed(cfg.train.device)
    check_trained_tokenizer(str(checkpoint), cfg.data.streams, cfg.model.vocab_size)
    model = load_trained_model(checkpoint, cfg).to(ctx.device)
    loss, sequences = evaluate(model, cfg, ctx)
    leave_distributed()
    print(f"{checkpoint}: val loss {loss:.4f} | val ppl {math.exp(min(loss, 50)):.2f} | {sequences} sequences")
    return 0


def run_export(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    out = Path(args.out)
    check_new_folder(out)
    cfg = checkpoint_config(checkpoint)
    model = load_trained_model(checkpoint, cfg)
    tokenizer = checkpoint / TOKENIZER_DIR
    if not tokenizer.is_dir() and not args.no_tokenizer:
        raise CheckpointError(f"{checkpoint} has no {TOKENIZER_DIR}/ folder (its training data had none), so the "
                              f"export could not turn text into tokens: `ratpt generate` would fail on it. Pass "
                              f"--no-tokenizer to export the weights alone")
    if args.format == "hf":  # NOTE: imported when asked: transformers takes seconds to import
        from ratpt.hf.export import export_hf as write
    else:
        from ratpt.model.pretrained import save_pretrained as write
    write(model, cfg.model, out, tokenizer if tokenizer.is_dir() else None)
    log.info("exported %s to %s", checkpoint, out)
    return 0
