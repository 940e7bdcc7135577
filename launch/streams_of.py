"""Print the `data.streams=[...]` override that trains on every part launch/tokenize.sh wrote.

`python launch/streams_of.py OUT` lists OUT/part_* with each part weighted by its training tokens
(from its stats.json), so the mix is the same as one dataset holding all the inputs.
"""
import json
import sys
from pathlib import Path


def streams_override(out: Path) -> str:
    parts = sorted(p for p in out.glob("part_*") if (p / "stats.json").is_file())
    if not parts:
        raise SystemExit(f"{out} holds no finished part_*/stats.json: has the tokenize job array finished?")
    weights = [json.loads((p / "stats.json").read_text())["tokens"]["train"] for p in parts]
    # each path as a quoted (JSON, hence YAML) string: a ", " or ": " in it would otherwise split the mapping
    streams = ", ".join(f"{{path: {json.dumps(str(p))}, weight: {w}}}" for p, w in zip(parts, weights) if w > 0)
    return f"data.streams=[{streams}]"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python launch/streams_of.py OUT  (the OUT folder of launch/tokenize.sh)")
    print(streams_override(Path(sys.argv[1])))
