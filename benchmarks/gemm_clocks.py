"""Why GEMMs run slower inside a compiled training step than alone: clocks, power and shapes.

The step profile (benchmarks/profile_step.py) shows the matmuls of a compiled RAT-1.3B step at a
lower rate than eager ones. Two explanations are measured here, side by side in one process:
  clocks   the GPU's SM clock, power draw and throttle reasons (NVML, sampled every 20 ms in a
           thread) while (a) one bf16 GEMM of the step's largest shape runs back to back, (b) the
           same GEMM with idle gaps, (c) eager and (d) compiled training steps run back to back
  shapes   the same GEMM in the layouts the backward uses (A·B, A·Bᵀ, Aᵀ·B), each alone
A compiled step keeps the GPU busier than an eager one; if the clock falls with it (power cap),
the GEMMs slow down with no change of kernel.

    python benchmarks/gemm_clocks.py --out benchmarks/results/gemm_clocks.json [--micro-batch 4]
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch

from train import build_step

THROTTLE_REASONS = {  # NVML clocks-event reason bits that lower the clock
    0x2: "applications clocks", 0x4: "sw power cap", 0x8: "hw slowdown", 0x20: "sw thermal",
    0x40: "hw thermal", 0x80: "hw power brake",
}


class ClockSampler:
    """NVML samples of SM clock (MHz), power (W) and throttle reasons while a `with` block runs."""

    def __init__(self, period_s: float = 0.02) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle, self.period = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device()), period_s
        self.samples: list[tuple[int, float, int]] = []

    def __enter__(self) -> "ClockSampler":
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        n = self.nvml
        while not self._stop.is_set():
            self.samples.append((n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM),
                                 n.nvmlDeviceGetPowerUsage(self.handle) / 1000,
                                 n.nvmlDeviceGetCurrentClocksEventReasons(self.handle)))
            time.sleep(self.period)

    def summary(self) -> dict:
        clocks, power, reasons = zip(*self.samples) if self.samples else ((0,), (0.0,), (0,))
        seen = {name: round(sum(bool(r & bit) for r in reasons) / len(reasons), 2)
                for bit, name in THROTTLE_REASONS.items() if any(r & bit for r in reasons)}
        return {"sm_clock_mhz": round(sum(clocks) / len(clocks)), "sm_clock_min_mhz": min(clocks),
                "power_w": round(sum(power) / len(power)), "throttled_share": seen}


def timed(fn, seconds: float, gap_s: float = 0.0) -> tuple[float, int]:
    """Seconds per call of fn (CUDA-synchronised), called for about `seconds`, with `gap_s` of idle between calls."""
    fn()
    torch.cuda.synchronize()
    calls, busy, end = 0, 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        busy += time.perf_counter() - start
        calls += 1
        if gap_s:
            time.sleep(gap_s)
    return busy / calls, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4, help="of the training steps (eager must fit too)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm_clocks.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    sampler = ClockSampler()
    tokens, d, ffn = args.micro_batch * 4096, 2048, 8192  # RAT-1.3B's FFN up-projection at seq 4096
    a = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
    w = torch.randn(ffn, d, device=device, dtype=torch.bfloat16)
    g = torch.randn(tokens, ffn, device=device, dtype=torch.bfloat16)
    flops = 2 * tokens * d * ffn
    layouts = {"x·Wᵀ (forward)": lambda: a @ w.t(), "g·W (input gradient)": lambda: g @ w,
               "gᵀ·x (weight gradient)": lambda: g.t() @ a}
    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"), "gemm": {}, "steps": {}}
    for name, fn in layouts.items():
        seconds, _ = timed(fn, 2.0)
        result["gemm"][f"{name}, alone"] = {"tflops": round(flops / seconds / 1e12)}
    for label, gap in (("back to back", 0.0), ("with idle gaps", 0.005)):
        with sampler:
            seconds, _ = timed(layouts["x·Wᵀ (forward)"], args.seconds, gap)
        result["gemm"][f"x·Wᵀ, {label}"] = {"tflops": round(flops / seconds / 1e12), **sampler.summary()}
    for flags in (set(), {"compile"}):
        _, step = build_step("rat_1p3b", args.micro_batch, 4096, flags, device)
        with sampler:
            seconds, calls = timed(step, args.seconds)
        result["steps"]["compiled" if flags else "eager"] = {"step_s": round(seconds, 4), "steps": calls,
                                                             **sampler.summary()}
        del step
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
