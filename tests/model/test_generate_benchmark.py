"""benchmarks/generate.py: runs end to end on CPU with a tiny config; the ratio it reports."""
import json
import subprocess
import sys
from pathlib import Path

import torch

import generate as generate_benchmark
import profile_decode

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "generate.py"


def test_tiny_run_measures_every_batch_and_writes_json(tmp_path):
    out = tmp_path / "generate.json"
    subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--prompt", "16", "--new", "8",
                    "--min-batch", "1", "--max-batch", "2", "--prefill-batch", "1", "--device", "cpu",
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    (model,) = result["models"]
    assert [row["batch"] for row in model["batches"]] == [1, 2]
    assert model["largest_batch"] == 2
    for row in model["batches"]:
        assert row["timed_steps"] == 8 - 1 - 3  # the first token comes from the prefill; 3 untimed steps
        assert row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0
    assert result["ratio_to_attention"] == {}  # no attention model in this run


def test_ratio_compares_each_models_best_batch_with_attentions():
    bench = generate_benchmark

    def model(name, mixers, *rates):
        batches = [{"batch": 2 ** i, "decode_tokens_per_s": r, "end_to_end_tokens_per_s": r / 2}
                   for i, r in enumerate(rates)]
        return {"model": name, "mixers": mixers, "batches": batches, "best": max(batches, key=lambda b: b["decode_tokens_per_s"])}

    ratios = bench.ratios([model("rat", ["rat"], 10.0, 60.0, 50.0), model("attn", ["attention"], 4.0, 5.0)])
    assert ratios["rat"] == {"decode_tokens_per_s": 12.0, "end_to_end_tokens_per_s": 12.0}
    assert ratios["attn"]["decode_tokens_per_s"] == 1.0


def test_update_keeps_the_batches_a_run_did_not_measure():
    bench = generate_benchmark
    old = {"model": "rat", "batches": [{"batch": 32, "decode_tokens_per_s": 5.0}, {"batch": 64, "decode_tokens_per_s": 9.0},
                                       {"batch": 128, "skipped": "time budget"}]}
    new = {"model": "rat", "batches": [{"batch": 64, "decode_tokens_per_s": 8.0}, {"batch": 128, "decode_tokens_per_s": 7.0},
                                       {"batch": 256, "oom": True}]}
    merged = bench.merge_batches(old, new)
    assert [(r["batch"], r.get("decode_tokens_per_s")) for r in merged["batches"]] == [(32, 5.0), (64, 8.0), (128, 7.0), (256, None)]
    assert merged["largest_batch"] == 128 and merged["best"]["batch"] == 64
    skipped = bench.merge_batches(old, {"model": "rat", "batches": [{"batch": 32, "skipped": "time budget"}]})
    assert skipped["batches"][0] == {"batch": 32, "decode_tokens_per_s": 5.0}  # a batch not run keeps its row


def test_decode_profile_counts_the_cache_slots_each_mixer_reads():
    """benchmarks/profile_decode.py's bandwidth denominator, against hand counts at 1.3B (D 2048,
    24 layers, bf16): RAT reads the position // 16 complete summaries, attention every key up to and
    including the token's own, the hybrid's sliding-window layers the window and the token."""
    from ratpt.config import load_config

    def read(name, batch, position):
        return profile_decode.cache_bytes_read(load_config(REPO / "configs" / f"{name}.yaml").model, batch, position, 2)

    row = 2 * 2048 * 2  # k and v of one slot, bf16
    assert read("rat_1p3b", 2048, 3584) == 2048 * 24 * 224 * row
    assert read("attention_1p3b", 128, 3584) == 128 * 24 * 3585 * row
    assert read("rat_swa_1p3b", 1, 3584) == 12 * (224 + 1025) * row
    assert read("rat_swa_1p3b", 1, 100) == 12 * (6 + 101) * row


def test_read_floor_kernel_sums_each_slabs_visible_prefix():
    """benchmarks/profile_decode.py --read-floor's kernel reads the first n elements of each slab (the
    visible summaries of a (sequence, head)) and nothing past them: its sums against torch's, with a
    prefix that is not a multiple of the block and poison beyond it."""
    slabs = torch.randn(6, 300, dtype=torch.float64).to(torch.bfloat16)
    slabs[:, 200:] = float("nan")  # past the visible prefix
    out = torch.empty(6)
    profile_decode._read_slabs[(6,)](slabs, out, slabs.stride(0), 200, BLOCK=64)
    torch.testing.assert_close(out, slabs[:, :200].float().sum(1), rtol=1e-5, atol=1e-5)
