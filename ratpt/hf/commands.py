"""`ratpt export-hf`, `ratpt evaluate` and `ratpt evaluate-long`: thin command-line shells over ratpt.hf."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("ratpt")


def existing_folder(path: str) -> str:
    """argparse's type of a model folder: checked while parsing, before transformers, lm-eval and torch load
    (5 to 12 seconds), so that a mistyped path fails at once; what the folder holds is checked when it loads."""
    if not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"pretrained folder {path} does not exist")
    return path


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-hf", help="write a pretrained folder as a Hugging Face transformers folder",
        description="Write EXPORT_DIR (from `ratpt export`) as a folder that transformers loads with "
                    "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) and AutoTokenizer.",
    )
    parser.add_argument("model_dir", type=existing_folder,
                        help="a pretrained folder written by `ratpt export` or `ratpt convert`")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.set_defaults(func=run_export_hf)

    parser = subparsers.add_parser(
        "evaluate", help="lm-evaluation-harness tasks on a pretrained model",
        description="Run lm-eval TASKS on MODEL_DIR (a `ratpt export` folder or a Hugging Face RAT folder) with "
                    "ratpt's own model and tokenizer. Task data comes from the Hugging Face hub unless the "
                    "tasks are local YAML files under --include-path.",
    )
    parser.add_argument("model_dir", type=existing_folder,
                        help="a pretrained folder (ratpt export, convert or export-hf)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--max-length", type=int, default=4096, help="tokens of context kept per request")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="resamplings for the standard errors (0: none)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.set_defaults(func=run_evaluate)

    parser = subparsers.add_parser(
        "evaluate-long", help="passkey retrieval at long context (no download)",
        description="Hide a random number at each depth of a haystack of CPython's documentation, in prompts "
                    "of each length (tokens), and ask MODEL_DIR for it; writes passkey.json and passkey.png.",
    )
    parser.add_argument("model_dir", type=existing_folder,
                        help="a pretrained folder (ratpt export, convert or export-hf)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated needle depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=5, help="random keys per (length, depth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--piece", type=int, default=8192,
                        help="prompt tokens prefilled at a time (a multiple of the chunk size; default 8192)")
    parser.add_argument("--out", default="passkey", help="folder for passkey.json and passkey.png")
    parser.set_defaults(func=run_evaluate_long)


def run_export_hf(args: argparse.Namespace) -> int:
    from ratpt.files import check_new_folder
    from ratpt.hf.export import export_hf
    from ratpt.model.pretrained import TOKENIZER, load_pretrained

    out = Path(args.out)
    check_new_folder(out)
    model, cfg = load_pretrained(args.model_dir)
    tokenizer = Path(args.model_dir) / TOKENIZER
    export_hf(model, cfg, out, tokenizer if tokenizer.is_dir() else None)
    log.info("exported %s to %s (Hugging Face)", args.model_dir, out)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from lm_eval.utils import handle_non_serializable, make_table

    from ratpt.hf.lm_eval_model import evaluate_tasks

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    results = evaluate_tasks(args.model_dir, tasks, batch_size=args.batch_size, limit=args.limit,
                             num_fewshot=args.num_fewshot, include_path=args.include_path, device=args.device,
                             dtype=args.dtype, max_length=args.max_length, bootstrap_iters=args.bootstrap_iters)
    print(make_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return 0


def run_evaluate_long(args: argparse.Namespace) -> int:
    import torch

    from ratpt.hf.convert import load_model_dir
    from ratpt.hf.passkey import evaluate_passkey, write_report

    lengths = [int(value) for value in args.lengths.split(",") if value.strip()]
    depths = [float(value) for value in args.depths.split(",") if value.strip()]
    if not lengths or not depths or args.trials < 1:
        raise ValueError("--lengths and --depths must name at least one value and --trials be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_dir(args.model_dir, device)
    model = model.to(getattr(torch, args.dtype)).eval()
    results = evaluate_passkey(model, tokenizer, lengths, depths, trials=args.trials, seed=args.seed, piece=args.piece)
    json_path, png_path = write_report(results, args.out)
    for length in lengths:
        row = " ".join(f"{results['accuracy'][str(length)][str(depth)]:.2f}" for depth in depths)
        print(f"length {length:>7}: {row}   (depths {args.depths})")
    print(f"wrote {json_path} and {png_path}")
    return 0
