"""Whether a training step fits a GPU, counted on a CPU: the memory a step holds at its peak, from fake tensors.

A 131072-token step without activation checkpointing takes minutes to compile before it runs out of
memory, and a GPU to try it on. This counts it instead: the model runs forward (fused head and loss,
as training runs it) and backward under torch's FakeTensorMode, which carries shapes and dtypes but
no data, while torch.distributed's MemTracker follows every tensor alive. The layers of a model are
alike, so a copy with one layer and a copy with two give the bytes one layer adds at the peak (a
hybrid's: one and two periods of its `model.mixers` pattern); the configured depth is extrapolated
from them (a full-depth count at 131072 tokens takes minutes of
Python). That holds where the layers' activations make the peak, as at long sequences; a tiny model
whose head makes it would need a direct count. Weights, gradients and AdamW's moments are 16 bytes per parameter, the one-process engine's
fp32 weights and states.

What is counted is the eager step of the PyTorch reference ops in bf16, activation checkpointing as
`ratpt train` applies it (train.activation_checkpointing). The Triton RAT kernels keep fewer
intermediates than the reference and torch.compile may recompute some, so for RAT the count bounds
the GPU's peak from above; what the projections and feed-forward layers keep is the same in both.

    python benchmarks/activation_memory.py --configs rat_1p3b,attention_1p3b --seq-len 131072 \
        --out benchmarks/results/activation_memory.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from ratpt.config import Config, load_config
from ratpt.engines.compile import prepare_model
from ratpt.model import build_model

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
STATE_BYTES_PER_PARAM = 16  # fp32 weight, gradient and AdamW's two moments


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in `dtype`: a fake module cannot be cast after it is built."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def step_peak_bytes(cfg: Config, batch: int = 1) -> int:
    """Bytes alive at the peak of one forward and backward of `cfg`'s model on `batch` sequences, without
    parameters and gradients (the fp32 states, counted apart): what the step adds to them."""
    with default_dtype(torch.bfloat16), FakeTensorMode():
        model = build_model(cfg.model)
        prepare_model(model, cfg, torch.device("cpu"))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len))
            model(tokens, labels=tokens).backward()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
    return sum(v for kind, v in peak.items() if getattr(kind, "value", "Total") not in ("Total", "Parameter", "Gradient"))


def count(config: str, seq_len: int, checkpointing: bool, overrides: list[str]) -> dict:
    """The step's peak at `config`'s depth, from copies with one and two periods of its mixer pattern."""
    settings = [f"data.seq_len={seq_len}", f"train.activation_checkpointing={str(checkpointing).lower()}",
                "train.compile=false", "model.kernels=torch", *overrides]
    cfg = load_config(REPO / "configs" / f"{config}.yaml", settings)
    period = len(cfg.model.mixers)
    if cfg.model.n_layers % period:
        raise ValueError(f"{config}: model.n_layers={cfg.model.n_layers} is not a whole number of periods of "
                         f"model.mixers={cfg.model.mixers}; the count extrapolates by whole periods")
    one, two = (step_peak_bytes(load_config(REPO / "configs" / f"{config}.yaml", [*settings, f"model.n_layers={n}"]))
                for n in (period, 2 * period))
    per_layer = (two - one) / period
    activations = one + (cfg.model.n_layers - period) * per_layer
    with FakeTensorMode():
        params = sum(p.numel() for p in build_model(cfg.model).parameters())
    state = params * STATE_BYTES_PER_PARAM
    return {"config": config, "seq_len": seq_len, "activation_checkpointing": checkpointing,
            "n_layers": cfg.model.n_layers, "per_layer_gib": round(per_layer / GIB, 3),
            "step_gib": round(activations / GIB, 2), "states_gib": round(state / GIB, 2),
            "total_gib": round((activations + state) / GIB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="rat_1p3b,attention_1p3b", help="names under configs/, comma-separated")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--set", action="append", default=[], help="extra ratpt config overrides, key=value")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "activation_memory.json"))
    args = parser.parse_args()
    rows = []
    for config in args.configs.split(","):
        for checkpointing in (False, True):
            rows.append(count(config, args.seq_len, checkpointing, args.set))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(),
                                          "commit": os.environ.get("RATPT_COMMIT"), "torch": torch.__version__,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
