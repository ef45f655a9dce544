"""Byte-level BPE tokenizer: training on an iterator of documents, save/load as `tokenizer.json`.

A thin wrapper over HuggingFace `tokenizers`: ByteLevel pre-tokenizer and decoder, no normalizer,
a BPE model whose base alphabet is all 256 bytes, and one special token `<|eos|>` that ends every
document. Because nothing is normalized and every byte has a token, decode(encode(s)) == s for any
text that is valid UTF-8 (any str without lone surrogates).

The literal string "<|eos|>" inside a document is encoded as ordinary text, never as the EOS id, so
document boundaries in the shards come only from `ttt.data`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|eos|>"
FOREIGN_EOS = ("</s>", "<|endoftext|>")  # accepted in tokenizer.json files of other models (ttt convert)
MIN_VOCAB = 256 + 1  # every byte, plus EOS
# 2**20 is 8x the largest vocabularies in use; beyond it a BPE cannot be learned from any corpus one would
# prepare here, and the embedding alone would hold vocab_size x d_model parameters.
MAX_VOCAB = 1 << 20


def _check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size: expected an int >= {MIN_VOCAB} (256 bytes + EOS), got {vocab_size!r}")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size: expected at most {MAX_VOCAB:,}, got {vocab_size:,}: no corpus prepared here "
                         f"fills a BPE that large, and the embedding alone would hold vocab_size x d_model "
                         f"parameters ({vocab_size * 768 / 1e9:.1f}B at d_model 768)")


class Tokenizer:
    """Byte-level BPE with an `<|eos|>` special token. Build with `train` or `load`."""

    def __init__(self, hf: _HFTokenizer):
        # ours, else the end-of-text token of other families (Llama-2's "</s>": the released TTT models)
        eos_id = next((hf.token_to_id(t) for t in (EOS, *FOREIGN_EOS) if hf.token_to_id(t) is not None), None)
        if eos_id is None:
            raise ValueError(f"tokenizer: expected a special token {EOS!r} (or one of {FOREIGN_EOS}) in the "
                             f"vocabulary, found none")
        hf.encode_special_tokens = True  # a literal "<|eos|>" in text is plain text, not EOS
        self._hf = hf
        self._eos_id = eos_id

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> "Tokenizer":
        """Learn merges from `docs` (an iterable of document strings) up to `vocab_size` tokens.

        The result may hold fewer than `vocab_size` tokens when the corpus is too small to fill it.
        """
        _check_vocab_size(vocab_size)
        hf = _HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(docs, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a `tokenizer.json` written by `save` (or any HF tokenizer file holding `<|eos|>`, `</s>` or
        `<|endoftext|>`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer path: expected an existing tokenizer.json file, got {str(path)!r}")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the HF error type is not part of its API
            raise ValueError(f"tokenizer path: {str(path)!r} is not a valid tokenizer.json ({e})") from e
        return cls(hf)

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` (via a temp file and an atomic rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self._hf.save(str(tmp))
        os.replace(tmp, path)

    def to_str(self) -> str:
        """The JSON serialization (what `save` writes)."""
        return self._hf.to_str()

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """The tokenizer's identity: sha256 of its JSON serialization (vocabulary, merges, settings)."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids back to text; EOS decodes to the literal "<|eos|>"."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"
