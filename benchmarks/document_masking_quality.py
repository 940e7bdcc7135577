"""Document masking against none: one model, the same packed sequences and steps, validation loss side by side.

Trains configs/rat_125m.yaml (by default) through the trainer twice, with data.document_masking off and on,
on the standard library's sources cut at their top-level definitions and shuffled (quality.stdlib_corpus):
byte-tokenized pieces of ~2.8 KB on average (median ~0.7 KB), so that a sequence of 2048 packs several
documents that do not belong together. Every run sees the same batches in the same order; each is
evaluated as it was trained (masked or not) on the same held-out sequences at the end. Blocks run eagerly in
both (train.compile=false): what is compared is quality, not speed. Writes the per-step losses, final
training and validation losses to <out>.json and both curves to <out>.png (`--plot <out>.json` redraws it).

    python benchmarks/document_masking_quality.py                       # ~10M tokens per run
    python benchmarks/document_masking_quality.py --config configs/tiny.yaml --tokens 2e4 --set train.device=cpu \\
        --global-batch 8 --micro-batch 4 --seq-len 256 --eval-samples 16  # the code path on a CPU
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from quality import REPO, device_name, plot_losses, stdlib_corpus, train_run


def plot(result: dict, path: Path) -> None:
    labels = [f"data.document_masking={str(run['document_masking']).lower()}: validation {run['val_loss']:.4f}"
              for run in result["runs"]]
    plot_losses(result, labels, "without and with document masking", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "rat_125m.yaml")
    parser.add_argument("--tokens", type=float, default=1e7, help="training tokens per run (rounded up to steps)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=256, help="held-out sequences of the final evaluation")
    parser.add_argument("--set", action="append", default=[], help="one more config override key=value")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "document_masking_quality",
                        help="data and run folders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "document_masking_quality.json")
    parser.add_argument("--plot", type=Path, help="only draw the PNG of an existing JSON (beside it)")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    data = stdlib_corpus(args.work, pieces=True)
    tokens_per_step = args.global_batch * args.seq_len
    steps = math.ceil(args.tokens / tokens_per_step)
    runs = []
    for masking in (False, True):
        overrides = [f"name=document_masking_{masking}", f"data.seq_len={args.seq_len}", f"train.steps={steps}",
                     f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}",
                     "train.compile=false", f"eval.interval={steps}", f"eval.max_samples={args.eval_samples}",
                     f"data.document_masking={str(masking).lower()}", *args.set]
        runs.append({"document_masking": masking,
                     **train_run(args.config, data, args.work / f"run_masking_{masking}", overrides)})
    result = {"config": args.config.name, "device": device_name(), "torch": torch.__version__,
              "tokens": steps * tokens_per_step, "steps": steps, "tokens_per_step": tokens_per_step, "runs": runs,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    for run in runs:
        print(f"document_masking={run['document_masking']}: final training loss {run['final_loss']:.4f}, "
              f"validation loss {run['val_loss']:.4f}, {run['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
