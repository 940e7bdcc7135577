"""`ratpt export-hf`, `ratpt convert hf` (through ratpt.model.convert), `ratpt evaluate` and
`ratpt evaluate-long`: thin command-line shells over ratpt.hf."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ratpt")


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-hf", help="write a pretrained folder as a Hugging Face transformers folder",
        description="Write EXPORT_DIR (from `ratpt export`) as a folder that transformers loads with "
                    "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) and AutoTokenizer.",
    )
    parser.add_argument("model_dir", help="a pretrained folder written by `ratpt export` or `ratpt convert`")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.set_defaults(func=run_export_hf)


def run_export_hf(args: argparse.Namespace) -> int:
    from ratpt.hf.export import export_hf
    from ratpt.model.pretrained import TOKENIZER, load_pretrained

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export folder {out} is not empty: choose a new --out or remove it")
    model, cfg = load_pretrained(args.model_dir)
    tokenizer = Path(args.model_dir) / TOKENIZER
    export_hf(model, cfg, out, tokenizer if tokenizer.is_dir() else None)
    log.info("exported %s to %s (Hugging Face)", args.model_dir, out)
    return 0


def run_convert_hf(args: argparse.Namespace) -> int:
    """`ratpt convert hf DIR --out OUT`."""
    from ratpt.hf.convert import convert_hf

    out = convert_hf(args.checkpoint, args.out)
    print(f"converted {args.checkpoint} (Hugging Face) -> {out}")
    return 0
