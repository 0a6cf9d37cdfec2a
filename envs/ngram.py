"""Add-k smoothed character n-gram models: the reference ladder, n-gram rewards and a KL reference.

An order-n model predicts character c from the n - 1 characters before it:

    p(c | ctx) = (count(ctx, c) + k) / (count(ctx) + k V),      count(ctx) = sum_c count(ctx, c)

(additive / Lidstone smoothing; Jurafsky & Martin, "Speech and Language Processing", 3rd ed., ch. 3).
Order 1 is the unigram (empty context). A context never seen in training gets the uniform 1 / V,
which is what the formula gives with zero counts.

Storage is sparse over contexts, dense over the next character: the n - 1 context characters are
read as one base-V integer (most significant first), the M distinct codes seen in training are kept
sorted in `keys: [M]`, and their counts in `counts: [M, V]`. A lookup is a binary search. Fitting is
one np.unique + one np.bincount over the N training positions, no Python loop. On tinyshakespeare
train (V = 65) M is 1 / 65 / 1,380 / 11,228 for orders 1..4, so the 4-gram holds 0.73M cells
(2.9 MB as float32 log-probs, 5.8 MB as int64 counts) instead of the dense 65^4 = 17.9M (71 MB).

For JAX (rewards, KL references inside jit): `NGramModel.table()` returns an `NGramTable` pytree of
jnp arrays and `ngram_log_probs(table, contexts)` is the pure jnp lookup.

Run the validation ladder with `python -m envs.ngram --text_file=/path/to/input.txt`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from envs import chartext
from rlsoft.config import check, parse_flags

# Chosen by a light sweep on tinyshakespeare validation (`--k_sweep=0.003,0.01,0.03,0.1,0.3,1`):
# k = 0.03 is best for the 4-gram (1.716 nats/char vs 1.727 at 0.1, 1.912 at 1) and ties 0.1 for the
# trigram; the unigram and bigram hardly depend on k (counts are large).
DEFAULT_K = 0.03


class NGramTable(NamedTuple):
    """An n-gram model as jnp arrays. order = contexts.shape[-1] + 1; V = log_probs.shape[-1]."""

    keys: jax.Array  # [M] int32, sorted base-V codes of the training contexts
    log_probs: jax.Array  # [M + 1, V] float32; row M (unseen context) is uniform, log(1 / V)


def validate_k(k, name: str = "k") -> None:
    """The add-k smoothing must be a finite number > 0 (k = 0 gives log 0 = -inf): one-line ValueError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (math.isfinite(k) and k > 0):
        raise ValueError(f"{name}={k} is invalid; need a finite value > 0 (0 gives log 0 = -inf)")


def validate_order(order, vocab_size: int | None = None) -> None:
    """An order is an integer >= 1 whose V^(n-1) context codes fit int64 (given V)."""
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"order={order} is invalid; need an integer >= 1")
    if vocab_size is not None and vocab_size ** (int(order) - 1) >= 2**63:
        raise ValueError(f"order={order} is invalid for V={vocab_size}; V^(n-1) overflows int64 context codes")


def validate_ladder(train_len: int, eval_len: int, vocab_size: int, orders: Sequence[int], k=DEFAULT_K) -> None:
    """Everything `ladder` needs, from the lengths alone (check before fitting): one-line ValueError."""
    if len(orders) == 0:
        raise ValueError("orders is empty; give at least one, e.g. --orders=1,2,3,4")
    for order in orders:
        validate_order(order, vocab_size)
    validate_k(k)
    top = max(orders)
    if train_len < top or eval_len < top:
        raise ValueError(f"orders={tuple(orders)} is invalid for a text of {train_len} training and {eval_len} "
                         f"evaluation characters; each needs >= the largest order ({top})")


def context_codes(contexts, vocab_size: int, xp=np):
    """Base-V integer of each context: [..., n - 1] -> [...], Horner's rule, first char most significant."""
    codes = xp.zeros(contexts.shape[:-1], contexts.dtype)
    for j in range(contexts.shape[-1]):
        codes = codes * vocab_size + contexts[..., j]
    return codes


def _rows(keys, codes, xp=np):
    """Row of each code in `keys` (sorted), or len(keys) (the unseen row) when absent."""
    m = keys.shape[0]
    pos = xp.minimum(xp.searchsorted(keys, codes), m - 1)
    return xp.where(keys[pos] == codes, pos, m)


def ngram_log_probs(table: NGramTable, contexts: jax.Array) -> jax.Array:
    """Pure jnp: log p(. | contexts) for contexts [..., n - 1] int -> [..., V]. Jittable, vmappable."""
    codes = context_codes(jnp.asarray(contexts, jnp.int32), table.log_probs.shape[-1], jnp)
    return table.log_probs[_rows(table.keys, codes, jnp)]


def context_windows(ids, width: int, start: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(contexts [T, width], targets [T]) for targets ids[t], t = start .. N - 1 (start >= width)."""
    ids = np.asarray(ids)
    start = width if start is None else start
    if start < width or start >= ids.shape[0]:
        raise ValueError(f"start={start} is invalid; need {width} <= start < {ids.shape[0]}")
    windows = np.lib.stride_tricks.sliding_window_view(ids, width + 1)[start - width:]
    return windows[:, :width], windows[:, width]


class NGramModel:
    """Add-k smoothed order-n character model. `NGramModel(order, k).fit(train_ids, vocab_size)`."""

    def __init__(self, order: int, k: float = DEFAULT_K):
        validate_order(order)
        validate_k(k)
        self.order, self.k = int(order), float(k)
        self.vocab_size: int | None = None
        self.keys: np.ndarray | None = None  # [M] int64 sorted context codes
        self.counts: np.ndarray | None = None  # [M, V] int64 count(ctx, c)
        self._padded: np.ndarray | None = None  # [M + 1, V]: counts and a zero row for unseen contexts

    def fit(self, ids, vocab_size: int) -> "NGramModel":
        """Count every (n - 1 chars, next char) pair of `ids` (int array [N], N >= order)."""
        ids = np.asarray(ids, np.int64)
        if ids.ndim != 1 or ids.shape[0] < self.order:
            raise ValueError(f"ids of shape {ids.shape} are invalid; need [N] with N >= order={self.order}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"ids outside [0, {vocab_size}) cannot be counted")
        validate_order(self.order, vocab_size)
        contexts, targets = context_windows(ids, self.order - 1)
        self.keys, rows = np.unique(context_codes(contexts, vocab_size), return_inverse=True)
        m = self.keys.shape[0]
        flat = np.bincount(rows.reshape(-1) * vocab_size + targets, minlength=m * vocab_size)
        # One extra all-zero row M for unseen contexts, so every lookup is a plain gather.
        self._padded = np.concatenate([flat.reshape(m, vocab_size), np.zeros((1, vocab_size), np.int64)])
        self.counts = self._padded[:m]
        self.vocab_size = vocab_size
        return self

    def _check_fitted(self, contexts) -> np.ndarray:
        if self.counts is None:
            raise ValueError("this NGramModel is not fitted; call .fit(train_ids, vocab_size) first")
        contexts = np.asarray(contexts, np.int64)
        if contexts.shape[-1:] != (self.order - 1,):
            raise ValueError(f"contexts of shape {contexts.shape} are invalid; need [..., {self.order - 1}]")
        return contexts

    def rows(self, contexts) -> np.ndarray:
        """Row of each context in `counts`, or M for a context never seen in training."""
        contexts = self._check_fitted(contexts)
        return _rows(self.keys, context_codes(contexts, self.vocab_size))

    def context_counts(self, contexts) -> np.ndarray:
        """count(ctx, c): [..., n - 1] -> [..., V] (zeros for unseen contexts)."""
        return self._padded[self.rows(contexts)]

    def log_probs(self, contexts) -> np.ndarray:
        """log p(c | ctx) (add-k): [..., n - 1] -> [..., V] float64 numpy."""
        counts = self.context_counts(contexts).astype(np.float64)
        totals = counts.sum(-1, keepdims=True)
        return np.log(counts + self.k) - np.log(totals + self.k * self.vocab_size)

    def table(self) -> NGramTable:
        """The model as jnp arrays for `ngram_log_probs` (float32; int32 codes need V^(n-1) < 2^31)."""
        self._check_fitted(np.zeros((self.order - 1,), np.int64))
        if self.vocab_size ** (self.order - 1) >= 2**31:
            raise ValueError(f"order={self.order} is invalid for JAX; V^(n-1) overflows int32 codes")
        counts = self._padded.astype(np.float64)
        log_p = np.log(counts + self.k) - np.log(counts.sum(-1, keepdims=True) + self.k * self.vocab_size)
        return NGramTable(jnp.asarray(self.keys, jnp.int32), jnp.asarray(log_p, jnp.float32))

    def target_log_probs(self, ids, start: int | None = None) -> np.ndarray:
        """log p(ids[t] | ids[t-n+1 : t]) for t = start .. N - 1 (start defaults to n - 1): [T]."""
        contexts, targets = context_windows(ids, self.order - 1, start)
        rows = self.rows(contexts)
        hit = self._padded[rows, targets].astype(np.float64)
        total = self._padded.sum(-1)[rows].astype(np.float64)
        return np.log(hit + self.k) - np.log(total + self.k * self.vocab_size)

    def cross_entropy(self, ids, start: int | None = None) -> float:
        """Mean -log p of the characters ids[start:], in nats/char."""
        return float(-np.mean(self.target_log_probs(ids, start)))

    def top1_accuracy(self, ids, start: int | None = None) -> float:
        """Fraction of ids[start:] equal to the most probable next char.

        argmax of add-k probabilities = argmax of counts, so k does not matter; ties go to the lowest
        id, and an unseen context (uniform) predicts id 0.
        """
        contexts, targets = context_windows(ids, self.order - 1, start)
        rows = self.rows(contexts)
        return float(np.mean(np.argmax(self._padded, -1)[rows] == targets))


# --------------------------------------------------------------------------------------------
# The reference ladder.


class LadderRow(NamedTuple):
    order: int
    k: float
    nats: float  # cross-entropy, nats/char
    bits: float  # cross-entropy, bits/char
    top1: float  # top-1 accuracy
    contexts: int  # M, distinct training contexts


def ladder(train_ids, eval_ids, vocab_size: int, orders: Sequence[int] = (1, 2, 3, 4),
           k: float = DEFAULT_K) -> list[LadderRow]:
    """One row per order, all scored on the same characters eval_ids[max(orders) - 1:]."""
    validate_ladder(len(train_ids), len(eval_ids), vocab_size, orders, k)
    start = max(orders) - 1
    rows = []
    for order in orders:
        model = NGramModel(order, k).fit(train_ids, vocab_size)
        nats = model.cross_entropy(eval_ids, start)
        rows.append(LadderRow(order, k, nats, nats / math.log(2), model.top1_accuracy(eval_ids, start),
                              int(model.keys.shape[0])))
    return rows


def format_ladder(rows: Sequence[LadderRow]) -> str:
    lines = [f"{'order':>5} {'k':>6} {'nats/char':>10} {'bits/char':>10} {'top-1':>7} {'contexts':>9}"]
    for r in rows:
        lines.append(f"{r.order:>5} {r.k:>6g} {r.nats:>10.4f} {r.bits:>10.4f} {r.top1:>7.2%} {r.contexts:>9}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Config:
    text_file: str = ""  # empty: load tiny_shakespeare through tensorflow-datasets
    data_dir: str = ""  # TFDS data_dir; empty: the TFDS default
    split: str = "validation"
    orders: tuple[int, ...] = (1, 2, 3, 4)
    k: float = DEFAULT_K
    k_sweep: tuple[float, ...] = ()  # also print nats/char for each of these k

    def __post_init__(self):
        check(self.split in chartext.SPLITS,
              f"split={self.split} is invalid; allowed: {', '.join(chartext.SPLITS)}")
        check(len(self.orders) > 0 and all(o >= 1 for o in self.orders),
              f"orders={self.orders} is invalid; need orders >= 1")
        validate_k(self.k)
        for k in self.k_sweep:
            validate_k(k, "k_sweep")


def main(argv=None) -> None:
    cfg = parse_flags(Config, argv, prog="python -m envs.ngram")
    try:
        data = chartext.load_char_data(cfg.text_file or None, cfg.data_dir or None)
        eval_ids = getattr(data, cfg.split)
        validate_ladder(len(data.train), len(eval_ids), data.vocab.size, cfg.orders, cfg.k)
    except (chartext.DataUnavailableError, ValueError) as e:
        print(f"python -m envs.ngram: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"train {len(data.train):,} chars, {cfg.split} {len(eval_ids):,} chars, V = {data.vocab.size}")
    print(format_ladder(ladder(data.train, eval_ids, data.vocab.size, cfg.orders, cfg.k)))
    for k in cfg.k_sweep:
        rows = ladder(data.train, eval_ids, data.vocab.size, cfg.orders, k)
        print(f"k={k:g}: " + "  ".join(f"n={r.order} {r.nats:.4f}" for r in rows) + "  (nats/char)")


if __name__ == "__main__":
    main()
