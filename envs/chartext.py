"""Character-level text data for RL from random weights: tinyshakespeare, its split, vocab, windows.

Data source, in order of preference:
  * `text_file=PATH`: any UTF-8 text file, split exactly as TFDS splits tinyshakespeare (below), so a
    local copy of Karpathy's `input.txt` gives the same train/validation/test strings as TFDS.
  * tensorflow-datasets `tiny_shakespeare`: each split is ONE example whose `text` is the whole
    split. tfds is imported lazily (it is slow to import); a failed download/load raises one
    `DataUnavailableError` line that points at `--text_file`.

The split (tensorflow_datasets 4.9.10, `datasets/tiny_shakespeare/tiny_shakespeare_dataset_builder.py`,
`_split_generators`) is by characters, with truncating int():

    i = int(len(text) * 0.9);  train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5);  validation, test = rest[:j], rest[j:]

On the 1,115,394-character file: train 1,003,854, validation 55,770, test 55,770 characters.
Validation follows train in the file; the splits are kept as separate arrays and no window
crosses from one into another.

Vocabulary: the sorted unique characters of the WHOLE text (train + validation + test), as in
nanoGPT's `data/shakespeare_char/prepare.py`: 65 characters for tinyshakespeare, '\\n' = id 0,
' ' = id 1, ..., 'z' = id 64. (Validation alone uses 60 of them; train uses all 65.)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

TFDS_NAME = "tiny_shakespeare"
SPLITS = ("train", "validation", "test")
TRAIN_FRACTION = 0.9  # of the whole text; the rest is halved into validation and test.
TINY_SHAKESPEARE_CHARS = 1_115_394
TINY_SHAKESPEARE_VOCAB = 65


class DataUnavailableError(RuntimeError):
    """The text could not be obtained (TFDS unavailable, file missing); the message is one line."""


class TextFileError(DataUnavailableError, ValueError):
    """A text file that is missing, unreadable, not UTF-8 or too small (one line). Also a ValueError,
    so that a config's `__post_init__` may raise it through `validate_text_file` as a bad flag."""


def validate_text_file(path: str, flag: str = "--text_file") -> None:
    """Cheap early check (no read) that `path` is a readable regular file: TextFileError if not."""
    if not os.path.exists(path):
        raise TextFileError(f"{flag}={path} is invalid; no such file")
    if not os.path.isfile(path):
        raise TextFileError(f"{flag}={path} is invalid; not a regular file")
    if not os.access(path, os.R_OK):
        raise TextFileError(f"{flag}={path} is invalid; not readable")


def validate_text(length: int, context: int, what: str = "the text") -> None:
    """A text of `length` characters holds at least one window of `context` characters and the
    character after it (length > context); a one-line ValueError if not. Pure: check the split
    lengths before anything is compiled."""
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ValueError(f"context={context} is invalid; need an integer >= 0")
    if length <= context:
        raise ValueError(f"context={context} is invalid; {what} has {length} characters, need more than "
                         f"one context (>= {context + 1})")


def validate_splits(data: "CharData", context: int, splits: Iterable[str] = ("train", "validation")) -> None:
    """`validate_text` for each of `splits` of `data` (train samples windows, validation is evaluated)."""
    for name in splits:
        validate_text(len(getattr(data, name)), context, f"the {name} split")


# --------------------------------------------------------------------------------------------
# Loading and splitting.


def split_text(text: str) -> dict[str, str]:
    """TFDS tiny_shakespeare's 90/5/5 character split (see module docstring), for any text."""
    i = int(len(text) * TRAIN_FRACTION)
    train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5)
    return {"train": train, "validation": rest[:j], "test": rest[j:]}


def read_text_file(path: str) -> str:
    """The whole file as text. '\\n' newlines are kept verbatim (newline="" disables translation)."""
    validate_text_file(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TextFileError(f"--text_file={path} cannot be read: {_one_line(e)}") from None
    if len(set(text)) < 2:
        raise TextFileError(f"--text_file={path} is invalid; it holds {len(text)} characters, "
                            f"{len(set(text))} distinct (need >= 2 distinct)")
    return text


def load_tfds_splits(data_dir: str | None = None) -> dict[str, str]:
    """The three tiny_shakespeare split strings through tensorflow-datasets (downloads if needed)."""
    try:
        import tensorflow_datasets as tfds  # lazy: importing tfds costs ~1 s, loading pulls in TF.

        datasets = tfds.load(TFDS_NAME, split=list(SPLITS), data_dir=data_dir)
        splits = {}
        for name, ds in zip(SPLITS, datasets):
            (example,) = list(tfds.as_numpy(ds))  # each split is a single example
            text = example["text"]
            splits[name] = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    except Exception as e:  # noqa: BLE001 -- any failure (no network, no TF, bad cache) is one line.
        raise DataUnavailableError(
            f"tensorflow-datasets could not load {TFDS_NAME!r} ({_one_line(e)}); "
            "pass --text_file=PATH to a local copy of tinyshakespeare input.txt"
        ) from None
    return splits


def load_splits(text_file: str | None = None, data_dir: str | None = None) -> dict[str, str]:
    """{"train", "validation", "test"} -> text: from `text_file` if given, else from TFDS."""
    if text_file:
        return split_text(read_text_file(text_file))
    return load_tfds_splits(data_dir)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# --------------------------------------------------------------------------------------------
# Vocabulary.


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Character vocabulary: id i <-> chars[i]. `chars` is sorted and duplicate-free."""

    chars: str

    def __post_init__(self):
        if len(self.chars) < 2 or "".join(sorted(set(self.chars))) != self.chars:
            raise ValueError(f"chars={self.chars[:20]!r} is invalid; need >= 2 sorted unique characters")

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids [len(text)]. Vectorised through a 1-byte/4-byte code-point lookup table."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        points = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        lut = np.full(int(points.max()) + 1, -1, np.int32)
        lut[points] = np.arange(len(points), dtype=np.int32)
        ids = lut[np.minimum(codes, len(lut) - 1)]
        bad = (ids < 0) | (codes >= len(lut))
        if bad.any():
            c = text[int(np.argmax(bad))]
            raise ValueError(f"character {c!r} is not in the vocabulary of {self.size}")
        return ids

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"ids outside [0, {self.size}) cannot be decoded")
        return "".join(self.chars[i] for i in ids.tolist())


class CharData(NamedTuple):
    """Encoded splits (int32 numpy arrays) and their vocabulary."""

    vocab: Vocab
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def encode_splits(splits: dict[str, str]) -> CharData:
    """Vocab from the concatenated splits (= the whole file), then each split encoded."""
    vocab = Vocab.from_text("".join(splits[s] for s in SPLITS))
    return CharData(vocab, *(vocab.encode(splits[s]) for s in SPLITS))


def load_char_data(text_file: str | None = None, data_dir: str | None = None) -> CharData:
    """`load_splits` + `encode_splits`: the usual entry point."""
    return encode_splits(load_splits(text_file, data_dir))


# --------------------------------------------------------------------------------------------
# Context windows: contexts [B, C] and the next character [B].


def sample_windows(key, data, batch: int, context: int):
    """`batch` uniformly random windows of `data` and the character after each.

    Start s ~ U{0, ..., N - C - 1}; contexts[b] = data[s_b : s_b + C], targets[b] = data[s_b + C].
    `key` is a jax PRNGKey (pure jnp; jit it with batch/context static) or a numpy Generator
    (host-side numpy, returns numpy arrays). Every one of the N - C windows is equally likely.
    On the jax path pass `data` as a jnp array once, or each call copies it to the device.
    """
    n = data.shape[0]
    if context < 0 or batch < 1 or n <= context:
        raise ValueError(f"batch={batch}, context={context} are invalid for data of length {n}")
    offsets = np.arange(context + 1)
    if isinstance(key, np.random.Generator):
        starts = key.integers(0, n - context, size=batch)
        windows = np.asarray(data)[starts[:, None] + offsets]
    else:
        starts = jax.random.randint(key, (batch,), 0, n - context)
        windows = jnp.asarray(data)[starts[:, None] + offsets]
    return windows[:, :context], windows[:, context]


def num_eval_windows(n: int, context: int, stride: int = 1) -> int:
    """Number of windows `eval_windows` yields: targets at t = C, C + stride, ... < n."""
    return max(0, (n - context + stride - 1) // stride)


def eval_windows(data, context: int, batch: int, stride: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic sweep of `data` for evaluation: (contexts [b, C], targets [b]) numpy batches.

    Targets are data[t] for t = C, C + stride, C + 2 stride, ... (< N), each with the C characters
    before it, so stride=1 scores every character except the first C exactly once. All batches
    have `batch` rows except possibly the last (one extra jit shape at most). Bad arguments, or
    data without one window (N <= C), raise a one-line ValueError at the call, not at iteration.
    """
    data = np.asarray(data)
    if context < 0 or batch < 1 or stride < 1:
        raise ValueError(f"context={context}, batch={batch}, stride={stride} are invalid")
    validate_text(data.shape[0], context, "the evaluation text")
    targets_at = np.arange(context, data.shape[0], stride)
    offsets = np.arange(-context, 1)

    def batches():
        for lo in range(0, len(targets_at), batch):
            windows = data[targets_at[lo:lo + batch, None] + offsets]
            yield windows[:, :context], windows[:, context]

    return batches()
