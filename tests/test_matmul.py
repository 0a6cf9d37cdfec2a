"""models/matmul.py: the custom-VJP dense product equals jnp.dot and its autodiff gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import matmul


def _data(dtype, shape_x=(3, 5, 8), shape_w=(8, 6), seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kx, shape_x, dtype), jax.random.normal(kw, shape_w, dtype),
            jax.random.normal(kg, shape_x[:-1] + (shape_w[-1],), jnp.float32))


# Tolerances: float32 summation order (1e-5 on values of order 10); bfloat16: one ulp of the result
# (2^-7 relative; the atol covers results near zero). Seen on this CPU: bit-identical in both.
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, dict(atol=1e-5)), (jnp.bfloat16, dict(rtol=2 ** -7, atol=0.05))])
def test_dense_matches_jnp_dot_and_its_gradient(dtype, tol):
    x, w, g = _data(dtype)
    dims = (((2,), (0,)), ((), ()))
    y = matmul.dense_dot_general(x, w, dims)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(jnp.dot(x, w), np.float32))

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g)

    got = jax.grad(loss(lambda x, w: matmul.dense_dot_general(x, w, dims)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    # By hand: d w = sum over positions of x^T g (float32).
    if dtype == jnp.float32:
        np.testing.assert_allclose(got[1], np.einsum("btx,bty->xy", x, g), atol=1e-5)


def test_dense_falls_back_for_other_contractions():
    x, w, _ = _data(jnp.float32, shape_x=(4, 8), shape_w=(6, 8))
    dims = (((1,), (1,)), ((), ()))  # x @ w.T: not nnx.Linear's contraction
    np.testing.assert_array_equal(matmul.dense_dot_general(x, w, dims), jax.lax.dot_general(x, w, dims))
    x, w, _ = _data(jnp.float32, shape_x=(4, 8))
    hi = matmul.dense_dot_general(x, w, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(hi, jnp.dot(x, w, precision="highest"), atol=1e-6)


def test_swapped_product_is_the_einsum_with_its_last_axes_swapped():
    a = jax.random.normal(jax.random.key(3), (2, 7, 4))
    b = jax.random.normal(jax.random.key(4), (2, 7, 9))
    got = matmul.swapped_product(a, b, "bnd,bnv->bdv")
    assert got.shape == (2, 9, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.einsum("bnd,bnv->bvd", a, b), atol=1e-5)


def test_linear_layer_uses_it_under_jit_and_grad():
    lin = nnx.Linear(8, 6, dot_general=matmul.dense_dot_general, rngs=nnx.Rngs(1))
    ref = nnx.Linear(8, 6, rngs=nnx.Rngs(1))
    x, _, _ = _data(jnp.float32)
    gd, params = nnx.split(lin)
    gd_ref, _ = nnx.split(ref)
    loss = lambda gdef: jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(gdef, p)(x))))  # noqa: E731
    got, want = jax.jit(loss(gd))(params), jax.jit(loss(gd_ref))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)
    # The layer really takes the custom-VJP path (a fallback to lax.dot_general would pass the above).
    forward = lambda gdef: jax.make_jaxpr(lambda p: nnx.merge(gdef, p)(x))(params)  # noqa: E731
    assert "custom_vjp_call" in str(forward(gd)) and "custom_vjp_call" not in str(forward(gd_ref))


def test_the_models_use_the_dense_product():
    from models import char_gpt, qwen2

    model = qwen2.Qwen2(qwen2.Qwen2Config.preset("tiny", vocab_size=32), rngs=nnx.Rngs(0))
    tokens = jnp.ones((1, 4), jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda t: model(t, jnp.arange(4)[None]))(tokens))
    # 7 projections per layer x 2 layers (the tied head is a plain product).
    assert jaxpr.count("custom_vjp_call") == 14
    graphdef, params = char_gpt.init_model(char_gpt.CharGPTConfig.preset("tiny", vocab_size=32), 0)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params))
