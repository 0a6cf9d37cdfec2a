"""The thinking-token core (rlsoft.think_loop, rlsoft.think_testbed) on hand-built table models.

The thinker is a table of logits per (question, position); the answerer a table of answer logits
per thought sequence (blind): log p_ans(a | thoughts) is known exactly, so rewards, gradients and
updates can be checked by hand.
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft import optim
from rlsoft import think_loop as tl
from rlsoft.driver import stream_keys
from rlsoft.think_testbed import ThinkTestbed

M, A, T, B = 4, 3, 2, 4  # answers, thought classes, thought length, questions per batch


def seq_id(thoughts):
    return thoughts[..., 0] * A + thoughts[..., 1]


def thinker_logits(params, questions, thoughts):
    del thoughts  # causal by construction: position t ignores every thought
    return params["th"][questions[:, 0]]  # [B,T,A]


def answer_logits(params, questions, thoughts):
    del questions  # blind
    return params["W"][seq_id(thoughts)]  # [B,M]


def batch_fn(key):
    q = jax.random.randint(key, (B, 1), 0, M)
    a = q[:, 0]
    return q, a, jnp.stack([a // A, a % A], -1)  # hand thoughts: a in base A


FNS = tl.ThinkFns(thinker_logits, answer_logits, batch_fn, length=T, num_classes=A)


def init_member(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"th": jax.random.normal(k1, (M, T, A))}, {"W": jax.random.normal(k2, (A ** T, M))}


@dataclasses.dataclass(frozen=True)
class Cfg(tl.ThinkConfig):
    seed: int = 0
    population: int = 1
    chunk: int = 3


def sgd(lr):
    return optim.OptimizerConfig(name="sgd", learning_rate=lr, grad_clip=0.0)


def test_device_reward_is_the_answerers_log_prob():
    _, ans = init_member(0)
    q, a, _ = batch_fn(jax.random.PRNGKey(1))
    thoughts = jnp.array([[0, 1], [2, 2], [1, 0], [0, 0]])
    want = jax.nn.log_softmax(ans["W"][np.asarray(seq_id(thoughts))], -1)[np.arange(B), np.asarray(a)]
    chex.assert_trees_all_close(tl.answer_log_prob(FNS, ans, q, thoughts, a), want, rtol=1e-6)


@pytest.mark.parametrize("eot", [None, A - 1])
def test_blind_reward_table_equals_the_per_row_reward(eot):
    """A blind answerer's rewards from one pass over the A^T sequences and a gather."""
    fns = FNS._replace(eot=eot, blind=True)
    _, ans = init_member(0)
    thoughts = tl.canonicalize(jax.random.randint(jax.random.PRNGKey(6), (32, T), 0, A), eot)
    answers = jax.random.randint(jax.random.PRNGKey(7), (32,), 0, M)
    q = jnp.zeros((32, 1), jnp.int32)
    chex.assert_trees_all_close(tl.blind_answer_log_prob(fns, ans, thoughts, answers, 1),
                                tl.answer_log_prob(fns, ans, q, thoughts, answers), rtol=1e-6)


def test_reward_gradient_reaches_the_answerer_only_through_its_own_loss():
    """The reward is a stop-gradient: the answerer's gradient is that of L_ans alone, and the
    thinker's is the weighted log-likelihood of its samples."""
    cfg = Cfg(thinker=sgd(0.1), answerer=sgd(0.1), group_size=3)
    th, ans = init_member(0)
    q, a, hand = batch_fn(jax.random.PRNGKey(2))
    thoughts, rewards, _ = tl._explore(FNS, cfg, th, ans, q, a, hand, jnp.int32(0), jax.random.PRNGKey(3))
    grads, _ = jax.grad(tl.step_loss, has_aux=True)({"thinker": th, "answerer": ans}, q, a, hand, thoughts,
                                                     rewards, None, FNS, cfg)
    flat = thoughts.reshape(-1, T)
    ce = lambda p: -jnp.mean(tl.answer_log_prob(FNS, p, jnp.repeat(q, 3, 0), flat, jnp.repeat(a, 3)))
    chex.assert_trees_all_close(grads["answerer"], jax.grad(ce)(ans), rtol=1e-5, atol=1e-7)
    want = tl.answer_log_prob(FNS, ans, jnp.repeat(q, 3, 0), flat, jnp.repeat(a, 3)).reshape(B, 3)
    chex.assert_trees_all_close(rewards, want, rtol=1e-6)


def test_answerer_update_matches_a_hand_computation():
    """SGD on the cross-entropy of the hand-made thoughts (super): W[s, :] -= lr * (p - onehot(a)) / B."""
    lr = 0.5
    cfg = Cfg(thinker=sgd(0.1), answerer=sgd(lr), super=True, entropy_coef=0.0)
    th, ans = init_member(0)
    state = tl.init_state(th, ans, cfg)
    batch = batch_fn(jax.random.PRNGKey(4))
    new, metrics = tl.train_step(state, batch, jax.random.PRNGKey(5), fns=FNS, cfg=cfg)
    q, a, hand = map(np.asarray, batch)
    w = np.array(ans["W"], np.float64)
    want = w.copy()
    for s, y in zip(seq_id(hand), a):
        p = np.exp(w[s] - w[s].max())
        p /= p.sum()
        want[s] -= lr * (p - np.eye(M)[y]) / B
    np.testing.assert_allclose(new.params("answerer")["W"], want, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1 and np.isfinite(float(metrics["train/answerer_loss"]))


def test_enumeration_finds_the_best_thought():
    """A fixed answerer (lr ~ 0) that is sure of answer a only after the thought (a // A, a % A):
    the enumerated group's softmax weights train the thinker to write it."""
    cfg = Cfg(search="enumerate", clean=False, scheme="softmax", tau=0.5, thinker=optim.OptimizerConfig(
        name="adam", learning_rate=0.1, grad_clip=0.0), answerer=sgd(1e-12), entropy_coef=0.0)
    th, _ = init_member(0)
    w = jnp.full((A ** T, M), -5.0).at[jnp.arange(M), jnp.arange(M)].set(5.0)  # seq id s -> answer s
    state = tl.init_state(th, {"W": w}, cfg)
    step = jax.jit(lambda s, k: tl.train_step(s, batch_fn(k), k, fns=FNS, cfg=cfg))
    for i in range(60):
        state, metrics = step(state, jax.random.PRNGKey(i))
    q = jnp.arange(M)[:, None]
    greedy = tl.greedy_thoughts(tl.thinker_logits_at(FNS, state.params("thinker"), q), M, FNS)
    np.testing.assert_array_equal(seq_id(greedy), np.arange(M))


def test_thought_mask_and_canonical_sequences():
    fns = FNS._replace(num_classes=A + 1, eot=A)  # classes 0..2 and eot 3
    th = jnp.array([[1, 3, 2], [3, 0, 0], [0, 1, 2]])
    np.testing.assert_array_equal(tl.thought_mask(th, A), [[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(tl.canonicalize(th, A), [[1, 3, 3], [3, 3, 3], [0, 1, 2]])
    every = tl.canonical_sequences(fns)  # T = 2: 3 * 3 two-thought sequences, 3 "x, eot", and "eot, eot"
    assert every.shape == (13, 2) and len({tuple(r) for r in every}) == 13


def _population(cfg, steps):
    testbed = ThinkTestbed(cfg, FNS, init_member, tuple(map(np.asarray, batch_fn(jax.random.PRNGKey(9)))),
                           total_steps=steps)
    state = testbed.init_state()
    state, metrics = testbed.train(state, 0, steps, stream_keys(cfg.seed, testbed.streams))
    return testbed, state


@pytest.mark.slow  # four compiles of the chunk
def test_population_equals_separate_runs():
    cfg = Cfg(population=3, thinker=sgd(0.3), answerer=sgd(0.3), group_size=4, token_epsilon=0.1)
    _, pop = _population(cfg, 3)
    for p in range(3):
        _, single = _population(dataclasses.replace(cfg, population=1, seed=p), 3)
        chex.assert_trees_all_close(tl.unstack_member(pop, p), tl.unstack_member(single, 0), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # two compiles
def test_compiled_chunk_equals_step_by_step():
    cfg = Cfg(thinker=sgd(0.3), answerer=sgd(0.3), group_size=4, epsilon=0.5, epsilon_decay=0.9)
    testbed, chunked = _population(cfg, 4)
    state = tl.unstack_member(testbed.init_state(), 0)
    keys = stream_keys(0, testbed.streams)
    for s in range(4):
        batch = batch_fn(jax.random.fold_in(keys["data"], s))
        state, _ = tl.train_step(state, batch, jax.random.fold_in(keys["explore"], s), fns=FNS, cfg=cfg)
    chex.assert_trees_all_close(tl.unstack_member(chunked, 0), state, rtol=1e-6, atol=1e-7)


def _population_of_two():
    cfg = Cfg(population=2, thinker=sgd(0.3), answerer=sgd(0.3), group_size=4)
    testbed = ThinkTestbed(cfg, FNS, init_member, tuple(map(np.asarray, batch_fn(jax.random.PRNGKey(9)))),
                           total_steps=9)
    return testbed, testbed.init_state(), stream_keys(0, testbed.streams)


def test_no_recompiles_after_the_first_call(count_compiles):
    testbed, state, keys = _population_of_two()
    state, _ = testbed.train(state, 0, 3, keys)
    testbed.evaluate(state)
    with count_compiles() as seen:
        state, _ = testbed.train(state, 3, 3, keys)
        testbed.evaluate(state)
    assert seen == []


def test_mutual_information_plug_in():
    answers = np.array([0, 1, 2, 3] * 25)
    assert tl.mutual_information_bits(answers[:, None], answers) == pytest.approx(2.0)
    assert tl.mutual_information_bits(np.zeros((100, 2), int), answers) == pytest.approx(0.0, abs=1e-12)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="search='tree' is unknown"):
        tl.ThinkConfig(search="tree")
    with pytest.raises(ValueError, match="token_epsilon=1.5 is invalid"):
        tl.ThinkConfig(token_epsilon=1.5)
    with pytest.raises(ValueError, match="use --search=mctx"):
        tl.validate(tl.ThinkConfig(search="enumerate"), 4, 9, None)
    assert tl.count_sequences(A + 1, T, A) == len(tl.canonical_sequences(FNS._replace(num_classes=A + 1, eot=A)))


def test_compile_ahead_leaves_train_and_eval_nothing_to_compile(count_compiles):
    from rlsoft.compile_cache import compile_ahead

    testbed, state, keys = _population_of_two()
    with count_compiles() as seen:
        assert len(compile_ahead(testbed.lower(state, 0, 3, keys))) == 2  # the scan and the evaluator
    assert seen.count("jit(member)") == 2
    with count_compiles() as seen:
        state, _ = testbed.train(state, 0, 3, keys)
        testbed.evaluate(state)
    assert "jit(member)" not in seen
