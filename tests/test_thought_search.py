"""rlsoft.thought_search on a hand-built answerer whose log p(correct | thoughts) is known.

The answerer: given a target sequence s*, p(correct | s) = sigmoid(beta (T/2 - hamming(s, s*))), so
the reward log p is negative, saturating near the top (log-prob rewards as the testbed has them) and
has the unique maximum s*. The informative value of a prefix counts only its filled positions.
Every search here is greedy and must return s* exactly.

Compiling mctx costs 10-20 s on a loaded CPU, so the tests share two compiled searches, with the
problem (targets, prior bias, value weight, gumbel scale) as traced arguments the closures capture:
  * `_search_eot`: A = 4 classes (3 thoughts + EOT = 3), T = 3, 128 simulations, greedy,
    jit(vmap) over a population axis of 2 batches of B = 6;
  * `_search_big`: A = 10, T = 8 (10^8 sequences), no EOT, 32 simulations, mctx's own action
    (greedy=False), jit.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft.thought_search import (SearchResult, canonicalize, enumerate_sequences, search_sequences,
                                   thought_mask)

BETA = 2.0
EOT = 3


def _problem(targets, num_classes, prior_bias, value_weight):
    """(prior_logits_fn, value_fn, reward_fn) closing over the (traced) targets [B,T]."""
    length = targets.shape[1]

    def reward_fn(seqs):
        hamming = jnp.sum(seqs != targets, axis=-1)
        return jax.nn.log_sigmoid(BETA * (length / 2 - hamming))

    def value_fn(prefix, filled):
        hamming = jnp.sum((prefix != targets) & (jnp.arange(length)[None, :] < filled[:, None]), axis=-1)
        return value_weight * jax.nn.log_sigmoid(BETA * (length / 2 - hamming))

    def prior_logits_fn(prefix, position):
        # Adversarial when prior_bias > 0: the prior favours the token after the right one.
        right = jnp.take_along_axis(targets, jnp.minimum(position, length - 1)[:, None], axis=1)[:, 0]
        return prior_bias * jax.nn.one_hot((right + 1) % num_classes, num_classes)

    return prior_logits_fn, value_fn, reward_fn


def _search(key, targets, prior_bias, value_weight, gumbel_scale, num_classes, sims, eot, greedy):
    fns = _problem(targets, num_classes, prior_bias, value_weight)
    return search_sequences(key, *fns, batch_size=targets.shape[0], length=targets.shape[1],
                            num_classes=num_classes, num_simulations=sims, eot=eot,
                            gumbel_scale=gumbel_scale, greedy=greedy)


_search_eot = jax.jit(jax.vmap(functools.partial(_search, num_classes=4, sims=128, eot=EOT, greedy=True),
                               in_axes=(0, 0, None, None, None)))
_search_big = jax.jit(functools.partial(_search, num_classes=10, sims=32, eot=None, greedy=False))

# Per population member, full-length targets (thoughts 0..2) and ones that end early, in one batch.
EOT_TARGETS = jnp.array([[[0, 1, 2], [2, 2, 0], [1, 0, 1], [2, EOT, EOT], [EOT, EOT, EOT], [0, 1, EOT]],
                         [[1, 2, EOT], [0, 0, 0], [EOT, EOT, EOT], [2, 1, 0], [1, EOT, EOT], [2, 0, 2]]],
                        jnp.int32)
POP_KEYS = jax.random.split(jax.random.PRNGKey(0), 2)


def _reward(targets, seqs):
    return _problem(targets, 4, 0.0, 0.0)[2](seqs)


def test_enumerate_sequences():
    np.testing.assert_array_equal(
        enumerate_sequences(3, 2),
        [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]])
    assert enumerate_sequences(3, 2).dtype == jnp.int32
    everything = enumerate_sequences(4, 3)
    assert everything.shape == (64, 3)
    target = jnp.array([2, 0, 3], jnp.int32)
    best = everything[jnp.argmax(_reward(target[None], everything))]
    np.testing.assert_array_equal(best, target)
    with pytest.raises(ValueError, match="max_sequences"):
        enumerate_sequences(10, 8)
    with pytest.raises(ValueError, match="max_sequences"):
        enumerate_sequences(4, 3, max_sequences=63)


def test_canonicalize_and_mask():
    seqs = jnp.array([[2, EOT, 1], [EOT, 0, 0], [0, 1, 2]], jnp.int32)
    np.testing.assert_array_equal(canonicalize(seqs, EOT), [[2, EOT, EOT], [EOT, EOT, EOT], [0, 1, 2]])
    np.testing.assert_array_equal(thought_mask(canonicalize(seqs, EOT), EOT),
                                  [[True, True, False], [True, False, False], [True, True, True]])
    assert bool(thought_mask(seqs, None).all())


def _check_targets(result: SearchResult, targets, eot):
    """Rows sum to 1; the target's token has the most mass where search chose; one-hot EOT after."""
    weights = np.asarray(result.policy_targets)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    mask = np.asarray(thought_mask(targets, eot))
    np.testing.assert_array_equal(weights.argmax(-1)[mask], np.asarray(targets)[mask])
    if eot is not None:
        one_hot_eot = np.eye(weights.shape[-1])[eot]
        np.testing.assert_array_equal(weights[~mask], np.broadcast_to(one_hot_eot, weights[~mask].shape))
        assert np.all(np.asarray(result.root_values)[~mask] == 0.0)


@pytest.mark.parametrize("value_weight", [0.0, 1.0], ids=["zero_value", "prefix_value"])
def test_search_finds_target_with_eot(value_weight):
    """Uniform prior; value 0 (uninformative) or log p of the filled positions (informative).
    Each member of the population axis searches its own batch of targets."""
    result = _search_eot(POP_KEYS, EOT_TARGETS, 0.0, value_weight, 1.0)
    assert result.sequences.shape == (2, 6, 3) and result.sequences.dtype == jnp.int32
    assert result.policy_targets.shape == (2, 6, 3, 4) and result.root_values.shape == (2, 6, 3)
    np.testing.assert_array_equal(result.sequences, EOT_TARGETS)
    for p in range(2):
        _check_targets(jax.tree.map(lambda x: x[p], result), EOT_TARGETS[p], EOT)
    # Root values are averages of returns: between the worst and best reward, log sigmoid(-/+ 3).
    values = np.asarray(result.root_values)[np.asarray(thought_mask(EOT_TARGETS, EOT))]
    assert np.all(values >= float(jax.nn.log_sigmoid(-3.0)) - 1e-5) and np.all(values <= 0.0)


def test_no_recompile_with_new_keys(count_compiles):
    """New keys and new (traced) targets: the compiled search is reused."""
    _search_eot(POP_KEYS, EOT_TARGETS, 0.0, 1.0, 1.0).sequences.block_until_ready()
    problems = [(jax.random.split(jax.random.PRNGKey(seed), 2),
                 canonicalize(jax.random.randint(jax.random.PRNGKey(seed), (2, 6, 3), 0, 4), EOT))
                for seed in (2, 3)]
    with count_compiles() as seen:
        for keys, targets in problems:
            np.testing.assert_array_equal(_search_eot(keys, targets, 0.0, 1.0, 1.0).sequences, targets)
    assert seen == []


@pytest.mark.parametrize("prior_bias", [0.0, 2.0], ids=["uniform_prior", "adversarial_prior"])
def test_search_beyond_enumeration(prior_bias):
    """A = 10, T = 8: 10^8 sequences. An informative value (log p on the filled positions) lets
    32 simulations per position (8 * 33 evaluations per row in all) find every target, even when
    the prior puts e^2 = 7.4 times the mass of the others on a wrong token. mctx's own action with
    gumbel_scale=0 is deterministic, so it must be the best action."""
    targets = jax.random.randint(jax.random.PRNGKey(6), (8, 8), 0, 10)
    with pytest.raises(ValueError):
        enumerate_sequences(10, 8)
    result = _search_big(jax.random.PRNGKey(7), targets, prior_bias, 1.0, 0.0)
    np.testing.assert_array_equal(result.sequences, targets)
    _check_targets(result, targets, None)
    # With Gumbel noise (exploration) the output is still a valid sequence with proper targets.
    noisy = _search_big(jax.random.PRNGKey(8), targets, prior_bias, 1.0, 1.0)
    assert int(noisy.sequences.min()) >= 0 and int(noisy.sequences.max()) < 10
    np.testing.assert_allclose(noisy.policy_targets.sum(-1), 1.0, atol=1e-5)
