"""What the training-quality comparisons share (fp8_quality.py, document_masking_quality.py): real text that
needs no network, and one training run through the trainer whose losses they compare.

The corpus is the Python standard library's own sources (the running interpreter's, in path order),
byte-tokenized by data_prep: one document per .py file, or (`pieces`) each file cut at its top-level
definitions and the pieces shuffled, so that a sequence packs many documents that do not belong together,
as web text does.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ratpt.config import load_config
from ratpt.train import trainer

REPO = Path(__file__).resolve().parents[1]


def stdlib_corpus(work: Path, pieces: bool = False) -> Path:
    """The standard library's .py sources, byte-tokenized (once per --work folder); returns the data folder."""
    name = "stdlib_pieces" if pieces else "stdlib"
    data = work / f"{name}_bytes"
    if (data / "train").exists():
        return data
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a test fixture in another encoding: not text for this corpus
        texts += [p for p in text.split("\n\n\n") if p.strip()] if pieces else [text]
    if pieces:
        random.Random(0).shuffle(texts)
    docs = work / f"{name}.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    subprocess.run([sys.executable, "-m", "data_prep", "tokenize", str(docs), "--tokenizer", "byte",
                    "--out", str(data), "--val-fraction", "0.01", "--workers", "4"], check=True, cwd=REPO)
    return data


def train_run(config: Path, data: Path, out_dir: Path, overrides: list[str]) -> dict:
    """One fresh run of `config` on `data` (vocabulary 257 bytes) with `overrides`, evaluation and
    checkpoints off unless they say otherwise: its per-step losses, final loss (mean of the last 10% of
    steps), validation loss (None without evaluation) and wall time."""
    shutil.rmtree(out_dir, ignore_errors=True)  # never resume an earlier run of the same name
    cfg = load_config(config, [f"out_dir={out_dir}", f"data.streams=[{{path: {data}}}]", "model.vocab_size=257",
                               "eval.interval=0", "checkpoint.interval=0", "logging.interval=10",
                               "logging.tensorboard=false", *overrides])
    torch._dynamo.reset()  # each run compiles its own blocks
    started = time.perf_counter()
    result = trainer.train(cfg)
    seconds = time.perf_counter() - started
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return {"losses": result.losses, "final_loss": sum(tail) / len(tail), "val_loss": result.val_loss,
            "wall_s": seconds, "tokens_per_s_with_compile": cfg.train.steps * cfg.train.global_batch *
            cfg.data.seq_len / seconds}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def plot_losses(result: dict, labels: list[str], title: str, path: Path) -> None:
    """Each run's training loss per step (labels[i] names result["runs"][i]) in one PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label in zip(result["runs"], labels):
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], label=label, linewidth=1)
    ax.set_xlabel(f"step ({result['tokens_per_step']} tokens each)")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title(f"{result['config']}: {title}, {result['tokens'] / 1e6:.3g}M tokens, {result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
