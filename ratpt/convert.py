"""`ratpt convert reference|hf`: bring a model of another implementation into ratpt's pretrained format.

    reference   a checkpoint of the paper's public code (ratpt.model.convert): the shapes cannot tell
                L, d and which layers are windowed, so flags do
    hf          a Hugging Face folder of `ratpt export --format hf` (ratpt.hf.convert): it states its config
"""
from __future__ import annotations

import argparse

from ratpt.model.config import MIXERS


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="import a checkpoint of another implementation")
    parser.add_argument("source", choices=["reference", "hf"],
                        help="checkpoint format: reference (CLAIRE-Labo/RAT) or hf (a Hugging Face folder of ratpt's)")
    parser.add_argument("checkpoint", help="the reference .pt file, or the Hugging Face folder")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.yaml)")
    parser.add_argument("--chunk-size", type=int, help="RAT chunk length L (reference: required)")
    parser.add_argument("--head-dim", type=int, help="head width d (reference: required)")
    parser.add_argument("--ngroups", type=int, default=2, help="RAT query/key groups G (default 2)")
    parser.add_argument("--mixers", default="rat",
                        help=f"comma-separated pattern cycled over layers, from {','.join(MIXERS)} "
                             "(default rat; the paper's hybrid is rat,swa)")
    parser.add_argument("--window", type=int, default=1024, help="sliding window W (default 1024)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a checkpoint that holds non-tensor objects (only for trusted files)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.source == "hf":  # a Hugging Face folder states its whole config: no flags to check
        from ratpt.hf.convert import convert_hf

        out = convert_hf(args.checkpoint, args.out)
        print(f"converted {args.checkpoint} (Hugging Face) -> {out}")
        return 0
    from ratpt.model import build_model
    from ratpt.model.convert import convert_reference_state, load_reference_state
    from ratpt.model.pretrained import save_pretrained

    if args.chunk_size is None or args.head_dim is None:
        raise ValueError("convert reference needs --chunk-size and --head-dim (the checkpoint cannot tell them)")
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    state = load_reference_state(args.checkpoint, allow_pickle=args.allow_pickle)
    converted, cfg = convert_reference_state(state, args.chunk_size, args.head_dim, args.ngroups,
                                             mixers, args.window)
    model = build_model(cfg)
    model.load_state_dict(converted)
    out = save_pretrained(model, cfg, args.out)
    print(f"converted {args.checkpoint}: {cfg.n_layers} layers ({','.join(cfg.mixers)}), "
          f"d_model {cfg.d_model}, vocab {cfg.vocab_size} -> {out}")
    return 0
