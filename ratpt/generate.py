"""Text generation: one prefill over the prompts, then one-token decode steps with the caches.

Prompts of different lengths share a batch: they are right-padded for the prefill (every
mixer is causal, so padding never reaches a real token) and each sequence then decodes at its
own position. Sampling: greedy (temperature 0), or temperature with top-k and/or top-p.
"""
import argparse
import time

import torch

from ratpt.model.lm import RATLM


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
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: RATLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> list[list[int]]:
    """Continue each prompt (token ids) by up to max_new_tokens; return the new tokens only.

    A sequence stops after emitting eos_id (which is included in its output).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs >= 1 token")
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0:
        return outputs
    logits, cache = model.prefill(tokens, lengths)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_k, top_p, generator)
        for row, (token, finished) in enumerate(zip(next_tokens.tolist(), done.tolist())):
            if not finished:
                outputs[row].append(token)
        if eos_id is not None:
            done |= next_tokens == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model.decode_step(next_tokens, cache)
    return outputs


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ratpt.data.tokenizer import load_tokenizer
    from ratpt.model.pretrained import load_pretrained

    model, _ = load_pretrained(args.model_dir, device=args.device)
    model = model.to(getattr(torch, args.dtype)).eval()
    tokenizer = load_tokenizer(args.tokenizer or f"{args.model_dir}/tokenizer")
    prompts = [tokenizer.encode(text) for text in args.prompt]
    start = time.perf_counter()
    outputs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k,
                       args.top_p, eos_id=tokenizer.eos_id, seed=args.seed)
    seconds = time.perf_counter() - start
    for text, new in zip(args.prompt, outputs):
        print(text + tokenizer.decode(new))
        print("-" * 40)
    n_new = sum(len(new) for new in outputs)
    print(f"{n_new} new tokens in {seconds:.2f}s (prefill included): {n_new / max(seconds, 1e-9):.1f} tokens/s")
    return 0
