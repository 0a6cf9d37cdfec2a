"""A small SentencePiece tokenizer for tiny models, trained on a task's own corpus and cached.

Real checkpoints bring their own tokenizer (models/hf.py). A tiny model trained from scratch on
CPU wants a tokenizer that fits its task: here a SentencePiece model (unigram by default) trained
on a generated corpus, with the task's markup (e.g. "<think>") as single user-defined pieces.
The trained model is cached under a name derived from its settings and the corpus hash, so a
second run loads it instead of training again.

Ids: 0 = <pad>, 1 = <eos>, 2 = <unk>; then the user-defined symbols, then the learned pieces.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Sequence

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


class SentencePieceTokenizer:
    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.proto = model_proto

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, symbols: Sequence[str] = (),
              cache_dir: str | None = None, model_type: str = "unigram") -> "SentencePieceTokenizer":
        """Train on `texts` (or load the cached model trained on the same texts and settings)."""
        import sentencepiece as spm

        texts = list(texts)
        if vocab_size < len(symbols) + 8:
            raise ValueError(f"vocab_size={vocab_size} is invalid; need >= {len(symbols) + 8}")
        digest = hashlib.sha256("\n".join(texts).encode() + repr((vocab_size, tuple(symbols), model_type)).encode())
        path = os.path.join(cache_dir, f"spm_{digest.hexdigest()[:16]}.model") if cache_dir else None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                return cls(f.read())
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
            user_defined_symbols=list(symbols), character_coverage=1.0, hard_vocab_limit=False,
            split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", minloglevel=2, num_threads=1)
        proto = out.getvalue()
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(proto)
            os.replace(tmp, path)  # atomic: a concurrent run sees the old state or the whole file
        return cls(proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def token_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != UNK:
            raise ValueError(f"piece {piece!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)]
        return self._sp.decode(ids)
