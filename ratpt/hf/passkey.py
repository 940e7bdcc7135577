"""Passkey retrieval (needle in a haystack) with no download: what RAT's long context is for.

A prompt of exactly `length` tokens hides a random number (the needle) at a relative `depth` of a haystack
of CPython's own documentation (`pydoc_data.topics`, shipped with Python), then asks for it; the model
answers greedily and is right when the first number it writes is the key. Accuracy per (length, depth)
goes to JSON and a heatmap.

The model answers greedily (ratpt.hf.long_prefill.greedy_answer): the prompt is prefilled in pieces of a
few thousand tokens carrying the cache forward, so memory grows with the cache (for RAT one summary per L
tokens), not with the prompt's activations, then a few decode steps run against the cache.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ratpt.data.tokenizer import Tokenizer
from ratpt.hf.long_prefill import PIECE, greedy_answer
from ratpt.model.lm import RATLM

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5
ANSWER_TOKENS = 16  # new tokens the model may write; the key is its first number

Answerer = Callable[[list[int], int], list[int]]  # (prompt tokens, max new tokens) -> new tokens


@dataclass
class Prompt:
    tokens: list[int]
    key: str
    needle_start: int  # index of the needle's first token in `tokens`


def haystack_text() -> str:
    """CPython's documentation topics in a fixed order: plain English prose, present wherever Python is."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


class PromptBuilder:
    """Passkey prompts of exact token lengths for one tokenizer (the haystack is encoded once)."""

    def __init__(self, tokenizer: Tokenizer, haystack: str | None = None):
        self.tokenizer = tokenizer
        self.filler = tokenizer.encode(haystack if haystack is not None else haystack_text())
        self.intro, self.question = tokenizer.encode(INTRO), tokenizer.encode(QUESTION)

    def build(self, length: int, depth: float, key: str) -> Prompt:
        """`length` tokens: intro, haystack with the needle after `depth` of it (0: first, 1: last), question."""
        if not 0 <= depth <= 1:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        needle = self.tokenizer.encode(NEEDLE.format(key=key))
        room = length - len(self.intro) - len(needle) - len(self.question)
        if room < 0:
            raise ValueError(f"length {length} is too short for a passkey prompt "
                             f"(at least {length - room} tokens with this tokenizer)")
        filler = (self.filler * (room // max(len(self.filler), 1) + 1))[:room]
        at = round(depth * room)
        tokens = self.intro + filler[:at] + needle + filler[at:] + self.question
        return Prompt(tokens=tokens, key=key, needle_start=len(self.intro) + at)


def answer_is_right(answer: str, key: str) -> bool:
    """The first number in the answer is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


def run_passkey(answer: Answerer, tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int = 5,
                seed: int = 0, haystack: str | None = None) -> dict:
    """Accuracy over `trials` random keys at every (length, depth); keys are the same for every model."""
    builder = PromptBuilder(tokenizer, haystack)
    rng = random.Random(seed)
    accuracy: dict[str, dict[str, float]] = {}
    records = []
    for length in lengths:
        accuracy[str(length)] = {}
        for depth in depths:
            right = 0
            for _ in range(trials):
                key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
                prompt = builder.build(length, depth, key)
                text = tokenizer.decode([t for t in answer(prompt.tokens, ANSWER_TOKENS) if t != tokenizer.eos_id])
                right += answer_is_right(text, key)
                records.append({"length": length, "depth": depth, "key": key, "answer": text})
            accuracy[str(length)][str(depth)] = right / trials
    return {"lengths": lengths, "depths": depths, "trials": trials, "seed": seed, "accuracy": accuracy,
            "records": records}


def evaluate_passkey(model: RATLM, tokenizer: Tokenizer, lengths: list[int], depths: list[float], trials: int = 5,
                     seed: int = 0, piece: int = PIECE) -> dict:
    """run_passkey with `model` answering greedily, each prompt prefilled `piece` tokens at a time: what
    `ratpt evaluate-long` runs, and training's eval.passkey."""
    def answer(prompt: list[int], max_new_tokens: int) -> list[int]:
        return greedy_answer(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id, piece=piece)

    return run_passkey(answer, tokenizer, lengths, depths, trials=trials, seed=seed)


def accuracy_by_length(results: dict) -> dict[int, float]:
    """Accuracy at each prompt length of run_passkey's results, averaged over the depths."""
    return {length: sum(results["accuracy"][str(length)].values()) / len(results["depths"])
            for length in results["lengths"]}


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """passkey.json and passkey.png (accuracy heatmap: depth down, length across) in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "passkey.json", out / "passkey.png"
    json_path.write_text(json.dumps(results, indent=2))
    lengths, depths = results["lengths"], results["depths"]
    grid = [[results["accuracy"][str(length)][str(depth)] for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(f"passkey retrieval ({results['trials']} keys per cell)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path
