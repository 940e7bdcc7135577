"""Text generation: one prefill over the prompts, then one-token decode steps with the caches.

Prompts of different lengths share a batch: they are right-padded for the prefill (every
mixer is causal, so padding never reaches a real token) and each sequence then decodes at its
own position. Sampling: greedy (temperature 0), or temperature with top-k and/or top-p.
"""
import argparse
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ratpt.data.tokenizer import Tokenizer, load_tokenizer, same_tokenizer
from ratpt.decoder import Decoder, compile_decode
from ratpt.errors import raise_first_failed
from ratpt.files import check_output_file, whole_text_file
from ratpt.model.lm import RATLM
from ratpt.model.pretrained import TOKENIZER, check_device, load_pretrained
from ratpt.prompts import read_prompts


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [B] from logits [B, vocab]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    # the top logit shifted to 0: a tiny temperature then sends the others to -inf, never the top one to inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one stays)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


STOP_CHECK_EVERY = 16  # decode steps between host checks of "every sequence has emitted EOS"


@dataclass
class Timings:
    """Seconds spent in prefills and in decode steps, and the tokens generated, summed over the
    generate() calls given it (each phase is timed to the device's completion)."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: int = 0


@torch.inference_mode()
def generate(model: RATLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             cuda_graph: bool = False, decoder: Decoder | None = None,
             timings: Timings | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens; return the new tokens only.

    A sequence stops after emitting eos_id (which is included in its output). The cache is
    preallocated for the longest prompt plus max_new_tokens, or for the `decoder`'s capacity:
    a Decoder built once and passed to every call reuses its persistent caches and CUDA graphs;
    `cuda_graph` without one builds a graphed Decoder for this call (CUDA only). New tokens stay
    on the device: the host looks at them only every STOP_CHECK_EVERY steps (to stop early) and
    at the end.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if decoder is None and cuda_graph:
        decoder = Decoder(model, tokens.shape[1] + max_new_tokens, cuda_graph=True)
    if decoder is not None and tokens.shape[1] + max_new_tokens > decoder.capacity:
        raise ValueError(f"a prompt of {tokens.shape[1]} tokens + {max_new_tokens} new tokens does not fit the "
                         f"decoder's capacity of {decoder.capacity} tokens: build the Decoder with a larger one")
    clock = _DeviceClock(device, timings)
    generator = torch.Generator(device=device).manual_seed(seed)
    capacity = decoder.capacity if decoder is not None else tokens.shape[1] + max_new_tokens
    logits, cache = model.prefill(tokens, lengths, capacity=capacity)
    decode = decoder.load(cache) if decoder is not None else (lambda t: model.decode_step(t, cache))
    clock.lap("prefill_s")
    new = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        new[:, step] = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            done |= new[:, step] == eos_id
        last = step == max_new_tokens - 1
        if last or (eos_id is not None and step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(done.all())):
            break
        logits = decode(new[:, step])
    outputs = [_until_eos(row, eos_id) for row in new[:, :step + 1].tolist()]
    clock.lap("decode_s")
    if timings is not None:
        timings.tokens += sum(map(len, outputs))
    return outputs


class _DeviceClock:
    """Adds the seconds since the last lap to a Timings field, once the device has caught up (no
    synchronisation at all without a Timings)."""

    def __init__(self, device: torch.device, timings: Timings | None):
        self.device, self.timings = device, timings
        self.last = self._now() if timings is not None else 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, field: str) -> None:
        if self.timings is not None:
            now = self._now()
            setattr(self.timings, field, getattr(self.timings, field) + now - self.last)
            self.last = now


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens up to and including the first eos_id."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """`ratpt generate DIR (--prompt TEXT [--prompt TEXT ...] | --prompts FILE) ...`."""
    parser = subparsers.add_parser("generate", help="generate text from a pretrained model folder")
    parser.add_argument("model_dir", help="folder written by save_pretrained / ratpt convert")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    source.add_argument("--prompts", help="file of prompts: one per line, or .jsonl objects with a \"prompt\" field")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--out", help="write the outputs as JSONL here, the file whole once every prompt is done "
                                      "(default: stdout; as text for --prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: MODEL_DIR/tokenizer)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each decode step as one CUDA graph, captured once per batch size "
                             "(default: on CUDA)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step: faster steps, a slower start")
    parser.set_defaults(func=run)


def check_sampling(args: argparse.Namespace) -> None:
    """Reject sampling flags that have no meaning and an --out that cannot be written, naming the flag
    (before any model is loaded: a capture or compile can take minutes)."""
    checks = ((args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
              (args.temperature >= 0, f"--temperature must be >= 0 (0: greedy), got {args.temperature}"),
              (args.top_k >= 0, f"--top-k must be >= 0 (0: off), got {args.top_k}"),
              (0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1: off), got {args.top_p}"),
              (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"))
    raise_first_failed(checks)
    check_device(args.device, "--device")
    if args.out:
        check_output(Path(args.out), args.prompts)


def check_output(out: Path, prompts: str | None) -> None:
    """--out names a new or existing file in an existing folder, and not the prompt file it would overwrite."""
    check_output_file(out)
    if prompts and out.resolve() == Path(prompts).resolve():
        raise ValueError(f"--out {out} is the --prompts file: writing the outputs would overwrite the prompts; "
                         f"name another file")


def load_model_tokenizer(model_dir: str, spec: str | None) -> Tokenizer:
    """The tokenizer exported with the model, or `spec` if it is the same one: another tokenizer's ids
    (--tokenizer byte for a BPE model, say) decode to garbage without any error."""
    exported = Path(model_dir) / TOKENIZER
    if spec is None and not exported.is_dir():
        raise FileNotFoundError(f"{model_dir} has no {TOKENIZER}/ folder (exported with --no-tokenizer): name the "
                                f"tokenizer the model was trained with, --tokenizer byte, FILE or FOLDER")
    if spec is None:
        return load_tokenizer(exported)
    tokenizer = load_tokenizer(spec)
    if exported.is_dir():
        trained = load_tokenizer(exported)
        if not same_tokenizer(tokenizer.identity(), trained.identity()):
            raise ValueError(
                f"--tokenizer {spec} is not the tokenizer {model_dir} was exported with ({trained.name!r}, "
                f"{trained.kind}, vocab {trained.vocab_size}): its ids would decode to garbage; leave out "
                f"--tokenizer to use {exported}"
            )
    return tokenizer


def run(args: argparse.Namespace) -> int:
    check_sampling(args)
    records = read_prompts(args.prompts) if args.prompts else [{"prompt": text} for text in args.prompt]
    start = time.perf_counter()
    model, cfg = load_pretrained(args.model_dir, device=args.device)  # first: a wrong folder is named as such
    tokenizer = load_model_tokenizer(args.model_dir, args.tokenizer)
    model = model.to(getattr(torch, args.dtype)).eval()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                         f"({cfg.vocab_size}): pass the tokenizer the model was trained with (--tokenizer)")
    prompts = [tokenizer.encode(record["prompt"]) for record in records]
    empty = next((i for i, p in enumerate(prompts) if not p), None)
    if empty is not None:
        raise ValueError(f"prompt {empty + 1} ({records[empty]['prompt']!r}) encodes to no tokens: give it some text")
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    cuda_graph = model.embedding.weight.is_cuda if args.cuda_graph is None else args.cuda_graph
    if args.compile:
        compile_decode(model)
    decoder = Decoder(model, max(map(len, prompts)) + args.max_new_tokens, cuda_graph)
    batches = [range(i, min(i + args.batch_size, len(prompts))) for i in range(0, len(prompts), args.batch_size)]
    for size in {len(batch) for batch in batches}:
        decoder.prepare(size)
    setup_s = time.perf_counter() - start

    timings = Timings()
    jsonl = bool(args.prompts or args.out)
    with whole_text_file(Path(args.out)) if args.out else nullcontext(sys.stdout) as sink:
        for batch in batches:
            outputs = generate(model, [prompts[i] for i in batch], args.max_new_tokens, args.temperature, args.top_k,
                               args.top_p, eos_id=tokenizer.eos_id, seed=args.seed, decoder=decoder, timings=timings)
            for i, new in zip(batch, outputs):
                text = tokenizer.decode(new)
                if jsonl:
                    sink.write(json.dumps({**records[i], "completion": text, "new_tokens": len(new)}) + "\n")
                else:
                    sink.write(f"{records[i]['prompt']}{text}\n{'-' * 40}\n")
            sink.flush()
    what = ("compile + " if args.compile else "") + ("CUDA-graph capture" if cuda_graph else "decode set-up")
    print(f"start-up: load {load_s:.2f}s, {what} {setup_s:.2f}s ({len(decoder.buckets)} batch sizes), "
          f"prefill {timings.prefill_s:.2f}s ({len(prompts)} prompts)\n"
          f"decode: {timings.tokens} new tokens in {timings.decode_s:.2f}s: "
          f"{timings.tokens / max(timings.decode_s, 1e-9):.1f} tokens/s (batches of up to {args.batch_size})",
          file=sys.stderr)
    return 0
