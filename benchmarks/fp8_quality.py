"""FP8 against bf16 training quality: one model, the same data and steps, loss curves side by side.

Trains configs/rat_125m.yaml (by default) through the trainer (ratpt.train.trainer: compiled blocks, bf16
autocast over fp32 masters, AdamW, cosine) once with train.fp8=off and once per --recipes entry, on
real text that needs no network: the Python standard library's own sources (the running interpreter's,
one document per .py file, in path order), byte-tokenized by data_prep. Every run sees the same
batches in the same order (the data order has its own seed), so the curves differ only by the FP8
GEMMs. Writes the per-step losses, the gap of the final loss (mean of the last 10% of steps) to bf16's,
the validation loss at the end (held-out sequences: a training loss alone could hide a wrongly computed
loss) and the wall time per run to <out>.json, and both curves to <out>.png.

    python benchmarks/fp8_quality.py                                  # ~20M tokens, bf16 vs tensorwise
    python benchmarks/fp8_quality.py --recipes tensorwise,rowwise --tokens 2e7
    python benchmarks/fp8_quality.py --fp32-reference        # and an fp32 run: which of bf16 and FP8 drifts
    python benchmarks/fp8_quality.py --config configs/tiny.yaml --tokens 3e4 --emulate --set train.device=cpu \\
        --global-batch 8 --micro-batch 4 --seq-len 256    # the code path on a CPU, in a minute
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from quality import REPO, device_name, plot_losses, stdlib_corpus, train_run


def fp8_run(args: argparse.Namespace, data: Path, recipe: str, steps: int, precision: str = "auto") -> dict:
    """One run with train.fp8 = `recipe` ("off": bf16) and train.precision = `precision`, the rest as the
    command line says."""
    label = recipe if precision == "auto" else f"{recipe}_{precision}"
    overrides = [
        f"name=fp8_quality_{label}", f"data.seq_len={args.seq_len}", f"train.steps={steps}",
        f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}", f"train.fp8={recipe}",
        f"train.precision={precision}", f"eval.interval={steps}", f"eval.max_samples={args.eval_samples}",
        *(["train.fp8_emulate=true"] if args.emulate and recipe != "off" else []), *args.set,
    ]
    return {"fp8": recipe, "precision": precision, "label": label,
            **train_run(args.config, data, args.work / f"run_{label}", overrides)}


def plot(result: dict, path: Path) -> None:
    labels = [f"train.fp8={run['fp8']}" + (f", train.precision={run['precision']}"
                                           if run.get("precision", "auto") != "auto" else "")
              + f": final {run['final_loss']:.4f}" for run in result["runs"]]
    plot_losses(result, labels, "bf16 against FP8", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "rat_125m.yaml")
    parser.add_argument("--tokens", type=float, default=2e7, help="training tokens per run (rounded up to steps)")
    parser.add_argument("--recipes", default="tensorwise", help="train.fp8 recipes to run beside bf16")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--emulate", action="store_true", help="FP8 runs emulated (train.fp8_emulate: CPU)")
    parser.add_argument("--fp32-reference", action="store_true",
                        help="one more run in fp32 (train.precision=fp32), the reference of both bf16 and FP8")
    parser.add_argument("--eval-samples", type=int, default=256,
                        help="held-out sequences of each run's final evaluation (its validation loss)")
    parser.add_argument("--set", action="append", default=[], help="one more config override key=value")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "fp8_quality", help="data and run folders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fp8_quality",
                        help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    data = stdlib_corpus(args.work)
    tokens_per_step = args.global_batch * args.seq_len
    steps = math.ceil(args.tokens / tokens_per_step)
    runs = [fp8_run(args, data, recipe, steps) for recipe in ["off", *args.recipes.split(",")]]
    bf16 = runs[0]["final_loss"]
    for run in runs[1:]:
        run["final_gap_to_bf16"] = (run["final_loss"] - bf16) / bf16
    if args.fp32_reference:
        runs.append(fp8_run(args, data, "off", steps, "fp32"))
        for run in runs[:-1]:
            run["final_gap_to_fp32"] = (run["final_loss"] - runs[-1]["final_loss"]) / runs[-1]["final_loss"]
    result = {"config": args.config.name, "device": device_name(),
              "torch": torch.__version__, "tokens": steps * tokens_per_step, "steps": steps,
              "tokens_per_step": tokens_per_step, "runs": runs,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for run in runs:
        gaps = [f"{100 * run[key]:+.2f}% against {key.rsplit('_', 1)[1]}"
                for key in ("final_gap_to_bf16", "final_gap_to_fp32") if key in run]
        gap = f" ({', '.join(gaps)})" if gaps else ""
        print(f"{run['label']:>10}: final loss {run['final_loss']:.4f}{gap}, validation loss {run['val_loss']:.4f}, "
              f"{run['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
