"""The Hugging Face model on a GPU: bf16 logits against ratpt's, passkey at length, generate() speed.

One run (about 4 minutes on one H100, no download: random weights or a model trained here) writes
one JSON to --out, each part under its own key, a failed part as its traceback under "error":

  logits        RAT-1.3B-shaped layers at a reduced depth (configs/rat_1p3b.yaml and
                configs/rat_swa_1p3b.yaml, model.n_layers=2), random init, bf16: the relative error
                ‖a − b‖/‖b‖ of the logits of ratpt (Triton kernels), ratpt (reference ops), the HF model
                (pure PyTorch) and the HF model (ratpt's kernels), each against the fp32 reference, and
                HF against ratpt's kernels next to the kernels' own error against the reference.
  passkey       a small RAT trained here for --train-seconds on passkey prompts (byte tokens, haystack of
                CPython's docs), then `ratpt evaluate-long` at 4K and 32K: accuracy per (length, depth), also
                at the training length (where a trained model should find the key); passkey.json and passkey.png beside the JSON.
  long_prefill  a 131072-token prompt through the 2-layer RAT-1.3B shape: peak memory and time of the
                prefill in pieces (what evaluate-long runs) against the one-shot prefill, and how far
                their last logits are apart.
  generate      greedy decoding of the same model, prompt and new tokens: HF `model.generate()` against
                `ratpt.generate.generate` (eager and CUDA-graphed), tokens/s (prefill included).

transformers is imported guarded: without it the ratpt parts still run and "transformers" says why.

    python benchmarks/hf_gpu.py --out $OUT/hf_gpu.json                     # one GPU
    python benchmarks/hf_gpu.py --device cpu --tiny --out /tmp/hf_gpu.json  # smoke test, seconds
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ratpt.cli import main as ratpt_main
from ratpt.config import load_config
from ratpt.data.tokenizer import load_tokenizer
from ratpt.generate import generate
from ratpt.hf.long_prefill import prefill_in_pieces
from ratpt.hf.passkey import ANSWER_TOKENS, KEY_DIGITS, PromptBuilder
from ratpt.model import ModelConfig, build_model
from ratpt.model.lm import RATLM
from ratpt.model.pretrained import save_pretrained

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=300, d_model=64, n_layers=2, head_dim=16, ngroups=2, chunk_size=16, window=32)


def transformers_status() -> dict:
    try:
        import transformers
    except Exception as err:  # noqa: BLE001 — any import failure means the HF parts cannot run
        return {"available": False, "error": f"{type(err).__name__}: {err}"}
    return {"available": True, "version": transformers.__version__}


def model_config(name: str, tiny: bool) -> ModelConfig:
    """configs/<name>.yaml's model with 2 layers, or its tiny stand-in (same mixers) on CPU."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["model.n_layers=2"]).model
    return ModelConfig(**(TINY | {"mixers": cfg.mixers})) if tiny else cfg


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all entries, in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def copy_model(model: RATLM, dtype: torch.dtype, kernels: str) -> RATLM:
    copy = build_model(replace(model.cfg, kernels=kernels)).to(model.embedding.weight.device)
    copy.load_state_dict(model.state_dict())
    return copy.to(dtype).eval()


def hf_copy(model: RATLM, dtype: torch.dtype, kernels: str):
    from ratpt.hf.configuration_rat import RATConfig
    from ratpt.hf.modeling_rat import RATForCausalLM

    hf_model = RATForCausalLM(RATConfig(**(asdict(model.cfg) | {"kernels": kernels})))
    hf_model.model.load_state_dict(model.state_dict())
    return hf_model.to(model.embedding.weight.device, dtype).eval()


@torch.no_grad()
def part_logits(device: torch.device, tiny: bool, hf: bool) -> dict:
    results = {}
    for name in ("rat_1p3b", "rat_swa_1p3b"):
        torch.manual_seed(0)
        cfg = model_config(name, tiny)
        reference = build_model(replace(cfg, kernels="torch")).to(device).eval()
        T = 100 if tiny else 4096
        tokens = torch.randint(0, cfg.vocab_size, (1, T), device=device)
        truth = reference(tokens).float()
        logits = {"ratpt_kernels": copy_model(reference, torch.bfloat16, "auto")(tokens),
                  "ratpt_reference": copy_model(reference, torch.bfloat16, "torch")(tokens)}
        entry = {"shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim,
                           "chunk_size": cfg.chunk_size, "mixers": cfg.mixers, "vocab": cfg.vocab_size, "T": T},
                 "dtype": "bfloat16"}
        if hf:
            try:
                # use_cache=False: the full forward, the one that runs ratpt's kernels when it may
                logits["hf_torch"] = hf_copy(reference, torch.bfloat16, "torch")(tokens, use_cache=False).logits
                logits["hf_kernels"] = hf_copy(reference, torch.bfloat16, "auto")(tokens, use_cache=False).logits
            except Exception:  # noqa: BLE001 — the ratpt numbers still stand
                entry["hf_error"] = traceback.format_exc()
        entry["vs_fp32_reference"] = {key: relative_error(value, truth) for key, value in logits.items()}
        kernels = logits["ratpt_kernels"]
        entry["kernels_vs_reference_bf16"] = relative_error(kernels, logits["ratpt_reference"])
        entry["hf_vs_ratpt_kernels"] = {key: relative_error(logits[key], kernels)
                                       for key in ("hf_torch", "hf_kernels") if key in logits}
        results[name] = entry
    return results


def passkey_batch(builder: PromptBuilder, length: int, batch: int, rng: random.Random) -> torch.Tensor:
    """Passkey prompts of `length` tokens followed by their answer: what the model learns to continue."""
    rows = []
    for _ in range(batch):
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        prompt = builder.build(length - ANSWER_TOKENS, rng.random(), key)
        answer = builder.tokenizer.encode(f" {key}. The pass key is {key}.")[:ANSWER_TOKENS]
        rows.append(prompt.tokens + answer + [builder.tokenizer.eos_id] * (ANSWER_TOKENS - len(answer)))
    return torch.tensor(rows)


def part_passkey(device: torch.device, tiny: bool, train_seconds: float, out_dir: Path) -> dict:
    tokenizer = load_tokenizer("byte")
    cfg = ModelConfig(**(TINY | {"vocab_size": 257})) if tiny else ModelConfig(
        vocab_size=257, d_model=256, n_layers=4, head_dim=64, ngroups=2, chunk_size=16)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    builder, rng = PromptBuilder(tokenizer), random.Random(0)
    seq, batch = (256, 4) if tiny else (1024, 32)
    steps, losses, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < train_seconds:
        tokens = passkey_batch(builder, seq + 1, batch, rng).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        losses.append(loss.item())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer_dir.mkdir()
        (tokenizer_dir / "meta.json").write_text(json.dumps({"kind": "byte"}))
        save_pretrained(model.eval(), cfg, Path(tmp) / "model", tokenizer_dir=tokenizer_dir)
        lengths = "300,600" if tiny else f"{seq},4096,32768"  # the training length, then beyond
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        code = ratpt_main(["evaluate-long", str(Path(tmp) / "model"), "--lengths", lengths, "--depths", "0,0.5,1",
                           "--trials", "2", "--device", device.type, "--dtype", "bfloat16" if not tiny else "float32",
                           "--piece", "128" if tiny else "8192", "--out", str(out_dir)])
        seconds = time.perf_counter() - start
    report = json.loads((out_dir / "passkey.json").read_text())
    return {"model": asdict(cfg), "train": {"steps": steps, "seconds": train_seconds, "seq_len": seq, "batch": batch,
                                            "first_loss": losses[0] if losses else None,
                                            "last_loss": losses[-1] if losses else None},
            "exit_code": code, "evaluate_seconds": seconds, "accuracy": report["accuracy"],
            "answers": [record["answer"] for record in report["records"]][:6],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


@torch.no_grad()
def part_long_prefill(device: torch.device, tiny: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config("rat_1p3b", tiny)).to(device, torch.bfloat16).eval()
    T, piece = (256, 64) if tiny else (131072, 8192)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T), device=device)
    results = {"T": T, "piece": piece, "n_layers": model.cfg.n_layers}
    for name, prefill in (("pieces", lambda: prefill_in_pieces(model, tokens, capacity=T + 16, piece=piece)),
                          ("one_shot", lambda: model.prefill(tokens, capacity=T + 16))):
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            start = time.perf_counter()
            logits, cache = prefill()
            if device.type == "cuda":
                torch.cuda.synchronize()
            results[name] = {"seconds": time.perf_counter() - start,
                             "peak_gib_above_weights": (torch.cuda.max_memory_allocated() - base) / 2**30
                             if device.type == "cuda" else None}
            results[name + "_logits"] = logits.float()
            del cache
        except Exception:  # noqa: BLE001 — one-shot may run out of memory: that is the point
            results[name] = {"error": traceback.format_exc()[-2000:]}
    if "pieces_logits" in results and "one_shot_logits" in results:
        results["relative_error_last_logits"] = relative_error(results["pieces_logits"], results["one_shot_logits"])
    results.pop("pieces_logits", None)
    results.pop("one_shot_logits", None)
    return results


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.no_grad()
def part_generate(device: torch.device, tiny: bool, hf: bool) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config("rat_1p3b", tiny)).to(device, torch.bfloat16).eval()
    prompt_len, new = (16, 8) if tiny else (512, 256)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device=device)
    results: dict = {"model": "rat_1p3b shape, n_layers 2, bf16", "batch": 1, "prompt": prompt_len, "new_tokens": new}
    runs = {"ratpt_eager": lambda n: generate(model, prompt.tolist(), n)[0],
            "ratpt_cuda_graph": lambda n: generate(model, prompt.tolist(), n, cuda_graph=True)[0]}
    if device.type != "cuda":
        runs.pop("ratpt_cuda_graph")
    if hf:
        hf_model = hf_copy(model, torch.bfloat16, "auto")

        def hf_generate(n: int) -> list[int]:
            out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[0, prompt_len:].tolist()

        runs["hf_generate"] = hf_generate
    tokens = {}
    for name, run in runs.items():
        try:
            run(4)  # warm-up: kernels compiled, cuBLAS set up
            seconds, tokens[name] = timed(lambda: run(new), device)
            results[name] = {"seconds": seconds, "tokens_per_s": new / seconds}
        except Exception:  # noqa: BLE001 — the other runs still count
            results[name] = {"error": traceback.format_exc()[-2000:]}
    if "hf_generate" in tokens:
        same = sum(a == b for a, b in zip(tokens["hf_generate"], tokens["ratpt_eager"]))
        results["hf_tokens_equal_ratpt"] = f"{same}/{new} (bf16: rounding may split a near-tie)"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file; passkey.json and passkey.png go beside it")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (CPU smoke test)")
    parser.add_argument("--train-seconds", type=float, default=None, help="passkey training (default 60, tiny 3)")
    parser.add_argument("--parts", default="logits,passkey,long_prefill,generate")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    status = transformers_status()
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": status, "tiny": args.tiny}
    train_seconds = args.train_seconds if args.train_seconds is not None else (3 if args.tiny else 60)
    parts = {"logits": lambda: part_logits(device, args.tiny, status["available"]),
             "passkey": lambda: part_passkey(device, args.tiny, train_seconds, out.parent),
             "long_prefill": lambda: part_long_prefill(device, args.tiny),
             "generate": lambda: part_generate(device, args.tiny, status["available"])}
    for name in args.parts.split(","):
        start = time.perf_counter()
        try:
            results[name] = parts[name]()
        except Exception:  # noqa: BLE001 — one part's failure must not lose the others
            results[name] = {"error": traceback.format_exc()}
        print(f"{name}: {time.perf_counter() - start:.1f}s", flush=True)
        out.write_text(json.dumps(results, indent=2))  # after every part: a later crash keeps what was done
    print(json.dumps(results, indent=2)[:6000])


if __name__ == "__main__":
    main()
