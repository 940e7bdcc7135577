"""`ratpt export-hf`, `ratpt evaluate` and `ratpt evaluate-long`: thin command-line shells over ratpt.hf."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ratpt.errors import raise_first_failed
from ratpt.files import check_new_folder, check_output_file, check_writable_place
from ratpt.model.pretrained import check_device

log = logging.getLogger("ratpt")


def existing_folder(path: str) -> str:
    """argparse's type of a model folder: checked while parsing, before transformers, lm-eval and torch load
    (5 to 12 seconds), so that a mistyped path fails at once; what the folder holds is checked when it loads."""
    if not Path(path).is_dir():
        what = "is a file: name the folder that holds it" if Path(path).exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"pretrained folder {path} {what}")
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
    from ratpt.hf.export import export_hf
    from ratpt.model.pretrained import TOKENIZER, load_pretrained

    out = Path(args.out)
    check_new_folder(out)
    model, cfg = load_pretrained(args.model_dir)
    tokenizer = Path(args.model_dir) / TOKENIZER
    export_hf(model, cfg, out, tokenizer if tokenizer.is_dir() else None)
    log.info("exported %s to %s (Hugging Face)", args.model_dir, out)
    return 0


def check_evaluate(args: argparse.Namespace) -> list[str]:
    """The task names, once every flag that lm-eval would take silently or reject deep inside (or an --out
    written only after hours of evaluation) has been checked, naming the flag."""
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    checks = ((tasks, "--tasks names no task"),
              (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
              (args.limit is None or args.limit > 0, f"--limit must be > 0 (a fraction if < 1), got {args.limit}"),
              (args.num_fewshot is None or args.num_fewshot >= 0, f"--num-fewshot must be >= 0, got {args.num_fewshot}"),
              (args.max_length >= 1, f"--max-length must be >= 1, got {args.max_length}"),
              (args.bootstrap_iters >= 0, f"--bootstrap-iters must be >= 0 (0: none), got {args.bootstrap_iters}"),
              (args.include_path is None or Path(args.include_path).is_dir(),
               f"--include-path {args.include_path} is not a folder: name the folder of your task YAML files"))
    raise_first_failed(checks)
    if args.device is not None:
        check_device(args.device, "--device")
    if args.out:
        check_output_file(Path(args.out))
    return tasks


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from lm_eval.utils import handle_non_serializable, make_table

    from ratpt.hf.lm_eval_model import evaluate_tasks

    tasks = check_evaluate(args)
    try:
        results = evaluate_tasks(args.model_dir, tasks, batch_size=args.batch_size, limit=args.limit,
                                 num_fewshot=args.num_fewshot, include_path=args.include_path, device=args.device,
                                 dtype=args.dtype, max_length=args.max_length, bootstrap_iters=args.bootstrap_iters)
    except ConnectionError as error:  # datasets' message names the hub repository it could not reach
        raise ValueError(f"lm-eval could not fetch a task's data: {error}. Run where the Hugging Face hub is "
                         f"reachable, or with the datasets already in HF_HOME (HF_DATASETS_OFFLINE=1), or give "
                         f"tasks over local files with --include-path") from None
    print(make_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    return 0


def number_list(text: str, kind: type, flag: str, example: str) -> list:
    """The comma-separated numbers of `flag`, at least one, each parsed by `kind` (int or float)."""
    values = []
    for value in (part.strip() for part in text.split(",")):
        if value:
            try:
                values.append(kind(value))
            except ValueError:
                raise ValueError(f"{flag} {text!r}: {value!r} is not a{'n integer' if kind is int else ' number'}; "
                                 f"give comma-separated values, e.g. {flag} {example}") from None
    if not values:
        raise ValueError(f"{flag} names no value; give comma-separated values, e.g. {flag} {example}")
    return values


def run_evaluate_long(args: argparse.Namespace) -> int:
    import torch

    from ratpt.hf.convert import load_model_dir
    from ratpt.hf.passkey import evaluate_passkey, write_report

    lengths = number_list(args.lengths, int, "--lengths", "1024,4096")
    depths = number_list(args.depths, float, "--depths", "0,0.5,1")
    raise_first_failed((
        (min(lengths) >= 1, f"--lengths must be positive token counts, got {min(lengths)}"),
        (all(0 <= depth <= 1 for depth in depths),
         f"--depths must be fractions of the haystack in [0, 1], got {args.depths}"),
        (args.trials >= 1, f"--trials must be >= 1, got {args.trials}"),
        (args.piece >= 1, f"--piece must be >= 1 (a multiple of the chunk size), got {args.piece}")))
    if args.device is not None:
        check_device(args.device, "--device")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: name the folder for passkey.json and passkey.png")
    check_writable_place(Path(args.out), inside=True)
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
