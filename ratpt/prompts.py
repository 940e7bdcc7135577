"""Prompt files of `ratpt generate --prompts FILE`: one prompt per line, or JSONL objects with a
"prompt" string (a .jsonl file; its other fields are passed through to the output records).

Blank lines are skipped in both; every other problem is an error that names the file and line,
before any model is loaded.
"""
import json
from pathlib import Path


def read_prompts(path: str | Path) -> list[dict]:
    """One record per prompt, each with a non-empty "prompt" string, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path}: {'a folder, not a file' if path.is_dir() else 'no such file'} (one "
                         f"prompt per line, or a .jsonl file of {{\"prompt\": ...}} objects)")
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = error.object[:error.start].count(b"\n") + 1  # the bytes read, not the file again
        raise ValueError(f"--prompts {path} line {line}: not UTF-8 (byte {error.object[error.start]:#04x}); save "
                         f"the file as UTF-8") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(_record(line, path, number) if jsonl else _line_record(line, path, number))
    if not records:
        raise ValueError(f"--prompts {path} holds no prompt: write one per line (in a .jsonl file, one "
                         f"{{\"prompt\": ...}} object per line)")
    return records


def _line_record(line: str, path: Path, number: int) -> dict:
    """A line of a plain prompt file, the prompt as written; unless it is a JSONL record in a file not named
    .jsonl, which would be prompted verbatim, braces and all, without a word."""
    if line.lstrip().startswith("{"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "prompt" in record:
            raise ValueError(f"--prompts {path} line {number} is a JSON object with a \"prompt\" field, but only a "
                             f".jsonl file is read as JSON lines: rename it to {path.with_suffix('.jsonl').name}")
    return {"prompt": line}


def _record(line: str, path: Path, number: int) -> dict:
    fix = 'each line of a .jsonl prompt file is an object with a non-empty "prompt" string'
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"--prompts {path} line {number}: not JSON ({error.msg}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
        raise ValueError(f"--prompts {path} line {number}: no \"prompt\" string; {fix}")
    return record
