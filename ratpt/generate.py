"""Text generation: one prefill over the prompts, then one-token decode steps with the caches.

Prompts of different lengths share a batch: they are right-padded for the prefill (every
mixer is causal, so padding never reaches a real token) and each sequence then decodes at its
own position. Sampling: greedy (temperature 0), or temperature with top-k and/or top-p.
"""
import argparse
import time
from pathlib import Path

import torch

from ratpt.data.tokenizer import Tokenizer, load_tokenizer, same_tokenizer
from ratpt.model.cache import ModelCache
from ratpt.model.lm import RATLM
from ratpt.model.pretrained import TOKENIZER, load_pretrained


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [B] from logits [B, vocab]."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
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


class GraphedDecodeStep:
    """`model.decode_step(tokens, cache)` captured once in a CUDA graph and replayed per token.

    A decode step is hundreds of small kernels; launching them from Python costs more than
    running them at small batches. The first `warmup` calls are real decode steps run eagerly on
    a side stream (they compile the Triton kernels and set up cuBLAS, which a capture cannot
    do); the next call captures one step and replays it, and every later call copies the tokens
    into the graph's input and replays. The cache must be static (prefilled with a capacity).
    The returned logits are the graph's output buffer: the next call overwrites them.
    """

    def __init__(self, model: RATLM, cache: ModelCache, warmup: int = 2):
        if not cache.static:
            raise ValueError("a CUDA-graphed decode step needs a cache prefilled with a capacity")
        if not cache.lengths.is_cuda:
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            self.cache.reserve_next()  # the host-side count that the graph does not replay
            self.tokens.copy_(tokens)
        elif self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.model.decode_step(tokens, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        else:
            self.tokens = tokens.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.model.decode_step(self.tokens, self.cache)
        self.graph.replay()
        return self.logits


STOP_CHECK_EVERY = 16  # decode steps between host checks of "every sequence has emitted EOS"


@torch.inference_mode()
def generate(model: RATLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0,
             cuda_graph: bool = False) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens; return the new tokens only.

    A sequence stops after emitting eos_id (which is included in its output). The cache is
    preallocated for the longest prompt plus max_new_tokens; `cuda_graph` replays the decode
    step as one CUDA graph (CUDA only). New tokens stay on the device: the host looks at them
    only every STOP_CHECK_EVERY steps (to stop early) and at the end.
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
    generator = torch.Generator(device=device).manual_seed(seed)
    logits, cache = model.prefill(tokens, lengths, capacity=tokens.shape[1] + max_new_tokens)
    decode = GraphedDecodeStep(model, cache) if cuda_graph else (lambda t: model.decode_step(t, cache))
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
    return [_until_eos(row, eos_id) for row in new[:, :step + 1].tolist()]


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """The tokens up to and including the first eos_id."""
    return tokens[:tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """`ratpt generate DIR --prompt TEXT [--prompt TEXT ...] ...`."""
    parser = subparsers.add_parser("generate", help="generate text from a pretrained model folder")
    parser.add_argument("model_dir", help="folder written by save_pretrained / ratpt convert")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec (default: MODEL_DIR/tokenizer)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each decode step as one CUDA graph (GPU)")
    parser.set_defaults(func=run)


def check_sampling(args: argparse.Namespace) -> None:
    """Reject sampling flags that have no meaning, naming the flag (before any model is loaded)."""
    checks = ((args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"),
              (args.temperature >= 0, f"--temperature must be >= 0 (0: greedy), got {args.temperature}"),
              (args.top_k >= 0, f"--top-k must be >= 0 (0: off), got {args.top_k}"),
              (0 < args.top_p <= 1, f"--top-p must be in (0, 1] (1: off), got {args.top_p}"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    try:
        torch.device(args.device)
    except RuntimeError:  # torch's message lists every device type it knows; the flag is what to fix
        raise ValueError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")


def load_model_tokenizer(model_dir: str, spec: str | None) -> Tokenizer:
    """The tokenizer exported with the model, or `spec` if it is the same one: another tokenizer's ids
    (--tokenizer byte for a BPE model, say) decode to garbage without any error."""
    exported = Path(model_dir) / TOKENIZER
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

    tokenizer = load_model_tokenizer(args.model_dir, args.tokenizer)
    model, cfg = load_pretrained(args.model_dir, device=args.device)
    model = model.to(getattr(torch, args.dtype)).eval()
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                         f"({cfg.vocab_size}): pass the tokenizer the model was trained with (--tokenizer)")
    prompts = [tokenizer.encode(text) for text in args.prompt]
    start = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, eos_id=tokenizer.eos_id, seed=args.seed,
                       cuda_graph=args.cuda_graph)
    seconds = time.perf_counter() - start
    for text, new in zip(args.prompt, outputs):
        print(text + tokenizer.decode(new))
        print("-" * 40)
    n_new = sum(len(new) for new in outputs)
    print(f"{n_new} new tokens in {seconds:.2f}s (prefill included): {n_new / max(seconds, 1e-9):.1f} tokens/s")
    return 0
