"""`ratpt convert reference|hf`: bring a model of another implementation into ratpt's pretrained format.

    reference   a checkpoint of the paper's public code (ratpt.model.convert): the shapes cannot tell
                L, d, G, the layer pattern and W; its stored run config does, else flags do
    hf          a Hugging Face folder of `ratpt export --format hf` (ratpt.hf.convert): it states its config
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ratpt.files import check_new_folder
from ratpt.model.config import MIXERS

log = logging.getLogger(__name__)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="import a checkpoint of another implementation")
    parser.add_argument("source", choices=["reference", "hf"],
                        help="checkpoint format: reference (CLAIRE-Labo/RAT) or hf (a Hugging Face folder of ratpt's)")
    parser.add_argument("checkpoint", help="the reference .pt file, or the Hugging Face folder")
    parser.add_argument("--out", required=True,
                        help="output folder (model.safetensors + config.yaml); must not exist or be empty")
    # reference: a file with the public trainers' run config states these; a flag given must agree with it
    parser.add_argument("--chunk-size", type=int, help="RAT chunk length L (reference without a run config: required)")
    parser.add_argument("--head-dim", type=int, help="head width d (reference without a run config: required)")
    parser.add_argument("--ngroups", type=int, help="RAT query/key groups G (default 2)")
    parser.add_argument("--mixers", help=f"comma-separated pattern cycled over layers, from {','.join(MIXERS)} "
                                         "(default rat; the paper's hybrid is rat,swa)")
    parser.add_argument("--window", type=int, help="sliding window W (default 1024)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a checkpoint that holds non-tensor objects (only for trusted files)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_new_folder(Path(args.out))  # before a multi-GB checkpoint loads; an export is never replaced
    if args.source == "hf":  # a Hugging Face folder states its whole config: no flags to check
        from ratpt.hf.convert import convert_hf

        out = convert_hf(args.checkpoint, args.out)
        print(f"converted {args.checkpoint} (Hugging Face) -> {out}")
        return 0
    from ratpt.model import build_model
    from ratpt.model.convert import (REFERENCE_CONFIG, convert_reference_state, load_reference_checkpoint,
                                     reference_settings)
    from ratpt.model.pretrained import save_pretrained

    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()] if args.mixers is not None else None
    if mixers == []:  # before the checkpoint loads; left as given, it would fall back to rat without a word
        raise ValueError(f"--mixers {args.mixers!r} names no mixer: give a comma-separated pattern from "
                         f"{','.join(MIXERS)}, e.g. --mixers rat,swa")
    ckpt = load_reference_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    if ckpt.ignored:
        log.info("ignoring %s of %s: training state; only the weights and the run config are imported",
                 ", ".join(ckpt.ignored), args.checkpoint)
    flags = dict(chunk_size=args.chunk_size, head_dim=args.head_dim, ngroups=args.ngroups, mixers=mixers,
                 window=args.window)
    converted, cfg = convert_reference_state(ckpt.state, **reference_settings(flags, ckpt.run_config))
    model = build_model(cfg)
    model.load_state_dict(converted)
    metadata = {REFERENCE_CONFIG: ckpt.run_config} if ckpt.run_config is not None else None
    out = save_pretrained(model, cfg, args.out, metadata=metadata)
    print(f"converted {args.checkpoint}: {cfg.n_layers} layers ({','.join(cfg.mixers)}), "
          f"d_model {cfg.d_model}, vocab {cfg.vocab_size} -> {out}"
          + (f" (the run config kept in {REFERENCE_CONFIG})" if metadata else ""))
    return 0
