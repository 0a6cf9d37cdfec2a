"""models/qwen2_train.py: the training forwards' gradients (hand-written attention VJP) equal autodiff
of the module's own forward; in bfloat16 the forwards and one update keep the configured dtypes.

(float32 parity of both forwards' values with transformers is in tests/test_qwen2_parity.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import qwen2, qwen2_train
from rlsoft import optim, trainer
from rlsoft.rollout import prompt_positions

V, Q, G, P, N = 97, 2, 4, 21, 40


def _models():
    f32 = qwen2.Qwen2(qwen2.Qwen2Config.preset("tiny", vocab_size=V), rngs=nnx.Rngs(0))
    graphdef32, state32 = nnx.split(f32)
    bf16_cfg = qwen2.Qwen2Config.preset("tiny", vocab_size=V, dtype="bfloat16", param_dtype="bfloat16")
    graphdef16, _ = nnx.split(qwen2.Qwen2(bf16_cfg, rngs=nnx.Rngs(0)))
    state16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state32)  # the same weights, rounded
    return (graphdef32, state32), (graphdef16, state16)


def _batch():
    rng = np.random.default_rng(0)
    pmask = np.ones((Q, P), bool)
    pmask[0, :5] = False
    prompts = np.where(pmask, rng.integers(1, V, (Q, P)), 0)
    rmask = np.ones((Q * G, N), bool)
    rmask[1, 30:] = False
    responses = np.where(rmask, rng.integers(1, V, (Q * G, N)), 0)
    return prompts, pmask, responses, rmask


# block 8 (many attention blocks: the slowest compile of the suite, ~80 s) runs in the slow pass.
@pytest.mark.parametrize("block", [pytest.param(8, marks=pytest.mark.slow), 64])
def test_training_forward_gradients_equal_autodiff_of_the_module_forward(block):
    """The blocked attention's custom VJP (own keys + the group-shared prompt prefix, left-padded
    prompts, a right-padded response) against autodiff through Qwen2.__call__ (qwen2._attend) on
    the concatenated sequences, for the loss sum(logits * R) over the real response positions."""
    (gd, st), _ = _models()
    prompts, pmask, responses, rmask = _batch()
    r = jax.random.normal(jax.random.key(3), (Q * G, N, V))
    tokens = np.concatenate([np.repeat(prompts, G, 0), responses], 1)
    mask = np.concatenate([np.repeat(pmask, G, 0), rmask], 1)
    pos = prompt_positions(jnp.asarray(mask))
    live = jnp.asarray(rmask)[..., None]

    def shared(params):
        logits = qwen2_train.response_logits(gd, block=block)(params, prompts, pmask, responses, rmask)
        return jnp.sum(jnp.where(live, logits * r, 0.0))

    def per_row(params, fwd):
        logits = fwd(params, tokens, pos, mask)[:, P - 1:-1]
        return jnp.sum(jnp.where(live, logits * r, 0.0))

    want = jax.grad(per_row)(st, lambda p, *a: nnx.merge(gd, p)(*a))
    for got in (jax.grad(shared)(st), jax.grad(per_row)(st, qwen2_train.train_forward(gd, block=block))):
        # Each parameter against its own largest gradient (float32 summation order: ~1e-6 seen).
        for path, a, b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))), path[0]


def _reference_attention(q, k, v, mask, prefix, scale):
    """Plain softmax over the concatenated [prefix, own] scores with `where` masking; autodiff of
    this is the reference for the hand-written VJP (shapes as qwen2_train._probs)."""
    s = jnp.einsum("bgkrtd,bgksd->bgkrts", q, k) * scale
    segments = [(jnp.where(mask[:, :, None, None], s, qwen2.MASK_VALUE), v[:, :, :, None])]
    if prefix is not None:
        pk, pv, valid = prefix
        sp = jnp.einsum("bgkrtd,bkpd->bgkrtp", q, pk) * scale
        segments.insert(0, (jnp.where(valid[:, None, None, None, None], sp, qwen2.MASK_VALUE), pv[:, None, :, None]))
    p = jax.nn.softmax(jnp.concatenate([z for z, _ in segments], axis=-1), axis=-1)
    parts = jnp.split(p, np.cumsum([z.shape[-1] for z, _ in segments])[:-1], axis=-1)
    return sum(jnp.einsum("bgkrts,bgkrsd->bgkrtd", pp, vv) for pp, (_, vv) in zip(parts, segments))


@pytest.mark.parametrize("with_prefix", [False, True])
def test_block_attention_vjp_equals_autodiff_with_fully_masked_rows(with_prefix):
    bp, g, kvh, r, t, d, p = 2, 3, 2, 2, 5, 4, 6
    keys = iter(jax.random.split(jax.random.key(7), 8))
    q = jax.random.normal(next(keys), (bp, g, kvh, r, t, d))
    k, v = (jax.random.normal(next(keys), (bp, g, kvh, t, d)) for _ in range(2))
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & jnp.ones((bp, g, 1, t), bool).at[0, 1, 0, :2].set(False)
    mask = mask.at[1, 2, 3].set(False)  # query 3 of that row sees no own key at all
    pk, pv = (jax.random.normal(next(keys), (bp, kvh, p, d)) for _ in range(2))
    valid = jnp.ones((bp, p), bool).at[0, :2].set(False).at[1].set(False)  # prompt 1: no valid slot
    r_out = jax.random.normal(next(keys), q.shape)  # a cotangent on every row, fully masked ones too

    def loss(f):
        def fn(q, k, v, pk, pv):
            pre = (pk, pv, valid) if with_prefix else None
            return jnp.sum(f(q, k, v, mask, pre, d ** -0.5) * r_out)
        return fn

    args = (q, k, v, pk, pv)
    np.testing.assert_allclose(loss(qwen2_train._block_attention)(*args), loss(_reference_attention)(*args),
                               rtol=1e-5)
    got = jax.grad(loss(qwen2_train._block_attention), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2, 3, 4))(*args)
    assert not mask[1, 2, 3].any() and not valid[1].any()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_response_logits_are_as_close_to_float32_as_the_module_forward():
    (gd32, st32), (gd16, st16) = _models()
    prompts, pmask, responses, rmask = _batch()
    want = qwen2_train.response_logits(gd32)(st32, prompts, pmask, responses, rmask)
    got = qwen2_train.response_logits(gd16)(st16, prompts, pmask, responses, rmask)
    assert got.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(got - want)[rmask]))
    # The reference bf16 error: Qwen2.__call__ in bf16 against float32 on the full sequences.
    tokens = np.concatenate([np.repeat(prompts, G, 0), responses], 1)
    mask = np.concatenate([np.repeat(pmask, G, 0), rmask], 1)
    pos = prompt_positions(jnp.asarray(mask))
    module16, module32 = nnx.merge(gd16, st16), nnx.merge(gd32, st32)
    module_err = float(jnp.max(jnp.abs(module16(tokens, pos, mask) - module32(tokens, pos, mask))[mask]))
    print(f"bf16 vs f32: response_logits {err:.4f}, module forward {module_err:.4f}")
    assert 0 < err <= 2 * module_err


def test_bfloat16_update_keeps_bfloat16_params_and_is_finite():
    _, (gd16, st16) = _models()
    prompts, pmask, responses, rmask = _batch()
    cfg = trainer.UpdateConfig(scheme="softmax", tau=0.5, policy=optim.OptimizerConfig(learning_rate=1e-3),
                               micro_batches=2)
    update, _ = trainer.make_update(qwen2_train.train_forward(gd16), cfg, qwen2_train.response_logits(gd16))
    rewards = np.random.default_rng(1).random((Q, G)).astype(np.float32)
    batch = trainer.Batch(np.repeat(prompts, G, 0), np.repeat(pmask, G, 0), responses, rmask, rewards, np.float32(0.5),
                          np.zeros((0, N), np.int32), np.zeros((0, P), np.int32), np.zeros((0, P), bool),
                          np.zeros((0, N), bool))
    before = jax.tree.map(np.asarray, st16)
    state, metrics = update(trainer.init_state(st16, cfg), batch)
    assert float(metrics["train/skipped_updates"]) == 0.0 and np.isfinite(float(metrics["train/loss"]))
    params = state.params("policy")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)))
