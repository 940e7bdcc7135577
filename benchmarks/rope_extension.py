"""Does a context extension need a larger RoPE base? A small RAT, extended with each base, on CPU.

RAT rotates queries and chunk summaries by the chunk index, so a run trained at 4K tokens (256
chunks of 16) and continued at 128K (8192 chunks) meets chunk positions 32 times further apart than
it ever saw. This measures, at a CPU's scale, whether raising `model.rope_base` for the extension
helps: a byte-level RAT is trained at --short tokens on CPython's documentation, then continued at
--long tokens from those weights (`ratpt train ... checkpoint.init_from=...`, the real command) once
per base in --bases and data order in --seeds, with the same steps. Validation loss at --long is
taken before the extension (the short model with each base, unchanged weights) and after it; at
--short too, to show what a new base costs the short context before it is trained. The spread over
--seeds says which differences between bases are more than the noise of one run. One JSON to --out.

    python benchmarks/rope_extension.py --out benchmarks/results/rope_extension.json
    (options: --short 256 --long 4096 --short-steps 300 --long-steps 40 --bases 10000,40000,160000
     --seeds 1234,1235)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ratpt.checkpoint import latest_checkpoint
from ratpt.model import build_model
from ratpt.parallel.process_group import init_distributed
from ratpt.train.checkpointer import trained_weights
from ratpt.train.commands import checkpoint_config
from ratpt.train.trainer import evaluate

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.vocab_size=257", "model.d_model=64", "model.n_layers=2", "model.head_dim=32", "model.chunk_size=16"]


def ratpt_train(data: Path, out_dir: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "ratpt", "train", str(REPO / "configs" / "tiny.yaml"), f"out_dir={out_dir}",
               f"data.streams=[{{path: {data}}}]", *MODEL, "eval.interval=0", "logging.interval=20",
               "logging.tensorboard=false", "checkpoint.interval=0", "train.compile=false", *overrides]
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})


def val_loss(run: Path, seq_len: int, base: float) -> float:
    """Validation loss per token of the run's newest weights at `seq_len` tokens with RoPE base `base`."""
    checkpoint = latest_checkpoint(run / "checkpoints")
    cfg = checkpoint_config(checkpoint, [f"data.seq_len={seq_len}", f"model.rope_base={base}",
                                         "eval.max_samples=64", "train.micro_batch=1"])
    model = build_model(cfg.model)
    model.load_state_dict(trained_weights(checkpoint))
    loss, _ = evaluate(model, cfg, init_distributed("cpu"))
    return round(loss, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=256, help="tokens per sequence of the first run")
    parser.add_argument("--long", type=int, default=4096, help="tokens per sequence of the extension")
    parser.add_argument("--short-steps", type=int, default=300)
    parser.add_argument("--long-steps", type=int, default=40)
    parser.add_argument("--bases", default="10000,40000,160000", help="RoPE bases of the extension; the first "
                                                                       "is the short run's")
    parser.add_argument("--seeds", default="1234,1235", help="data.seed of the extensions (data orders)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "rope_extension.json"))
    args = parser.parse_args()
    bases = [float(b) for b in args.bases.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        data, short = Path(tmp) / "pydoc", Path(tmp) / "short"
        subprocess.run([sys.executable, "-m", "data_prep", "tokenize", "pydoc", "--out", str(data), "--tokenizer",
                        "byte", "--val-fraction", "0.2"], cwd=REPO, check=True, capture_output=True)
        ratpt_train(data, short, f"data.seq_len={args.short}", f"train.steps={args.short_steps}",
                    "train.global_batch=16", "train.micro_batch=16", f"model.rope_base={bases[0]}")
        rows = []
        for base in bases:
            row = {"rope_base": base, "before": {"val_short": val_loss(short, args.short, base),
                                                 "val_long": val_loss(short, args.long, base)}, "after": {}}
            for seed in args.seeds.split(","):
                extended = Path(tmp) / f"long_{base:g}_{seed}"
                ratpt_train(data, extended, f"data.seq_len={args.long}", f"train.steps={args.long_steps}",
                            "train.global_batch=2", "train.micro_batch=2", "optimizer.lr=1e-3", f"data.seed={seed}",
                            "schedule.warmup_fraction=0.1", f"model.rope_base={base}", f"checkpoint.init_from={short}")
                row["after"][seed] = {"val_short": val_loss(extended, args.short, base),
                                      "val_long": val_loss(extended, args.long, base)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"date": datetime.date.today().isoformat(), "commit": os.environ.get("RATPT_COMMIT"),
              "device": f"cpu ({os.cpu_count()} threads)", "model": MODEL, "short": args.short, "long": args.long,
              "chunks": [args.short // 16, args.long // 16], "short_steps": args.short_steps,
              "long_steps": args.long_steps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
