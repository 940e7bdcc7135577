"""GPU time of every kernel in one RAT mixing forward and backward (torch.profiler), per length.

At the layer benchmark's shape (ratpt_kernels.tune.layer_inputs: D 2048, 16 heads x 128, G 2, bf16,
B·T = 131072, q, k, v, f strided slices of one projection output): which of the fused kernels,
and which torch ops between them (group sums, zero fills, casts), take the time, next to the
bytes and FLOPs of kernels/NOTES.md. The backward is profiled both ways: by default (the summary
side adds dq atomically) and under torch.use_deterministic_algorithms (`backward_deterministic_*`,
torch's NaN fills of uninitialised memory included, as a user gets them). Kernel time summed by
name over `--iters` calls, divided.

`--layer` profiles instead one training step (forward + backward) of benchmarks/layer.py's whole RAT
layer, compiled as there: every kernel of the step, and the step's time in the categories of
benchmarks/profile_step.py (matmul, rat_mixing, glue), which says what the layer spends around
the fused kernels.

    python benchmarks/kernel_profile.py --out benchmarks/results/kernel_profile.json
    python benchmarks/kernel_profile.py --layer --out benchmarks/results/layer_profile.json
"""
import argparse
import json
import torch

from ratpt_kernels.rat_bwd import rat_backward
from ratpt_kernels.rat_fwd import rat_forward
from ratpt_kernels.tune import HEAD_DIM, ROPE_BASE, TOKENS, layer_inputs
from profiling import by_category, kernel_times, rat_kernel_names


def profile_length(T: int, chunk_size: int, iters: int) -> dict:
    q, k, v, f, bias, dy = layer_inputs(T, chunk_size)
    args = (q, k, v, f, bias, chunk_size, HEAD_DIM, ROPE_BASE)
    y, lse, ks, vs = rat_forward(*args)
    forward = kernel_times(lambda: rat_forward(*args), iters)
    run = {"T": T, "B": TOKENS // T, "L": chunk_size, "forward_ms": forward,
           "forward_total_ms": round(sum(forward.values()), 3)}
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    for mode, deterministic in (("", False), ("_deterministic", True)):  # atomic dq (default); bit-reproducible
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        backward = kernel_times(lambda: rat_backward(dy, q, k, v, f, bias, y, lse, ks, vs, chunk_size, HEAD_DIM,
                                                     ROPE_BASE), iters)
        run.update({f"backward{mode}_ms": backward, f"backward{mode}_total_ms": round(sum(backward.values()), 3)})
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    return run


def profile_layer(T: int, chunk_size: int, iters: int) -> dict:
    """Kernel times of one compiled fwd+bwd step of the benchmark's RAT layer, and their categories."""
    from layer import DTYPE, rat_layer

    layer = rat_layer(chunk_size, "triton").to("cuda", DTYPE)
    step_fn = torch.compile(layer, dynamic=False)
    x = torch.randn(TOKENS // T, T, layer.d_model, device="cuda", dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        step_fn(x).backward(dy)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    step()
    per_kernel = kernel_times(step, iters)
    categories = {name: round(ms, 3) for name, ms in by_category(per_kernel, rat_kernel_names()).items() if ms}
    return {"T": T, "B": TOKENS // T, "L": chunk_size, "total_ms": round(sum(per_kernel.values()), 3),
            "categories_ms": categories, "kernels_ms": per_kernel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/kernel_profile.json")
    parser.add_argument("--lengths", default="4096,131072")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--layer", action="store_true", help="profile the whole compiled layer's train step")
    args = parser.parse_args()
    runs = []
    for T in map(int, args.lengths.split(",")):
        runs.append((profile_layer if args.layer else profile_length)(T, args.chunk_size, args.iters))
        print(json.dumps(runs[-1], indent=1), flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
