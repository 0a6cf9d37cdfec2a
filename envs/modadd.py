"""Modular addition, the task of the thinking-token testbed: a thinker writes thoughts, an answerer answers.

After ekhadley/think_tokens (its arithmetic scripts): a question is a k-tuple of operands
x_1 .. x_k in [0, M); its answer is

    answer = (x_1 + ... + x_k) mod M.

A thinker writes T thought tokens from a vocabulary of V (ids 0 .. V-1), and, when
`fixed_length=False`, may stop early with the end-of-thought token EOT (id V):

    fixed_length=True:   exactly T thoughts, each in [0, V)
    fixed_length=False:  at most T tokens in all, the EOT included; after the EOT only EOT follows
                         (so T tokens always, padded with EOT), each in [0, V]

Hand-made thoughts (`hand_thoughts`), the warm start / upper-bound reference, follow the research
note's "spell the answer in digits, then end-thought": the answer's base-V digits, most
significant first; fixed mode pads them on the left with 0 to exactly T, EOT mode writes the
minimal digits (at least one, so 0 -> [0]) then EOT, padded with EOT to T. With
D = number of base-V digits of M-1 (M=100, V=10: D=2) they fit iff D <= T (fixed) or D <= T-1
(EOT, room for the end token); the config checks this. M=100, V=10, T=3:
52 -> [0, 5, 2] (fixed), [5, 2, 10] (EOT); 7 -> [0, 0, 7] (fixed), [7, 10, 10] (EOT).

Train/test split, exact and evaluated on the device. The N = M^k ordered tuples are indexed
i = sum_j x_j M^(k-j) (base M, first operand most significant; N < 2^31, so int32). A seeded
pseudo-random permutation P of [0, N) puts each tuple at a position P(i), and

    test  <=>  P(i) < n_test,      n_test = floor(test_fraction * N + 1/2)   (1 <= N - n_test).

P is the swap-or-not shuffle (Hoang, Morris, Rogaway, "An enciphering scheme based on a card
shuffle", CRYPTO 2012), which permutes any domain size without cycle walking: R rounds of

    x' = (K_r - x) mod N,  x <- x' if F_r(max(x, x')) else x

with round keys K_r in [0, N) and bit functions F_r (the top bit of murmur3's fmix32 of the value
xor a round constant), all derived from split_seed by splitmix64. Each round is an involution, so
P^-1 is the rounds in reverse. R = 2 ceil(log2 N) + 16, rounded up to a multiple of 8; that is far
below cryptographic strength but the split looks random (tests compare per-operand and
per-answer test counts with their hypergeometric spread). Hence, with nothing materialised:
  * `is_test(q)`: P(index(q)) < n_test.
  * `train_batch`: j uniform in [n_test, N) (jax.random.randint), question = tuple(P^-1(j)):
    exactly a train tuple, by construction (P(P^-1(j)) = j >= n_test), uniform over train tuples.
  * `test_questions(limit)`: the tuples P^-1(0 .. min(limit, n_test) - 1), sorted: all of the
    test set if it has <= limit tuples, else a seeded uniform sample of `limit` of them.
The split is of ORDERED tuples: the test question (a, b) may have its mirror (b, a) in train
(addition commutes), as in a random split of the M x M table.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlsoft.config import check, check_finite

MAX_TUPLES = 2**31 - 1  # tuple indices and the shuffle are int32
_MASK64 = (1 << 64) - 1
_UNROLL = 8  # rounds per fused loop step (compile time vs per-iteration overhead)


def num_digits(value: int, base: int) -> int:
    """Number of base-`base` digits of `value` >= 0 (at least 1: 0 is one digit)."""
    n = 1
    while value >= base:
        value //= base
        n += 1
    return n


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class ModAddConfig:
    """The task: `num_operands` operands mod `modulus`, thoughts of `max_thoughts` tokens from
    `thought_vocab` (+ EOT when not `fixed_length`), a `test_fraction` of tuples held out by `split_seed`."""

    modulus: int = 100
    num_operands: int = 2
    thought_vocab: int = 10
    max_thoughts: int = 2
    fixed_length: bool = True
    test_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        for name, low in (("modulus", 2), ("num_operands", 1), ("thought_vocab", 2), ("max_thoughts", 1),
                          ("split_seed", 0)):
            value = getattr(self, name)
            check(_is_int(value) and value >= low, f"{name}={value!r} is invalid; need an integer >= {low}")
        check(isinstance(self.fixed_length, (bool, np.bool_)),
              f"fixed_length={self.fixed_length!r} is invalid; need true or false")
        m, k = self.modulus, self.num_operands
        check(m ** k <= MAX_TUPLES, f"modulus={m}, num_operands={k} is invalid; need modulus**num_operands "
                                    f"< 2**31 (tuples are indexed in int32), got {m ** k}")
        check_finite(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "0 <= test_fraction < 1")
        check(self.num_test < self.num_tuples,
              f"test_fraction={self.test_fraction} is invalid; it leaves no train tuple of {self.num_tuples}")
        d, v, t = self.num_digits, self.thought_vocab, self.max_thoughts
        if self.fixed_length:
            check(d <= t, f"max_thoughts={t} is too small: modulus={m} needs {d} base-{v} digits")
        else:
            check(d <= t - 1, f"max_thoughts={t} is too small: modulus={m} needs {d} base-{v} digits and an "
                              f"end-of-thought token (fixed_length=False), {d + 1} in all")

    @property
    def num_tuples(self) -> int:
        """N = M^k ordered questions."""
        return self.modulus ** self.num_operands

    @property
    def num_test(self) -> int:
        """n_test = floor(test_fraction * N + 1/2) held-out tuples."""
        return int(math.floor(self.test_fraction * self.num_tuples + 0.5))

    @property
    def num_train(self) -> int:
        return self.num_tuples - self.num_test

    @property
    def num_digits(self) -> int:
        """D: base-V digits of the largest answer M-1, the hand thoughts' length (+1 EOT in EOT mode)."""
        return num_digits(self.modulus - 1, self.thought_vocab)

    @property
    def eot(self) -> int:
        """The end-of-thought class id, V."""
        return self.thought_vocab

    @property
    def thought_classes(self) -> int:
        """Thought classes the thinker may emit: V (fixed) or V + 1 (with EOT). Models emit V + 1
        logits; in fixed mode slice them `[..., :thought_classes]`."""
        return self.thought_vocab + (0 if self.fixed_length else 1)


# --------------------------------------------------------------------------------------------
# The swap-or-not permutation of [0, N).


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser (a bijection of uint32 with full avalanche)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def shuffle_rounds(num_tuples: int) -> int:
    """R = 2 ceil(log2 N) + 16, rounded up to a multiple of 8."""
    r = 2 * max(1, math.ceil(math.log2(num_tuples))) + 16
    return -(-r // _UNROLL) * _UNROLL


def shuffle_keys(num_tuples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The round keys K_r in [0, N) (int32) and bit-function constants C_r (uint32), from splitmix64."""
    base = _splitmix64(seed & _MASK64)
    rounds = shuffle_rounds(num_tuples)
    keys = [_splitmix64(base ^ (2 * r)) % num_tuples for r in range(rounds)]
    consts = [_splitmix64(base ^ (2 * r + 1)) & 0xFFFFFFFF for r in range(rounds)]
    return np.asarray(keys, np.int32), np.asarray(consts, np.uint32)


@functools.partial(jax.jit, static_argnames=("num_tuples", "inverse"))
def shuffle(x: jax.Array, num_tuples: int, keys: jax.Array, consts: jax.Array,
            inverse: bool = False) -> jax.Array:
    """P(x) (or P^-1(x)) for int32 x in [0, N), elementwise, any shape (`shuffle_keys` gives keys, consts).
    Jitted (inlined under an outer jit) so that eager callers compile it once per shape."""
    keys_j, consts_j = jnp.asarray(keys, jnp.int32), jnp.asarray(consts, jnp.uint32)
    rounds = keys_j.shape[0]

    def body(i, x):
        r = rounds - 1 - i if inverse else i
        d = keys_j[r] - x
        partner = jnp.where(d < 0, d + num_tuples, d)
        flip = (_fmix32(jnp.maximum(x, partner).astype(jnp.uint32) ^ consts_j[r]) >> 31) == 1
        return jnp.where(flip, partner, x)

    return lax.fori_loop(0, rounds, body, jnp.asarray(x, jnp.int32), unroll=_UNROLL)


# --------------------------------------------------------------------------------------------
# The task.


_method_jit = functools.partial(jax.jit, static_argnums=0)


class ModAdd:
    """Questions, answers, the split and hand-made thoughts of one ModAddConfig. Every method but
    `test_questions` is pure jnp and may be called inside jit / vmap / scan; they are jitted with the
    task static (by identity), so eager callers compile each once per shape."""

    def __init__(self, cfg: ModAddConfig):
        self.cfg = cfg
        self.keys, self.consts = shuffle_keys(cfg.num_tuples, cfg.split_seed)
        m, k = cfg.modulus, cfg.num_operands
        self._place = np.asarray([m ** (k - 1 - j) for j in range(k)], np.int32)  # M^(k-1-j)
        v, d = cfg.thought_vocab, cfg.num_digits
        self._digit_place = np.asarray([v ** (d - 1 - j) for j in range(d)], np.int32)  # V^(D-1-j)

    # --- indices --------------------------------------------------------------------------
    @_method_jit
    def index(self, questions: jax.Array) -> jax.Array:
        """[..., k] operands in [0, M) -> [...] int32 tuple index (base M, first operand most significant)."""
        chex.assert_axis_dimension(questions, -1, self.cfg.num_operands)
        return jnp.sum(jnp.asarray(questions, jnp.int32) * self._place, axis=-1)

    @_method_jit
    def questions_at(self, index: jax.Array) -> jax.Array:
        """The inverse of `index`: [...] int32 -> [..., k] int32."""
        index = jnp.asarray(index, jnp.int32)
        return (index[..., None] // self._place) % self.cfg.modulus

    def position(self, questions: jax.Array) -> jax.Array:
        """P(index): a tuple's place in the seeded shuffle; test iff < num_test."""
        return shuffle(self.index(questions), self.cfg.num_tuples, self.keys, self.consts)

    # --- the split ------------------------------------------------------------------------
    @_method_jit
    def is_test(self, questions: jax.Array) -> jax.Array:
        """[..., k] -> bool [...]: the tuple is held out."""
        return self.position(questions) < self.cfg.num_test

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def train_batch(self, key: chex.PRNGKey, batch_size: int) -> jax.Array:
        """[B, k] int32 train questions, i.i.d. uniform over the train tuples; exact (no rejection:
        a uniform train position is drawn and mapped back through P^-1)."""
        check(_is_int(batch_size) and batch_size >= 1, f"batch_size={batch_size!r} is invalid; need >= 1")
        cfg = self.cfg
        j = jax.random.randint(key, (batch_size,), cfg.num_test, cfg.num_tuples, dtype=jnp.int32)
        return self.questions_at(shuffle(j, cfg.num_tuples, self.keys, self.consts, inverse=True))

    def test_questions(self, limit: int) -> np.ndarray:
        """[N_test', k] int32, sorted: all test tuples if there are <= limit, else the seeded
        sample P^-1(0 .. limit-1) of them. Deterministic in (config, limit)."""
        check(_is_int(limit) and limit >= 0, f"limit={limit!r} is invalid; need an integer >= 0")
        n = min(int(limit), self.cfg.num_test)
        index = shuffle(jnp.arange(n, dtype=jnp.int32), self.cfg.num_tuples, self.keys, self.consts, inverse=True)
        return np.asarray(self.questions_at(jnp.sort(index)), np.int32).reshape(n, self.cfg.num_operands)

    # --- answers and thoughts -------------------------------------------------------------
    @_method_jit
    def answers(self, questions: jax.Array) -> jax.Array:
        """[..., k] -> [...] int32 (sum of the operands) mod M."""
        chex.assert_axis_dimension(questions, -1, self.cfg.num_operands)
        return jnp.sum(jnp.asarray(questions, jnp.int32), axis=-1) % self.cfg.modulus

    @_method_jit
    def hand_thoughts(self, answers: jax.Array) -> jax.Array:
        """[...] answers in [0, M) -> [..., T] int32 thought ids in [0, V]: the base-V digits, most
        significant first; fixed: left-padded with 0 to T; EOT mode: minimal digits, EOT, EOT padding."""
        cfg = self.cfg
        a = jnp.asarray(answers, jnp.int32)[..., None]
        v, d, t = cfg.thought_vocab, cfg.num_digits, cfg.max_thoughts
        digits = (a // self._digit_place) % v  # [..., D], most significant first, zero-padded
        if cfg.fixed_length:
            pad = jnp.zeros(digits.shape[:-1] + (t - d,), jnp.int32)
            return jnp.concatenate([pad, digits], axis=-1)
        # Minimal digits: the n = num_digits(a) last of the D, shifted to the front, then EOT.
        n = 1 + jnp.sum(a >= self._digit_place[:-1], axis=-1, keepdims=True)  # [..., 1]
        slot = jnp.arange(t, dtype=jnp.int32)
        src = jnp.clip(slot + d - n, 0, d - 1)  # slot s < n reads digit D-n+s
        shifted = jnp.take_along_axis(digits, jnp.broadcast_to(src, digits.shape[:-1] + (t,)), axis=-1)
        return jnp.where(slot < n, shifted, v)
