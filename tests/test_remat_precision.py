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


# ---- mixed precision (--precision=bf16): bf16 compute on float32 master weights ----------------------
BF16_EPS = 2.0 ** -8  # bfloat16's machine epsilon (8 significand bits)


def _policy_loss(gd):
    """A policy-gradient loss of the params: -mean over real response tokens of w_row * log p(token)."""
    prompts, pmask, responses, rmask = _batch()
    w = jax.random.normal(jax.random.key(5), (Q * G,))
    logits_fn = qwen2_train.response_logits(gd)

    def loss(params):
        logits = logits_fn(params, prompts, pmask, responses, rmask)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(responses)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(rmask, w[:, None] * logp, 0.0)) / rmask.sum()

    return loss


def _update_setup():
    from rlsoft import optim, trainer

    prompts, pmask, responses, rmask = _batch()
    cfg = trainer.UpdateConfig(scheme="softmax", tau=0.5, micro_batches=2,
                               policy=optim.OptimizerConfig(learning_rate=1e-3, warmup_steps=0))
    rewards = np.random.default_rng(1).random((Q, G)).astype(np.float32)
    batch = trainer.Batch(np.repeat(prompts, G, 0), np.repeat(pmask, G, 0), responses, rmask, rewards,
                          np.float32(0.5), np.zeros((0, N), np.int32), np.zeros((0, P), np.int32),
                          np.zeros((0, P), bool), np.zeros((0, N), bool))
    make = lambda gd: trainer.make_update(qwen2_train.train_forward(gd), cfg, qwen2_train.response_logits(gd))[0]
    return cfg, batch, make, trainer.init_state


def test_bf16_precision_computes_in_bf16_and_keeps_float32_weights_grads_and_optimizer_state():
    """Traced only (no compile): the forward's matmuls take bf16 operands, while the parameters the
    update returns, the gradient and AdamW's moments are float32."""
    gd16, params = _model(dtype="bfloat16", param_dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    # The dense layers and the attention are custom_vjp calls: their float operands (weights, activations).
    dots = [e for e in jax.make_jaxpr(_policy_loss(gd16))(params).eqns
            if e.primitive.name in ("custom_vjp_call", "dot_general")]
    assert len(dots) >= 7 * qwen2.PRESETS["tiny"]["num_hidden_layers"]
    operand_dtypes = {v.aval.dtype for e in dots for v in e.invars
                      if hasattr(v.aval, "dtype") and v.aval.ndim >= 2 and jnp.issubdtype(v.aval.dtype, jnp.floating)}
    assert operand_dtypes == {jnp.dtype(jnp.bfloat16)}, operand_dtypes
    grads = jax.eval_shape(jax.grad(_policy_loss(gd16)), params)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    cfg, batch, make, init_state = _update_setup()
    state, _ = jax.eval_shape(make(gd16), init_state(params, cfg), batch)
    policy = state.roles["policy"]
    assert {x.dtype for x in jax.tree.leaves(policy.params)} == {jnp.dtype(jnp.float32)}
    floats = {x.dtype for x in jax.tree.leaves(policy.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}


def test_bf16_precision_flag_builds_a_bf16_compute_model(tmp_path, capsys):
    cfg = parse_flags(countdown.CountdownConfig, ["--preset=smoke", "--precision=bf16",
                                                  f"--cache_dir={tmp_path}"], presets=countdown.PRESETS, prog="prog")
    policy, params, _ = countdown.build(cfg)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    tokens = jnp.ones((2, 8), jnp.int32)
    assert "bf16[" in str(jax.make_jaxpr(policy.forward)(params, tokens, prompt_positions(tokens > 0), tokens > 0))
    assert set(train_loop.PRECISIONS) == {"fp32", "bf16"} and train_loop.TrainConfig().precision == "fp32"
    with pytest.raises(SystemExit) as e:
        parse_flags(countdown.CountdownConfig, ["--precision=fp16"], prog="prog")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prog: error: precision='fp16' is invalid; allowed: fp32, bf16"], err


# Two compiles of the tiny model's gradient (~30 s on the shared 2-core VM).
@pytest.mark.slow
def test_bf16_loss_and_gradients_are_within_bf16_rounding_of_float32():
    gd32, params = _model()
    gd16, _ = _model(dtype="bfloat16", param_dtype="float32")
    l32, g32 = jax.jit(jax.value_and_grad(_policy_loss(gd32)))(params)
    l16, g16 = jax.jit(jax.value_and_grad(_policy_loss(gd16)))(params)
    # The loss is a mean over ~300 tokens: its rounding errors average out (measured 3e-5 relative).
    assert abs(float(l16 - l32)) <= BF16_EPS * abs(float(l32))
    # Each gradient leaf carries a few bf16 roundings through 2 blocks and back (measured 0.7-2.4%,
    # 0.8% overall): within 8 eps per leaf and 4 eps overall, and not float32's (> eps / 16).
    rel = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))]
    assert max(rel) <= 8 * BF16_EPS, rel
    diff = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32))))
    total = np.sqrt(sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(g32)))
    assert BF16_EPS / 16 < diff / total <= 4 * BF16_EPS, diff / total


@pytest.mark.slow
def test_bf16_updates_track_float32_and_keep_float32_optimizer_state():
    gd32, params = _model()
    gd16, _ = _model(dtype="bfloat16", param_dtype="float32")
    cfg, batch, make, init_state = _update_setup()
    final = {}
    for name, gd in (("f32", gd32), ("bf16", gd16)):
        update, state = make(gd), init_state(params, cfg)
        for _ in range(3):
            state, metrics = update(state, batch)
            assert float(metrics["train/skipped_updates"]) == 0.0
        final[name] = state
    opt = final["bf16"].roles["policy"].opt_state
    assert {x.dtype for x in jax.tree.leaves(opt) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    norm = lambda t: np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(t)))
    p16, p32 = final["bf16"].params("policy"), final["f32"].params("policy")
    moved = norm(jax.tree.map(jnp.subtract, p32, params))
    drift = norm(jax.tree.map(jnp.subtract, p16, p32))
    # AdamW divides each entry by its own gradient scale, so bf16's ~1% gradient error becomes a larger
    # error on the small entries; after 3 steps the two runs are 5% of the distance moved apart (measured).
    assert moved > 0 and drift <= 0.1 * moved, (drift, moved)
