"""ratpt's tokenizers as Hugging Face fast tokenizers that give the same token ids.

A model was trained on `Tokenizer.encode(text)` (no BOS, no EOS added), so the exported tokenizer adds
no special token either: `AutoTokenizer.from_pretrained(DIR)(text).input_ids` is what ratpt fed it.

- byte: a byte-level BPE without merges whose vocabulary maps byte b to id b, and EOS 256.
- BPE `tokenizer.json`: the file itself, its post-processor (BOS/EOS templates) removed.
- SentencePiece `.model`: converted to a `tokenizers` pipeline from the model's own settings (normalizer,
  whitespace handling, dummy prefix, byte fallback). Known differences: the text of a special piece
  (`</s>`) encodes as that special token in Hugging Face and as plain characters in SentencePiece, and
  without byte fallback an unknown piece decodes as `<unk>` rather than SentencePiece's ` ⁇ `.
"""
from types import SimpleNamespace

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, bytes_to_unicode

from ratpt.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer

BYTE_EOS = "<|endoftext|>"


def to_hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A fast tokenizer with `tokenizer`'s ids and EOS (also the pad token: RAT has none of its own)."""
    if isinstance(tokenizer, ByteTokenizer):
        backend, eos = byte_backend(), BYTE_EOS
    elif isinstance(tokenizer, HFTokenizer):
        backend = FastTokenizer.from_file(str(tokenizer.path))
        backend.post_processor = None
        eos = backend.id_to_token(tokenizer.eos_id)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        backend = SentencePieceConverter(str(tokenizer.path)).converted()
        eos = backend.id_to_token(tokenizer.eos_id)
    else:
        raise ValueError(f"no Hugging Face export for a {type(tokenizer).__name__}")
    eos_token = AddedToken(eos, special=True, normalized=False)  # as a reloaded tokenizer saves it: byte-stable
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=eos_token,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def byte_backend() -> FastTokenizer:
    """ratpt's byte tokenizer: byte-level pre-tokenization maps each byte to one symbol, the vocabulary maps
    the symbol of byte b to id b, and there are no merges; EOS is the special token 256."""
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    backend = FastTokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTE_EOS, special=True)])
    return backend


class SentencePieceConverter(SpmConverter):
    """transformers' SentencePiece conversion, read from the model's own settings: byte fallback, whether
    extra whitespace is removed and whether a dummy prefix is added (transformers' generic converter assumes
    SentencePiece's defaults without byte fallback, its Llama converter Llama-2's settings)."""

    handle_byte_fallback = True  # until __init__ reads the model's own flag (silences the parent's warning)

    def __init__(self, model_file: str):
        super().__init__(SimpleNamespace(vocab_file=model_file))
        self.handle_byte_fallback = self.proto.trainer_spec.byte_fallback

    def normalizer(self, proto):
        spec = proto.normalizer_spec
        steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
        if spec.remove_extra_whitespaces:
            return normalizers.Sequence(steps + [normalizers.Strip(left=False, right=True),
                                                 normalizers.Replace(Regex(" {2,}"), "▁")])
        # every space kept (Llama-2's tokenizer): the dummy prefix and spaces become "▁" here, no pre-tokenizer
        prefix = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
        return normalizers.Sequence(steps + prefix + [normalizers.Replace(" ", "▁")])

    def pre_tokenizer(self, replacement, add_prefix_space):
        if not self.proto.normalizer_spec.remove_extra_whitespaces:
            return None
        scheme = "always" if self.proto.normalizer_spec.add_dummy_prefix else "never"
        return pre_tokenizers.Metaspace(replacement=replacement, prepend_scheme=scheme)

    def decoder(self, replacement, add_prefix_space):
        strip = [decoders.Strip(content=" ", left=1)] if self.proto.normalizer_spec.add_dummy_prefix else []
        return decoders.Sequence([decoders.Replace(replacement, " "), decoders.ByteFallback(), decoders.Fuse(),
                                  *strip])
