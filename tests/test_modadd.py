"""envs.modadd: the exact seeded split (disjoint, complete, train-only sampling on device), answers,
hand-made thoughts in both modes, and one-line config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from envs.modadd import ModAdd, ModAddConfig, num_digits, shuffle, shuffle_keys


def _error(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        ModAddConfig(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_shuffle_is_a_permutation_and_its_inverse():
    for n in (7, 1000):
        keys, consts = shuffle_keys(n, seed=3)
        both = jax.jit(lambda x: (lambda p: (p, shuffle(p, n, keys, consts, inverse=True)))(
            shuffle(x, n, keys, consts)))
        p, back = map(np.asarray, both(jnp.arange(n, dtype=jnp.int32)))
        assert sorted(p.tolist()) == list(range(n)) and (back == np.arange(n)).all()


def _split_table(task: ModAdd):
    """(all tuples [N,k], is_test [N]) in one compiled call."""
    return tuple(map(np.asarray, jax.jit(lambda i: (lambda q: (q, task.is_test(q)))(task.questions_at(i)))(
        jnp.arange(task.cfg.num_tuples, dtype=jnp.int32))))


def test_split_exact_size_disjoint_and_complete():
    task = ModAdd(ModAddConfig(modulus=23, num_operands=2, test_fraction=0.25))
    everything, test_mask = _split_table(task)
    assert test_mask.sum() == task.cfg.num_test == round(0.25 * 23 * 23)
    held_out = task.test_questions(limit=10**6)  # all of them
    assert held_out.shape == (task.cfg.num_test, 2) and held_out.dtype == np.int32
    np.testing.assert_array_equal(held_out, everything[test_mask])  # same set, sorted
    # A sample: a sorted subset of the test set, deterministic.
    sample = task.test_questions(limit=17)
    assert sample.shape == (17, 2) and len({tuple(q) for q in sample}) == 17
    assert {tuple(q) for q in sample} <= {tuple(q) for q in held_out}
    np.testing.assert_array_equal(sample, task.test_questions(limit=17))
    assert task.test_questions(0).shape == (0, 2)


def test_split_looks_random():
    """Per-first-operand, per-last-operand and per-answer test counts spread like a random split
    (hypergeometric std ~ sqrt(M f (1-f)) = 4 for M=100, f=0.2), not like a structured one."""
    task = ModAdd(ModAddConfig(modulus=100, num_operands=2, test_fraction=0.2))
    grid = _split_table(task)[1].reshape(100, 100)
    answer = np.add.outer(np.arange(100), np.arange(100)) % 100
    for counts in (grid.sum(0), grid.sum(1), np.bincount(answer[grid], minlength=100)):
        assert counts.mean() == 20 and 2.5 < counts.std() < 6 and counts.min() >= 5


def test_train_batch_is_exactly_train_and_covers_train():
    task = ModAdd(ModAddConfig(modulus=13, num_operands=2, test_fraction=0.3))

    @jax.jit
    def draw(keys):
        q = jax.vmap(lambda key: task.train_batch(key, 512))(keys).reshape(-1, 2)  # 32768 draws
        return q, task.index(q), task.is_test(q)

    q, index, test = map(np.asarray, draw(jax.random.split(jax.random.PRNGKey(0), 64)))
    assert q.dtype == np.int32 and ((q >= 0) & (q < 13)).all() and not test.any()
    counts = np.bincount(index, minlength=169)
    assert (counts > 0).sum() == task.cfg.num_train  # every train tuple drawn (118 of them)
    expected = len(q) / task.cfg.num_train
    assert np.abs(counts[counts > 0] - expected).max() < 6 * np.sqrt(expected)  # uniform


def test_large_space_is_not_materialised():
    task = ModAdd(ModAddConfig(modulus=1000, num_operands=3, max_thoughts=3, test_fraction=0.2, split_seed=5))

    @jax.jit
    def run(key):
        k1, k2 = jax.random.split(key)
        q = task.train_batch(k1, 4096)
        uniform = jax.random.randint(k2, (20000, 3), 0, 1000)
        return q, task.is_test(q).any(), task.is_test(uniform).mean()

    q, any_test, fraction = run(jax.random.PRNGKey(1))
    assert q.shape == (4096, 3) and not bool(any_test) and abs(float(fraction) - 0.2) < 0.02
    held_out = task.test_questions(limit=500)
    assert held_out.shape == (500, 3) and len(np.unique(np.asarray(task.index(held_out)))) == 500
    assert np.asarray(task.is_test(held_out)).all()


def test_split_is_deterministic_by_seed():
    cfg = ModAddConfig(modulus=31, num_operands=2, split_seed=7)
    a, b = ModAdd(cfg).test_questions(10**6), ModAdd(cfg).test_questions(10**6)
    np.testing.assert_array_equal(a, b)
    other = ModAdd(ModAddConfig(modulus=31, num_operands=2, split_seed=8)).test_questions(10**6)
    assert len(other) == len(a) and not np.array_equal(a, other)
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(ModAdd(cfg).train_batch(key, 64), ModAdd(cfg).train_batch(key, 64))


def test_answers():
    task = ModAdd(ModAddConfig(modulus=100, num_operands=3, max_thoughts=2))
    q = jnp.array([[1, 2, 3], [99, 99, 99], [50, 50, 0], [0, 0, 0]])
    np.testing.assert_array_equal(task.answers(q), [6, 97, 0, 0])
    assert task.answers(q[None]).shape == (1, 4) and task.is_test(q[None]).shape == (1, 4)


def test_hand_thoughts_fixed():
    task = ModAdd(ModAddConfig(modulus=100, thought_vocab=10, max_thoughts=2))
    np.testing.assert_array_equal(task.hand_thoughts(jnp.array([52, 7, 0, 99])),
                                  [[5, 2], [0, 7], [0, 0], [9, 9]])
    task3 = ModAdd(ModAddConfig(modulus=100, thought_vocab=10, max_thoughts=3))
    np.testing.assert_array_equal(task3.hand_thoughts(jnp.array([52, 7])), [[0, 5, 2], [0, 0, 7]])
    binary = ModAdd(ModAddConfig(modulus=13, thought_vocab=2, max_thoughts=4))  # 12 = 1100b
    np.testing.assert_array_equal(binary.hand_thoughts(jnp.array([12, 5])), [[1, 1, 0, 0], [0, 1, 0, 1]])


def test_hand_thoughts_eot():
    task = ModAdd(ModAddConfig(modulus=100, thought_vocab=10, max_thoughts=3, fixed_length=False))
    assert task.cfg.eot == 10 and task.cfg.thought_classes == 11
    np.testing.assert_array_equal(task.hand_thoughts(jnp.array([52, 7, 0, 99, 10])),
                                  [[5, 2, 10], [7, 10, 10], [0, 10, 10], [9, 9, 10], [1, 0, 10]])
    long = ModAdd(ModAddConfig(modulus=100, thought_vocab=10, max_thoughts=5, fixed_length=False))
    np.testing.assert_array_equal(long.hand_thoughts(jnp.array([[52], [7]])), [[[5, 2, 10, 10, 10]], [[7, 10, 10, 10, 10]]])


def test_hand_thoughts_spell_every_answer():
    for fixed in (True, False):
        task = ModAdd(ModAddConfig(modulus=50, thought_vocab=3, max_thoughts=5, fixed_length=fixed))
        h = np.asarray(task.hand_thoughts(jnp.arange(50)))
        for a, row in enumerate(h):
            digits = [int(d) for d in row if d != 3]
            assert int("".join(map(str, digits)), 3) == a and (fixed or row[len(digits)] == 3)
            assert fixed == (3 not in row)


def test_num_digits():
    assert [num_digits(x, 10) for x in (0, 9, 10, 99, 100)] == [1, 1, 2, 2, 3]
    assert num_digits(12, 2) == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_thoughts=1), "max_thoughts=1 is too small: modulus=100 needs 2 base-10 digits"),
    (dict(max_thoughts=2, fixed_length=False),
     "max_thoughts=2 is too small: modulus=100 needs 2 base-10 digits and an end-of-thought token"),
    (dict(modulus=1), "modulus=1 is invalid; need an integer >= 2"),
    (dict(num_operands=0), "num_operands=0 is invalid"),
    (dict(thought_vocab=1), "thought_vocab=1 is invalid"),
    (dict(max_thoughts=0), "max_thoughts=0 is invalid"),
    (dict(modulus=2.5), "modulus=2.5 is invalid"),
    (dict(split_seed=-1), "split_seed=-1 is invalid"),
    (dict(fixed_length="yes"), "fixed_length='yes' is invalid"),
    (dict(test_fraction=1.0), "test_fraction=1.0 is invalid"),
    (dict(test_fraction=float("nan")), "test_fraction=nan is invalid"),
    (dict(modulus=2, num_operands=1, test_fraction=0.8), "test_fraction=0.8 is invalid; it leaves no train"),
    (dict(modulus=1000, num_operands=4), "modulus=1000, num_operands=4 is invalid; need modulus**num_operands"),
])
def test_validation(kwargs, message):
    assert message in _error(**kwargs)


def test_bad_call_arguments():
    task = ModAdd(ModAddConfig())
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        task.train_batch(jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="limit=-1 is invalid"):
        task.test_questions(-1)
