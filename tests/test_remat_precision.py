"""Memory settings of the training forward (models/qwen2_train.py): per-block rematerialisation
(--remat) changes what the backward keeps, not the gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import countdown
from models import qwen2, qwen2_train
from rlsoft import train_loop
from rlsoft.config import parse_flags
from rlsoft.rollout import prompt_positions

V, Q, G, P, N = 97, 2, 4, 21, 40


def _model(**overrides):
    return nnx.split(qwen2.Qwen2(qwen2.Qwen2Config.preset("tiny", vocab_size=V, **overrides), rngs=nnx.Rngs(0)))


def _batch():
    rng = np.random.default_rng(0)
    pmask = np.ones((Q, P), bool)
    pmask[0, :5] = False
    prompts = np.where(pmask, rng.integers(1, V, (Q, P)), 0).astype(np.int32)
    rmask = np.ones((Q * G, N), bool)
    rmask[1, 30:] = False
    responses = np.where(rmask, rng.integers(1, V, (Q * G, N)), 0).astype(np.int32)
    return prompts, pmask, responses, rmask


def _losses(gd, remat):
    """Two scalar losses of the params: through `response_logits` (prompt prefix + responses) and
    through `train_forward` (whole sequences), each sum(logits * R) over the real response positions."""
    prompts, pmask, responses, rmask = _batch()
    r = jax.random.normal(jax.random.key(3), (Q * G, N, V))
    live = jnp.asarray(rmask)[..., None]
    tokens = np.concatenate([np.repeat(prompts, G, 0), responses], 1)
    mask = np.concatenate([np.repeat(pmask, G, 0), rmask], 1)
    pos = prompt_positions(jnp.asarray(mask))
    shared_fn = qwen2_train.response_logits(gd, block=64, remat=remat)
    forward = qwen2_train.train_forward(gd, block=64, remat=remat)

    def shared(params):
        return jnp.sum(jnp.where(live, shared_fn(params, prompts, pmask, responses, rmask) * r, 0.0))

    def whole(params):
        return jnp.sum(jnp.where(live, forward(params, tokens, pos, mask)[:, P - 1:-1] * r, 0.0))

    return shared, whole


def _checkpoints(fn, params) -> int:
    """How many jax.checkpoint (primitive `remat2`) calls the traced function makes at its top level."""
    return sum(e.primitive.name == "remat2" for e in jax.make_jaxpr(fn)(params).eqns)


def _assert_close_to_scale(got, want, tol):
    """max |got - want| <= tol * max |want|, per leaf: float32 sums regrouped by XLA's fusions differ
    by a few ulps of the leaf's largest terms, however small an entry is."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.max(np.abs(g - w)) <= tol * np.max(np.abs(w)), (np.max(np.abs(g - w)), np.max(np.abs(w)))


@functools.lru_cache(maxsize=None)
def _grads(remat: str, which: int):
    """Gradients of loss `which` (0: response_logits, 1: train_forward) under `remat`."""
    gd, params = _model()
    return jax.jit(jax.grad(_losses(gd, remat)[which]))(params)


def test_remat_puts_each_block_under_a_checkpoint():
    gd, params = _model()
    layers = qwen2.PRESETS["tiny"]["num_hidden_layers"]
    for remat in qwen2_train.REMAT:
        shared, whole = _losses(gd, remat)
        per_pass = 0 if remat == "none" else layers
        # One checkpoint per transformer block and pass (prompt pass + response pass).
        assert _checkpoints(shared, params) == 2 * per_pass and _checkpoints(whole, params) == per_pass


# Two compiles each (~30 s on the shared 2-core VM): the slow pass.
@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gradients_equal_no_remat(remat):
    # float32 recomputation of the same ops: equal to ~1e-7 of each leaf's scale (measured 2e-7).
    _assert_close_to_scale(_grads(remat, 0), _grads("none", 0), 2e-6)


@pytest.mark.slow
def test_remat_whole_sequence_forward_gradients_equal_no_remat():
    _assert_close_to_scale(_grads("full", 1), _grads("none", 1), 2e-6)


def test_remat_flag_reaches_the_forward_and_a_bad_value_exits_2(capsys):
    cfg = parse_flags(countdown.CountdownConfig, ["--remat=dots"], prog="prog")
    assert cfg.remat == "dots" and train_loop.TrainConfig().remat == "none"
    assert set(train_loop.REMAT_POLICIES) == set(qwen2_train.REMAT)
    gd, params = _model()
    policy = countdown.qwen2_policy(gd, remat=cfg.remat)
    tokens = jnp.ones((2, 8), jnp.int32)
    args = (params, tokens, prompt_positions(tokens > 0), tokens > 0)
    assert sum(e.primitive.name == "remat2" for e in jax.make_jaxpr(policy.forward)(*args).eqns) == 2
    with pytest.raises(SystemExit) as e:
        parse_flags(countdown.CountdownConfig, ["--remat=some"], prog="prog")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prog: error: remat='some' is invalid; allowed: none, full, dots"], err
    with pytest.raises(ValueError, match="remat='x' is invalid"):
        qwen2_train.train_forward(gd, remat="x")
