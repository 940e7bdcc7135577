"""Tokenizers that data_prep, the trainer and generation share, loaded from local files only.

Three kinds: the built-in byte tokenizer (ids 0..255 are bytes, 256 is EOS; needs no file),
a Hugging Face `tokenizer.json`, and a SentencePiece `.model` (the paper used Llama-2's,
vocab 32000). `identity()` is what data_prep records beside the shards, so the loader can
refuse shards whose tokenizer does not fit the model instead of training on garbage.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from ratpt.data.layout import META_FILE

# Special tokens accepted as EOS in a tokenizer.json, first match wins.
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]", "<|eos|>")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks (tokenizer files can be tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer records (`identity()`, DIR/tokenizer/meta.json) describe the same token ids."""
    return all(a.get(k) == b.get(k) for k in ("kind", "vocab_size", "eos_id", "sha256"))


class Tokenizer(ABC):
    """Text <-> token ids. Documents are encoded without BOS/EOS; callers append `eos_id`."""

    kind: str = ""  # "byte", "hf" or "sentencepiece": selects the loader in meta.json
    name: str
    eos_id: int
    vocab_size: int
    path: Path | None = None  # the tokenizer file, copied beside the shards by data_prep

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; EOS and invalid byte sequences are rendered, never raised on."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents; subclasses override when the backend batches faster."""
        return [self.encode(t) for t in texts]

    def identity(self) -> dict[str, Any]:
        """What identifies this tokenizer in `meta.json`: same identity -> same token ids."""
        return {
            "name": self.name,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "sha256": file_sha256(self.path) if self.path else None,
            "file": self.path.name if self.path else None,
        }


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus EOS = 256: no file, no training, works on any text."""

    kind = "byte"

    def __init__(self) -> None:
        self.name = "byte"
        self.eos_id = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        parts: list[str] = []
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
                continue
            parts.append(out.decode("utf-8", errors="replace"))
            out.clear()
            parts.append("<|endoftext|>" if i == self.eos_id else f"<|{i}|>")
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` JSON file (e.g. one made by `data_prep train-tokenizer`)."""

    kind = "hf"

    def __init__(self, path: str | Path, eos_id: int | None = None, name: str | None = None) -> None:
        from tokenizers import Tokenizer as _HF

        self.path = Path(path)
        try:
            self._tok = _HF.from_file(str(self.path))
        except Exception as err:  # the Rust parser's error names neither the file nor the kind of file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizers JSON file ({err}); pass one written by "
                             "data_prep train-tokenizer or a tokenizer.json of a Hugging Face model") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id if eos_id is not None else self._find_eos()
        self.name = name or _default_name(self.path)

    def _find_eos(self) -> int:
        for token in HF_EOS_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{self.path}: no EOS token found (looked for {', '.join(HF_EOS_CANDIDATES)}); "
            "add one as a special token or write a meta.json with eos_id"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file, e.g. Llama-2's `tokenizer.model` (vocab 32000, EOS 2)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, eos_id: int | None = None, name: str | None = None) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = eos_id if eos_id is not None else self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{self.path}: the SentencePiece model has no EOS piece; write a meta.json with eos_id")
        self.name = name or _default_name(self.path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        # SentencePiece drops control pieces (EOS) in decode; render them so documents stay visible.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i == self.eos_id:
                parts.append(self._sp.decode(run))
                parts.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(int(i))
        parts.append(self._sp.decode(run))
        return "".join(parts)


def _default_name(path: Path) -> str:
    """`tokenizer.json` says nothing, so generic file names are named by their folder."""
    return path.parent.name if path.stem in ("tokenizer", "model") and path.parent.name else path.stem


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Load a tokenizer from `"byte"`, a folder with `meta.json` (data_prep's `DIR/tokenizer`),
    a folder with a `tokenizer.json`, a `tokenizer.json` path, or a SentencePiece `.model` path.
    Nothing is downloaded: a spec that is none of these is a `ValueError`."""
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _load_from_meta(path)
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path / "tokenizer.json")
        raise ValueError(f"{path}: folder has neither {META_FILE} nor tokenizer.json")
    if not path.is_file():
        raise ValueError(f"tokenizer {spec!r}: not 'byte' and no such file or folder")
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    raise ValueError(f"{path}: unknown tokenizer file type (expected tokenizer.json or a SentencePiece .model)")


def _load_from_meta(folder: Path) -> Tokenizer:
    """Rebuild the tokenizer recorded by data_prep and check the file is the one it used."""
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / META_FILE} is not a JSON file ({err}): the tokenizer record is damaged; "
                         f"copy {folder} again from where it came from") from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    loaders = {"hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer}
    if kind not in loaders:
        raise ValueError(f"{folder / META_FILE}: unknown tokenizer kind {kind!r}")
    file = folder / str(meta.get("file"))
    if not file.is_file():
        raise ValueError(f"{folder / META_FILE}: tokenizer file {file} is missing")
    if meta.get("sha256") and file_sha256(file) != meta["sha256"]:
        raise ValueError(f"{file}: sha256 differs from {folder / META_FILE}; the tokenizer file was changed")
    return loaders[kind](file, eos_id=meta.get("eos_id"), name=meta.get("name"))
