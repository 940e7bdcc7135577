"""Sweep the launch configurations of the RAT kernels on one GPU (the source of kernels/blocks.py).

    python -m ratpt_kernels.tune --out sweep.json                       # all kernels, T 4K and 128K, L 16
    python -m ratpt_kernels.tune --out sweep.json --write-table kernels/blocks.json   # and adopt the best
    python -m ratpt_kernels.tune --out sweep.json --confirm 3 --write-table   # adopt after interleaved re-timing
    python -m ratpt_kernels.tune --kernels summary_grad --chunk-sizes 16,64 --budget-s 120 --out s.json
    python -m ratpt_kernels.tune --warm --shard 0/4 & ...   # compile in parallel processes first (Triton's
                                                      # on-disk cache), then time in one process

Each configuration of one kernel is timed inside the pass that launches it (forward: the whole
forward; summary_grad, query_grad: the whole backward; query_grad's in deterministic mode, the only
one that launches it), the other kernels at their blocks.py configuration, at the layer benchmark's
shape: D 2048, 16 heads x 128, G 2, bf16,
B·T = 131072, q, k, v, f strided column slices of one projection output. A configuration that
does not compile or fit (shared memory) is recorded with its error. Results are written after
every measurement, so a run cut short by its budget keeps what it measured.

A sweep times each candidate once (median of --iters calls) in sequence, so clock drift and a
slow moment can favour one candidate by a few percent. --confirm K then re-times, per (kernel, L),
the K candidates with the least summed time and the default, interleaved over --rounds rounds
(one call each per round, every length); their medians decide. --write-table records, per
(kernel, L), the configuration with the least total time over the lengths (among those measured at
every length: the confirmed ones when --confirm is given) in the table kernels/blocks.py reads.
"""
import argparse
import itertools
import json
import logging
import os
import statistics
import time

import torch

from .blocks import KERNELS, TABLE, Blocks, blocks
from .rat_bwd import rat_backward
from .rat_fwd import rat_forward

log = logging.getLogger(__name__)
D, HEAD_DIM, GROUPS, TOKENS, ROPE_BASE = 2048, 128, 2, 131072, 10000.0

TILES = {  # (bq, bc) pairs per kernel; each is tried with 4 and 8 warps, 2 and 3 stages
    "forward": [(64, 64), (128, 64), (64, 128), (128, 32), (128, 128)],
    "summary_grad": [(64, 64), (128, 64), (32, 128), (64, 128), (128, 128)],
    "query_grad": [(64, 64), (64, 128), (128, 32), (128, 64), (128, 128)],
}


def candidates(kernel: str, chunk_size: int) -> list[Blocks]:
    """Configurations to try; row blocks of the forward and query side must hold whole chunks."""
    whole_chunks = kernel in ("forward", "query_grad")
    return [Blocks(bq, bc, warps, stages)
            for (bq, bc), warps, stages in itertools.product(TILES[kernel], (4, 8), (2, 3))
            if not whole_chunks or (bq >= chunk_size and bq % chunk_size == 0)]


def time_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median CUDA-event time of fn after `warmup` untimed calls (the first compiles)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) if times else float("nan")


def layer_inputs(T: int, chunk_size: int, batch: int | None = None, seed: int = 0) -> tuple:
    """q, k, v, f (strided slices of one bf16 projection output), gate bias, and dy; B·T = TOKENS."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, qk = batch or TOKENS // T, GROUPS * HEAD_DIM
    proj = torch.randn(B, T, 3 * D + 2 * qk, device="cuda", generator=gen).bfloat16()
    _, v, f, q, k = proj.split([D, D, D, qk, qk], dim=-1)
    bias = torch.empty(D, device="cuda").uniform_(1.0, max(chunk_size - 1.0, 1.0)).log_().bfloat16()
    dy = torch.randn(B, T, D, device="cuda", generator=gen).bfloat16()
    return q, k, v, f, bias, dy


def measure(kernel: str, cfg: Blocks, inputs: tuple, chunk_size: int, iters: int) -> float:
    q, k, v, f, bias, dy = inputs
    args = (q, k, v, f, bias, chunk_size, HEAD_DIM, ROPE_BASE)
    if kernel == "forward":
        return time_ms(lambda: rat_forward(*args, config=cfg), iters)
    y, lse, ks, vs = rat_forward(*args)
    atomic_dq = kernel != "query_grad"  # the query side's loop over the summaries runs in deterministic mode only
    return time_ms(lambda: rat_backward(dy, q, k, v, f, bias, y, lse, ks, vs, chunk_size, HEAD_DIM, ROPE_BASE,
                                        configs={kernel: cfg}, atomic_dq=atomic_dq), iters)


def spin_up(inputs: tuple, chunk_size: int, seconds: float = 2.0) -> None:
    """Run the default kernels untimed for a while before timing: an idle GPU's clocks ramp up
    over the first hundreds of milliseconds, and the configuration timed first is the default (the
    sweep of 2026-12-01 timed the default forward at 4.17 ms; a profile of the same shape summed
    3.30 ms of kernel time)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        for kernel in KERNELS:
            measure(kernel, blocks(kernel, chunk_size, HEAD_DIM, torch.bfloat16), inputs, chunk_size, iters=0)
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--lengths", default="4096,131072")
    parser.add_argument("--chunk-sizes", default="16")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=300, help="skip what would start after this")
    parser.add_argument("--write-table", nargs="?", const=str(TABLE), help="adopt the best (default: %(const)s)")
    parser.add_argument("--shard", default="0/1", help="i/n: only every n-th configuration, from the i-th")
    parser.add_argument("--confirm", type=int, default=0, help="re-time the K best and the default interleaved")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the --confirm re-timing")
    parser.add_argument("--warm", action="store_true",
                        help="only compile: run each configuration once at T 4096 with B 1 and B 16, which "
                             "share Triton's integer specialisations with the timed shapes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    index, n_shards = map(int, args.shard.split("/"))
    if args.warm:
        warm(args.kernels.split(","), list(map(int, args.chunk_sizes.split(","))), index, n_shards)
        return
    start, results = time.time(), {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for L, T in itertools.product(map(int, args.chunk_sizes.split(",")), map(int, args.lengths.split(","))):
        inputs = layer_inputs(T, L)
        spin_up(inputs, L)
        for kernel in args.kernels.split(","):
            default = blocks(kernel, L, HEAD_DIM, torch.bfloat16)
            for cfg in ([default] + [c for c in candidates(kernel, L) if c != default])[index::n_shards]:
                if time.time() - start > args.budget_s:
                    break
                run = {"kernel": kernel, "L": L, "T": T, "B": TOKENS // T, **cfg.__dict__, "default": cfg == default}
                try:
                    run["ms"] = measure(kernel, cfg, inputs, L, args.iters)
                except Exception as error:  # a configuration that does not fit: record it, go on
                    run["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                log.info("%s", run)
                results["runs"].append(run)
                with open(args.out, "w") as fh:
                    json.dump(results, fh, indent=1)
        del inputs
        torch.cuda.empty_cache()
    adopted_from = results["runs"]
    if args.confirm:
        finalists = {key: list(dict.fromkeys(configs + [blocks(key[0], key[1], HEAD_DIM, torch.bfloat16)]))
                     for key, configs in shortlist(results["runs"], args.confirm).items()}
        adopted_from = medians(confirm(finalists, list(map(int, args.lengths.split(","))), args.rounds, args.out,
                                       results))
    if args.write_table:
        write_table(adopted_from, args.write_table)


def confirm(finalists: dict[tuple[str, int], list[Blocks]], lengths: list[int], rounds: int, out: str,
            results: dict) -> list[dict]:
    """One call per finalist per round, the finalists interleaved, at every length; the timings go to
    results["confirmed"], saved as they come."""
    timings = results.setdefault("confirmed", [])
    for L in sorted({L for _, L in finalists}):
        for T in lengths:
            inputs = layer_inputs(T, L)
            spin_up(inputs, L)
            for round_ in range(rounds):
                for (kernel, key_L), configs in finalists.items():
                    for cfg in configs if key_L == L else ():
                        ms = measure(kernel, cfg, inputs, L, iters=1)
                        timings.append({"kernel": kernel, "L": L, "T": T, **cfg.__dict__, "round": round_, "ms": ms})
                with open(out, "w") as fh:
                    json.dump(results, fh, indent=1)
            log.info("confirmed L %d T %d: %s", L, T, medians([t for t in timings if t["T"] == T and t["L"] == L]))
            del inputs
            torch.cuda.empty_cache()
    return timings


def medians(timings: list[dict]) -> list[dict]:
    """Runs in the sweep's form: per (kernel, L, T, configuration), the median of its timings."""
    grouped: dict[tuple, list[float]] = {}
    for t in timings:
        grouped.setdefault((t["kernel"], t["L"], t["T"], t["bq"], t["bc"], t["warps"], t["stages"]), []).append(t["ms"])
    return [{"kernel": kernel, "L": L, "T": T, "bq": bq, "bc": bc, "warps": warps, "stages": stages,
             "ms": statistics.median(ms)}
            for (kernel, L, T, bq, bc, warps, stages), ms in grouped.items()]


def summed_times(runs: list[dict]) -> dict[tuple[str, int], dict[Blocks, float]]:
    """Per (kernel, L): each configuration's time summed over the lengths, if measured at all of them."""
    lengths = {r["T"] for r in runs}
    by_length: dict[tuple, dict[int, float]] = {}
    for r in runs:
        if "ms" in r:
            key = (r["kernel"], r["L"], Blocks(r["bq"], r["bc"], r["warps"], r["stages"]))
            by_length.setdefault(key, {})[r["T"]] = r["ms"]
    totals: dict[tuple[str, int], dict[Blocks, float]] = {}
    for (kernel, L, cfg), times in by_length.items():
        if set(times) == lengths:
            totals.setdefault((kernel, L), {})[cfg] = sum(times.values())
    return totals


def shortlist(runs: list[dict], k: int) -> dict[tuple[str, int], list[Blocks]]:
    """Per (kernel, L): the k configurations with the least summed time."""
    return {key: sorted(times, key=times.get)[:k] for key, times in summed_times(runs).items()}


def write_table(runs: list[dict], path: str) -> None:
    """Per (kernel, L): the configuration with the least summed time over all measured lengths."""
    lengths = {r["T"] for r in runs}
    best = {key: min(times.items(), key=lambda item: item[1]) for key, times in summed_times(runs).items()}
    table = json.loads(open(path).read()) if os.path.exists(path) else {"bf16": []}
    chosen = {(kernel, L) for kernel, L in best}
    table["bf16"] = [e for e in table["bf16"] if (e["kernel"], e["L"]) not in chosen or e["d"] != HEAD_DIM]
    for (kernel, L), (cfg, total) in sorted(best.items()):
        table["bf16"].append({"kernel": kernel, "L": L, "d": HEAD_DIM, **cfg.__dict__,
                              "ms_summed_over_lengths": round(total, 3)})
        log.info("adopted %s L %d: %s (%.2f ms over T %s)", kernel, L, cfg, total, sorted(lengths))
    with open(path, "w") as fh:
        json.dump(table, fh, indent=1)


def warm(kernels: list[str], chunk_sizes: list[int], index: int, n_shards: int) -> None:
    for L, batch in itertools.product(chunk_sizes, (1, 16)):
        inputs = layer_inputs(4096, L, batch=batch)
        for kernel in kernels:
            for cfg in candidates(kernel, L)[index::n_shards]:
                try:
                    measure(kernel, cfg, inputs, L, iters=0)
                except Exception as error:
                    log.info("%s %s: %s", kernel, cfg, str(error)[:100])


if __name__ == "__main__":
    main()
