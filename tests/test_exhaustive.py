"""Exhaustive exploration (rlsoft.exhaustive, as the char testbed's step uses it) and the character GPT.

* The exhaustive gradient is the exact expectation of the sampled one where the math says so
  ("raw" and "rloo": E = exhaustive raw; "drgrpo": E = (G - 1)/G times it), checked on a bigram
  table with 20k draws per context within 5 standard errors, with a power check.
* It equals a brute-force V-pass computation on a real char_gpt (candidate appended, scored at the
  position that predicts it) to 1e-5, and differs from the seed's wrong-position scoring; the
  benchmark's V-pass baseline (benchmarks/per_candidate.py) equals it too.
* char_gpt: shapes, dtypes, causality, parameter counts of the presets.
Every loss here is the testbed's own, `rlsoft.exhaustive_loop.step_loss`, on a fixed reward table
with clip_eps = 0 (the objective of the current policy) and no entropy or KL term.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.per_candidate import per_candidate_value_and_grad
from models import char_gpt
from rlsoft import exhaustive, exhaustive_loop as xl
from rlsoft.weighting import compute_weights

# --------------------------------------------------------------------------------------------
# A bigram "model": logits = params[context[-1]]. Cheap enough for 20k sampled gradients.

V, B = 6, 3


def bigram_logits(params, contexts):
    return params[contexts[:, -1]]


def _bigram_problem(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = 0.7 * jax.random.normal(k1, (V, V))
    contexts = jnp.array([[4, 0], [1, 2], [0, 5]], jnp.int32)  # distinct last tokens: 0, 2, 5
    rewards = jax.random.uniform(k2, (B, V))  # continuous: no ties
    return params, contexts, rewards


def _loss(params, contexts, rewards, scheme, mixing="pi", logits_fn=bigram_logits, tau=0.5, mode="exhaustive",
          key=None, group_size=8):
    """The char testbed's loss on the reward table `rewards` [B,V]."""
    fns = xl.NextTokenFns(logits_fn, batch_fn=None, reward_fn=lambda contexts, targets, probs: rewards)
    cfg = xl.ExhaustiveConfig(scheme=scheme, tau=tau, mode=mode, mixing=mixing, group_size=group_size, clip_eps=0.0)
    return xl.step_loss(params, params, contexts, None, key, fns, cfg)[0]


def _exhaustive_grad(params, contexts, rewards, scheme, mixing="pi", logits_fn=bigram_logits, tau=0.5):
    return jax.jit(jax.grad(lambda p: _loss(p, contexts, rewards, scheme, mixing, logits_fn, tau)))(params)


def test_sampled_mean_matches_exhaustive():
    """E[sampled grad] = scale x exhaustive raw grad, per coordinate within 5 standard errors.

    raw (w = r): REINFORCE, unbiased. rloo: unbiased (its baseline excludes the sample itself).
    drgrpo: w_i = r_i - mean_j r_j includes r_i, so E = (1 - 1/G) x raw (E[grad log pi] = 0 kills
    the other samples' share). 20k draws per context (5,000 groups of G = 4), one compiled call.
    """
    params, contexts, rewards = _bigram_problem()
    group, n_keys = 4, 5_000
    cases = {"raw": 1.0, "rloo": 1.0, "drgrpo": (group - 1) / group}

    def one(key):  # the same draws for every scheme (sampling does not depend on the weights)
        grad = lambda scheme: jax.grad(lambda p: _loss(p, contexts, rewards, scheme, mode="sampled", key=key,
                                                       group_size=group))(params)
        return {scheme: grad(scheme) for scheme in cases}

    all_grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(1), n_keys))
    exact = _exhaustive_grad(params, contexts, rewards, "raw")
    used = np.zeros((V, V), bool)
    used[np.asarray(contexts[:, -1])] = True
    for scheme, scale in cases.items():
        grads = all_grads[scheme]
        mean, se = grads.mean(0), grads.std(0) / np.sqrt(n_keys)
        assert np.all(se[~used] == 0) and np.all(mean[~used] == 0) and np.all(exact[~used] == 0)
        z = np.abs(mean - scale * exact)[used] / se[used]
        assert z.max() < 5.0, (scheme, z.max())
        if scale != 1.0:  # power: the same data reject the unscaled expectation
            assert (np.abs(mean - exact)[used] / se[used]).max() > 5.0, scheme


def test_exhaustive_baseline_cancels_under_pi():
    """sum_c pi grad log pi = 0: raw == drgrpo, rloo == V/(V-1) raw, with pi mixing; not with uniform."""
    params, contexts, rewards = _bigram_problem()
    raw = _exhaustive_grad(params, contexts, rewards, "raw")
    np.testing.assert_allclose(_exhaustive_grad(params, contexts, rewards, "drgrpo"), raw, atol=1e-6)
    np.testing.assert_allclose(_exhaustive_grad(params, contexts, rewards, "rloo"), raw * V / (V - 1), atol=1e-6)
    u_raw = _exhaustive_grad(params, contexts, rewards, "raw", "uniform")
    u_dr = _exhaustive_grad(params, contexts, rewards, "drgrpo", "uniform")
    assert np.abs(u_raw - u_dr).max() > 1e-3


@pytest.mark.parametrize("mixing", exhaustive.MIXINGS)
def test_logit_gradient_formula(mixing):
    """d L / d logit_j = -(q_j w_j - pi_j sum_c q_c w_c) / B, logits as the parameters."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (B, V))
    rewards = jax.random.normal(jax.random.PRNGKey(4), (B, V))
    ctx = jnp.zeros((B, 1), jnp.int32)
    g = _exhaustive_grad(logits, ctx, rewards, "linear", mixing, logits_fn=lambda p, c: p)
    w, pi = compute_weights(rewards, "linear"), jax.nn.softmax(logits)
    q = pi if mixing == "pi" else jnp.full_like(pi, 1.0 / V)
    expected = -(q * w - pi * jnp.sum(q * w, -1, keepdims=True)) / B
    np.testing.assert_allclose(g, expected, atol=1e-6)


def test_uniform_mixing_identities():
    """uniform + best_of_n on exact match = cross-entropy; uniform + softmax = CE(softmax(r/tau), pi)."""
    params, contexts, _ = _bigram_problem()
    targets = jnp.array([3, 1, 4])
    onehot = jax.nn.one_hot(targets, V)
    ce = lambda p: -jnp.mean(jax.nn.log_softmax(bigram_logits(p, contexts))[jnp.arange(B), targets])
    np.testing.assert_allclose(_exhaustive_grad(params, contexts, onehot, "best_of_n", "uniform"),
                               jax.grad(ce)(params), atol=1e-6)
    rewards = jax.random.normal(jax.random.PRNGKey(5), (B, V))
    loss = jax.jit(lambda p: _loss(p, contexts, rewards, "softmax", "uniform", tau=0.5))(params)
    soft = jax.nn.softmax(rewards / 0.5)
    expected = -jnp.mean(jnp.sum(soft * jax.nn.log_softmax(bigram_logits(params, contexts)), -1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("mixing, k", [("pi", 1), ("pi", 6), ("uniform", 2)])
def test_per_candidate_baseline_equals_exhaustive(mixing, k):
    """The benchmark's V-pass baseline on the bigram seen as a sequence model (logits[t] = params[tokens[t]]):
    k = 1 is a loop of V passes, k = V one vmapped batch."""
    params, contexts, rewards = _bigram_problem()
    ex_loss, ex_grad = jax.jit(jax.value_and_grad(lambda p: _loss(p, contexts, rewards, "linear", mixing)))(params)
    loss, grad = jax.jit(functools.partial(
        per_candidate_value_and_grad, sequence_logits_fn=lambda p, t: p[t], scheme="linear",
        mixing=mixing, candidates_per_pass=k))(params, contexts, rewards)
    np.testing.assert_allclose(loss, ex_loss, atol=1e-6)
    np.testing.assert_allclose(grad, ex_grad, atol=1e-6)


def test_bad_arguments():
    params, contexts, rewards = _bigram_problem()
    with pytest.raises(ValueError, match="mixing='sampled' is unknown"):
        exhaustive.exhaustive_objective(params[0], rewards[0], mixing="sampled")
    with pytest.raises(ValueError, match="group_size=1 is invalid"):
        xl.ExhaustiveConfig(mode="sampled", group_size=1)
    seq = lambda p, t: p[t]
    with pytest.raises(ValueError, match="candidates_per_pass=4 is invalid"):
        per_candidate_value_and_grad(params, contexts, rewards, seq, "raw", candidates_per_pass=4)


# --------------------------------------------------------------------------------------------
# Brute force on a real char_gpt: one forward pass per candidate.


@pytest.fixture(scope="module")
def tiny_gpt():
    """A tiny char_gpt, 3 contexts of block_size - 1 tokens, rewards [3, 65], and the brute force."""
    cfg = char_gpt.CharGPTConfig.preset("tiny")
    graphdef, state = char_gpt.init_model(cfg)
    contexts = jax.random.randint(jax.random.PRNGKey(1), (3, cfg.block_size - 1), 0, cfg.vocab_size)
    rewards = jax.random.uniform(jax.random.PRNGKey(2), (3, cfg.vocab_size))
    (b, c_len), v = contexts.shape, cfg.vocab_size
    w = compute_weights(rewards, "linear")

    def one(st, c, position, uniform):
        """(1/B) sum_b q_b(c) w_b(c) log pi_b(c) from ONE forward pass on [context, c]."""
        tokens = jnp.concatenate([contexts, jnp.full((b, 1), c, contexts.dtype)], 1)
        logits = jnp.take(char_gpt.forward(graphdef, st, tokens), position, axis=1)
        logp = jax.nn.log_softmax(logits)[:, c]
        q = jnp.where(uniform, 1.0 / v, jax.lax.stop_gradient(jnp.exp(logp)))
        return -jnp.sum(q * w[:, c] * logp) / b

    @jax.jit  # compiled once: candidate, position and mixing are traced
    def add_grad(total, st, c, position, uniform):
        return jax.tree.map(jnp.add, total, jax.grad(one)(st, c, position, uniform))

    def brute_force(mixing, position):
        """sum over the 65 candidates of grad(one): one forward + backward per candidate."""
        total = jax.tree.map(jnp.zeros_like, state)
        for c in range(v):
            total = add_grad(total, state, jnp.int32(c), jnp.int32(position), jnp.bool_(mixing == "uniform"))
        return total

    return graphdef, state, contexts, rewards, brute_force


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("mixing", exhaustive.MIXINGS)
def test_exhaustive_equals_brute_force_on_char_gpt(tiny_gpt, mixing):
    graphdef, state, contexts, rewards, brute_force = tiny_gpt
    c_len = contexts.shape[1]
    grads = _exhaustive_grad(state, contexts, rewards, "linear", mixing, logits_fn=char_gpt.logits_fn(graphdef))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads)) > 1e-3  # non-trivial
    assert _max_diff(grads, brute_force(mixing, position=c_len - 1)) < 1e-5
    if mixing == "pi":  # the seed's position (logits AFTER the candidate) is a different gradient
        assert _max_diff(brute_force(mixing, position=c_len), grads) > 1e-3


# --------------------------------------------------------------------------------------------
# char_gpt.


def test_char_gpt_shapes_causality_last_logits(tiny_gpt):
    graphdef, state = tiny_gpt[:2]
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 65)
    positions = (2, 5, 7)
    variants = jnp.stack([tokens] + [tokens.at[:, t].set((tokens[:, t] + 1) % 65) for t in positions])

    @jax.jit
    def run(st):
        out = char_gpt.forward(graphdef, st, variants.reshape(-1, 8)).reshape(4, 2, 8, 65)
        return out, char_gpt.last_logits(graphdef, st, tokens[:, :5]), char_gpt.forward(graphdef, st, tokens[:, :5])

    out, last, prefix = run(state)
    assert out.shape == (4, 2, 8, 65) and out.dtype == jnp.float32 and last.shape == (2, 65)
    np.testing.assert_allclose(last, prefix[:, -1], atol=1e-6)
    np.testing.assert_allclose(prefix, out[0, :, :5], atol=1e-6)
    for i, t in enumerate(positions, start=1):  # a changed token t leaves every earlier position alone
        np.testing.assert_allclose(out[i, :, :t], out[0, :, :t], atol=1e-6)
        assert np.abs(out[i, :, t] - out[0, :, t]).max() > 1e-4
    with pytest.raises(ValueError, match="sequence length 9 is invalid"):
        jax.eval_shape(functools.partial(char_gpt.forward, graphdef), state, jnp.zeros((1, 9), jnp.int32))


def test_char_gpt_bfloat16_untied():
    cfg = char_gpt.CharGPTConfig.preset("tiny", dtype="bfloat16", tie_embeddings=False)
    graphdef, state = char_gpt.init_model(cfg)
    assert char_gpt.param_count(state) == cfg.num_params
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 65)
    logits, last = jax.jit(lambda st: (char_gpt.forward(graphdef, st, tokens),
                                       char_gpt.last_logits(graphdef, st, tokens)))(state)
    assert logits.shape == (2, 8, 65) and logits.dtype == jnp.float32 and np.isfinite(logits).all()
    np.testing.assert_allclose(last, logits[:, -1], atol=1e-2)


@pytest.mark.parametrize("preset, target", [("cpu", 0.5e6), ("20m", 20e6)])
def test_char_gpt_param_counts(preset, target):
    for tie in (True, False):
        cfg = char_gpt.CharGPTConfig.preset(preset, tie_embeddings=tie)
        abstract = nnx.eval_shape(lambda: char_gpt.CharGPT(cfg, rngs=nnx.Rngs(0)))
        n = char_gpt.param_count(abstract)
        assert n == cfg.num_params
        assert abs(n - target) / target < 0.15, n


def test_char_gpt_config_errors():
    with pytest.raises(ValueError, match="^n_embd=30 is invalid; not divisible by n_head=4$"):
        char_gpt.CharGPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dtype='float16' is invalid"):
        char_gpt.CharGPTConfig(dtype="float16")
    with pytest.raises(ValueError, match="preset='huge' is unknown"):
        char_gpt.CharGPTConfig.preset("huge")
    with pytest.raises(ValueError, match="n_layer=0 is invalid"):
        char_gpt.CharGPTConfig(n_layer=0)
