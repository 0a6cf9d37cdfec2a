"""models.thinking: the thinker's teacher-forced logits are causal and equal prefix forwards, the
answerer reads what its mode says, parameter counts match CharGPT's closed form, jit + vmap work."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import char_gpt
from models.thinking import (ThinkingModelConfig, answer_logits_fn, answer_tokens, init_models,
                             thinker_logits_fn)

M, K, V, T, B = 11, 2, 4, 3, 5


def _cfg(**kwargs) -> ThinkingModelConfig:
    return ThinkingModelConfig(modulus=M, num_operands=K, thought_vocab=V, max_thoughts=T, d_model=16,
                               n_layer=1, n_head=2, **kwargs)


def _inputs(seed=0):
    kq, kh = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.randint(kq, (B, K), 0, M), jax.random.randint(kh, (B, T), 0, V + 1)


@pytest.fixture(scope="module")
def models():
    return init_models(_cfg(), seed=0)


def test_vocab_layout_and_param_counts(models):
    cfg = _cfg()
    assert (cfg.thought_offset, cfg.eot_token, cfg.ask_token, cfg.vocab_size) == (M, M + V, M + V + 1, M + V + 2)
    for role, (graphdef, state) in zip(("thinker", "answerer"), models):
        ccfg = cfg.char_config(role)
        assert (ccfg.vocab_size, ccfg.block_size, ccfg.tie_embeddings) == (M + V + 2, K + T + 1, False)
        assert char_gpt.param_count(state) == ccfg.num_params
    thinker, answerer = (jax.tree_util.tree_leaves(s) for _, s in models)
    assert not all(np.array_equal(a, b) for a, b in zip(thinker, answerer))  # independent inits


def _thinker_checks(cfg, graphdef, params, q, h):
    """Traced: (logits, prefix-forward references, logits with thoughts[t:] changed at position t,
    logits with the question changed)."""
    t_max, m, v = cfg.max_thoughts, cfg.modulus, cfg.thought_vocab
    f = thinker_logits_fn(graphdef, cfg)
    refs = [char_gpt.forward(graphdef, params, jnp.concatenate([q, h[:, :t] + m], 1))[:, -1, m:m + v + 1]
            for t in range(t_max)]
    # One batched call: h, h with thoughts[t:] changed for t = 0 .. T-1, and the question changed.
    changed = [h.at[:, t:].set((h[:, t:] + 1) % (v + 1)) for t in range(t_max)]
    out = f(params, jnp.concatenate([q] * (t_max + 1) + [(q + 1) % m]), jnp.concatenate([h, *changed, h]))
    out = out.reshape(t_max + 2, *h.shape, v + 1)
    futures = jnp.stack([out[1 + t][:, t] for t in range(t_max)], 1)
    return out[0], jnp.stack(refs, 1), futures, out[-1]


def test_thinker_logits_are_teacher_forced_and_causal(models):
    """Position t == the last position of a forward on question + thoughts[:t], unchanged by
    thoughts[t:]; for T = 3 and for T = 1 (no thought fed; K + T kept at 5 so that the
    CharGPTConfig is the shared one and the same parameters serve)."""
    single = ThinkingModelConfig(modulus=M, num_operands=K + T - 1, thought_vocab=V, max_thoughts=1,
                                 d_model=16, n_layer=1, n_head=2)
    assert single.char_config("thinker") == _cfg().char_config("thinker")
    graphdef, params = models[0]
    q, h = _inputs()
    q1 = jax.random.randint(jax.random.PRNGKey(3), (B, K + T - 1), 0, M)
    h1 = jnp.full((B, 1), V)

    @jax.jit
    def run(params):
        return (_thinker_checks(_cfg(), graphdef, params, q, h), _thinker_checks(single, graphdef, params, q1, h1))

    for t_max, (logits, refs, futures, other_q) in zip((T, 1), run(params)):
        assert logits.shape == (B, t_max, V + 1) and logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, refs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(futures, logits, rtol=1e-6, atol=1e-6)  # the future does not leak in
        assert not np.allclose(other_q, logits)  # the question is read


def test_answerer_reads_its_mode(models):
    graphdef, params = models[1]
    cfgs = {reads: _cfg(answerer_reads=reads) for reads in ("blind", "normal", "question")}
    q, h = _inputs(1)

    qs, hs = jnp.concatenate([q, (q + 1) % M, q]), jnp.concatenate([h, h, (h + 1) % (V + 1)])

    @jax.jit
    def run(params):  # per mode: the logits, then with the question changed, the thoughts changed
        result = {reads: answer_logits_fn(graphdef, cfg)(params, qs, hs).reshape(3, B, M)
                  for reads, cfg in cfgs.items()}
        ref = char_gpt.forward(graphdef, params, answer_tokens(cfgs["normal"], q, h))[:, -1, :M]
        return result, ref, answer_logits_fn(graphdef, cfgs["question"])(params, qs, None)

    result, ref, no_thoughts = run(params)
    np.testing.assert_allclose(result["normal"][0], ref, rtol=1e-5, atol=1e-5)  # last position, [0, M)
    np.testing.assert_allclose(no_thoughts[:B], result["question"][0], rtol=1e-6)
    for reads, (logits, other_q, other_h) in result.items():
        assert logits.shape == (B, M) and logits.dtype == jnp.float32
        tokens = np.asarray(answer_tokens(cfgs[reads], q, h))
        expected = {"blind": [h + M], "normal": [q, h + M], "question": [q]}[reads]
        np.testing.assert_array_equal(tokens, np.concatenate(expected + [np.full((B, 1), M + V + 1)], 1))
        same_q, same_h = np.allclose(other_q, logits), np.allclose(other_h, logits)
        assert same_q == (reads == "blind") and same_h == (reads == "question"), reads


def test_jit_vmap_over_two_param_sets():
    """vmap over a stack of two parameter sets: each slice follows its own parameters (swapping
    the stack swaps the outputs; the program is compiled once)."""
    cfg = _cfg(answerer_reads="normal")
    (tg, t0), (ag, a0) = init_models(cfg, seed=0)
    (_, t1), (_, a1) = init_models(cfg, seed=1)
    stack = lambda x, y: jax.tree.map(lambda a, b: jnp.stack([a, b]), x, y)  # noqa: E731
    q, h = _inputs(2)
    think, answer = thinker_logits_fn(tg, cfg), answer_logits_fn(ag, cfg)

    @jax.jit
    def both(tparams, aparams):
        return (jax.vmap(think, in_axes=(0, None, None))(tparams, q, h),
                jax.vmap(answer, in_axes=(0, None, None))(aparams, q, h))

    thoughts, answers = both(stack(t0, t1), stack(a0, a1))
    assert thoughts.shape == (2, B, T, V + 1) and answers.shape == (2, B, M)
    thoughts_swapped, answers_swapped = both(stack(t1, t0), stack(a1, a0))
    np.testing.assert_allclose(thoughts_swapped[::-1], thoughts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers_swapped[::-1], answers, rtol=1e-5, atol=1e-6)
    assert not np.allclose(thoughts[0], thoughts[1]) and not np.allclose(answers[0], answers[1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(answerer_reads="both"), "answerer_reads='both' is invalid; need one of blind, normal, question"),
    (dict(d_model=30), "d_model=30 is invalid; need a multiple of n_head=4"),
    (dict(modulus=1), "modulus=1 is invalid"),
    (dict(max_thoughts=0), "max_thoughts=0 is invalid"),
    (dict(thought_vocab=True), "thought_vocab=True is invalid"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError) as info:
        ThinkingModelConfig(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_role_and_missing_thoughts(models):
    with pytest.raises(ValueError, match="role='critic' is invalid"):
        ThinkingModelConfig().char_config("critic")
    graphdef, params = models[1]
    with pytest.raises(ValueError, match="thoughts=None is invalid"):
        answer_logits_fn(graphdef, _cfg(answerer_reads="blind"))(params, _inputs()[0], None)
