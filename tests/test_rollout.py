"""rlsoft.rollout over a tiny random Qwen2 (models/qwen2_decode.py adapter); no torch needed.

References are computed independently of the sampler's cache: a teacher-forced training forward
on prompt + response (same left padding, positions from the mask), and a greedy loop that reruns
the full forward at every step.
"""
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.qwen2 import Qwen2, Qwen2Config
from models.qwen2_decode import decode_fns
from rlsoft import rollout, sampling
from rlsoft.rollout import SamplingConfig

N = 10  # new tokens
PROMPTS = [[3, 17, 101, 55, 9, 250], [42, 7], [600, 601, 602, 603, 604, 605, 606, 607], [11, 900, 13, 14]]
TOL = 1e-5


class Tiny(NamedTuple):
    graphdef: nnx.GraphDef
    state: nnx.State
    fns: rollout.DecodeFns  # group-shared prompt cache
    fns_rep: rollout.DecodeFns  # prompts repeated G times
    prompts: np.ndarray  # [4,8] left-padded
    mask: np.ndarray
    forward: Callable  # jitted training forward (state, tokens, mask) -> logits


@pytest.fixture(scope="module")
def tiny():
    # initializer_range 0.1 (HF: 0.02) gives peakier, less uniform next-token distributions.
    cfg = Qwen2Config.preset("tiny", initializer_range=0.1)
    graphdef, state = nnx.split(Qwen2(cfg, rngs=nnx.Rngs(0)))
    tokens, mask = rollout.left_pad(PROMPTS, pad_id=0)

    @jax.jit
    def forward(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, rollout.prompt_positions(mask), mask)

    return Tiny(graphdef, state, decode_fns(graphdef), decode_fns(graphdef, shared_prompt=False), tokens, mask,
                forward)


@pytest.fixture(scope="module")
def greedy_ref(tiny):
    return greedy_reference(tiny)


def teacher_forced(tiny, out, group_size):
    """Model log-probs [B,N] of the sampled tokens and the logits [B,N,V] that predicted them."""
    p = tiny.prompts.shape[1]
    tokens = np.concatenate([np.repeat(tiny.prompts, group_size, 0), np.asarray(out.tokens)], 1)
    mask = np.concatenate([np.repeat(tiny.mask, group_size, 0), np.asarray(out.mask)], 1)
    logits = tiny.forward(tiny.state, tokens, mask)[:, p - 1:-1]  # position t predicts t + 1
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens[..., None], -1)[..., 0]
    return np.asarray(lp), np.asarray(logits)


def greedy_reference(tiny, steps=N):
    """argmax loop, the full forward recomputed on prompt + tokens so far at every step."""
    b, p = tiny.prompts.shape
    tokens = np.concatenate([tiny.prompts, np.zeros((b, steps), np.int32)], 1)
    mask = np.concatenate([tiny.mask, np.zeros((b, steps), bool)], 1)  # causal: later slots are unseen
    for j in range(steps):
        tokens[:, p + j] = np.argmax(np.asarray(tiny.forward(tiny.state, tokens, mask))[:, p + j - 1], -1)
        mask[:, p + j] = True
    return tokens[:, p:]


_SAMPLERS = {}


def run(tiny, config, group_size=1, seed=0, shared=True):
    """Sample with one jitted sampler per (adapter, config, G): each compiles once per session."""
    fns = tiny.fns if shared else tiny.fns_rep
    key = (fns, config, group_size)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = rollout.make_sampler(fns, config, group_size)
    return _SAMPLERS[key](tiny.state, tiny.prompts, tiny.mask, jax.random.key(seed))


def assert_tail_is_pad(out, pad_id):
    m = np.asarray(out.mask)
    np.testing.assert_array_equal(np.asarray(out.tokens)[~m], pad_id)
    np.testing.assert_array_equal(np.asarray(out.logprobs)[~m], 0.0)
    np.testing.assert_array_equal(np.asarray(out.sampling_logprobs)[~m], 0.0)
    np.testing.assert_array_equal(np.asarray(out.lengths), m.sum(1))
    # The mask is a prefix: once a row stops it never comes back.
    np.testing.assert_array_equal(m, np.arange(m.shape[1])[None] < m.sum(1, keepdims=True))


# --------------------------------------------------------------------------------------------


def test_logprobs_match_teacher_forced_forward(tiny):
    # Repeated prompts (the plain cache), G = 4: the same compiled sampler as the group test's.
    out = run(tiny, SamplingConfig(max_new_tokens=N, temperature=1.0), group_size=4, seed=1, shared=False)
    lp, _ = teacher_forced(tiny, out, 4)
    assert np.asarray(out.mask).all() and out.tokens.shape == (4 * len(PROMPTS), N)
    diff = np.abs(np.asarray(out.logprobs) - lp).max()
    print(f"sampled vs teacher-forced log-probs: max abs diff {diff:.2e}")
    assert diff < TOL
    # T = 1, no top-k/top-p: the sampling distribution is the model's.
    np.testing.assert_allclose(out.sampling_logprobs, out.logprobs, atol=1e-6)


def test_greedy_and_its_limits_equal_full_forward_greedy_loop(tiny, greedy_ref):
    ref = greedy_ref
    for config in (SamplingConfig(max_new_tokens=N, temperature=0.0),
                   SamplingConfig(max_new_tokens=N, temperature=1e-6),
                   SamplingConfig(max_new_tokens=N, temperature=1.0, top_k=1),
                   SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=1e-6)):
        out = run(tiny, config, seed=3)
        np.testing.assert_array_equal(np.asarray(out.tokens), ref, err_msg=str(config))
        lp, _ = teacher_forced(tiny, out, 1)
        np.testing.assert_allclose(out.logprobs, lp, atol=TOL)
        # A point mass (or all but): the sampling log-prob is 0.
        np.testing.assert_allclose(out.sampling_logprobs, 0.0, atol=1e-6, err_msg=str(config))


@pytest.mark.parametrize("config", [SamplingConfig(max_new_tokens=N, temperature=1.0),
                                    SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=50, top_p=0.9)])
def test_greedy_rows_are_argmax_beside_unchanged_samples(tiny, greedy_ref, config):
    """greedy_rows=1 of a group of 3 (a greedy and a sampled eval in one call): row 0 of each group is
    the greedy loop's, rows 1-2 are exactly what the plain sampler draws from the same key."""
    g, key = 3, jax.random.key(5)
    mixed = rollout.make_sampler(tiny.fns, config, g, greedy_rows=1)(tiny.state, tiny.prompts, tiny.mask, key)
    plain = run(tiny, config, group_size=g, seed=5)
    tokens, plain_tokens = (np.asarray(o.tokens).reshape(len(PROMPTS), g, N) for o in (mixed, plain))
    np.testing.assert_array_equal(tokens[:, 0], greedy_ref)
    np.testing.assert_array_equal(tokens[:, 1:], plain_tokens[:, 1:])
    assert (tokens[:, 1:] != greedy_ref[:, None]).any()  # the other rows did sample
    np.testing.assert_array_equal(np.asarray(mixed.sampling_logprobs).reshape(len(PROMPTS), g, N)[:, 0], 0.0)
    lp, _ = teacher_forced(tiny, mixed, g)
    np.testing.assert_allclose(mixed.logprobs, lp, atol=TOL)
    for bad in (-1, 4, True):
        with pytest.raises(ValueError, match="greedy_rows"):
            rollout.make_sampler(tiny.fns, config, g, greedy_rows=bad)


def test_stop_ids_end_rows_early(tiny, greedy_ref):
    ref = greedy_ref
    # Stop ids: row 3's greedy token at step 3 and row 1's at step 5, each new in its row there.
    assert ref[3, 3] not in ref[3, :3] and ref[1, 5] not in ref[1, :5]
    stop = {int(ref[3, 3]), int(ref[1, 5]), 1023}  # a set; 1023 never shows up
    pad = 1  # not a token of ref, so a pad cannot pass for a sampled token
    assert pad not in ref
    out = run(tiny, SamplingConfig(max_new_tokens=N, temperature=0.0, stop_ids=stop, pad_id=pad))
    hits = np.isin(ref, list(stop))
    want_len = np.where(hits.any(1), hits.argmax(1) + 1, N)
    assert want_len[3] == 4 and want_len[1] == 6 and (want_len == N).any()  # some rows run to N
    np.testing.assert_array_equal(out.lengths, want_len)
    np.testing.assert_array_equal(out.stopped, hits.any(1))
    tokens = np.asarray(out.tokens)
    for i, n in enumerate(want_len):
        np.testing.assert_array_equal(tokens[i, :n], ref[i, :n])
    assert_tail_is_pad(out, pad)
    lp, _ = teacher_forced(tiny, out, 1)
    m = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], lp[m], atol=TOL)

    # Every row stops within two tokens: the while_loop exits early and the rest is pad.
    stop = set(ref[:, 1].tolist())
    out = run(tiny, SamplingConfig(max_new_tokens=N, temperature=0.0, stop_ids=stop, pad_id=pad))
    hits = np.isin(ref, list(stop))
    np.testing.assert_array_equal(out.lengths, hits.argmax(1) + 1)
    assert int(np.max(out.lengths)) <= 2 and np.asarray(out.stopped).all()
    assert_tail_is_pad(out, pad)


def test_top_k_and_top_p_stay_in_their_sets(tiny):
    k, g, temp = 5, 4, 1.5
    out = run(tiny, SamplingConfig(max_new_tokens=N, temperature=temp, top_k=k), group_size=g, seed=4)
    lp, logits = teacher_forced(tiny, out, g)
    tokens = np.asarray(out.tokens)
    kth = np.sort(logits, -1)[..., -k]
    chosen = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    assert (chosen >= kth - 1e-5).all()
    assert len(np.unique(tokens)) > N  # not secretly greedy
    # Sampling log-prob: softmax(z / T) renormalised over the k survivors.
    z = logits / temp
    top = np.sort(z, -1)[..., -k:]
    top_lse = np.log(np.exp(top - top.max(-1, keepdims=True)).sum(-1)) + top.max(-1)
    np.testing.assert_allclose(out.sampling_logprobs, chosen / temp - top_lse, atol=1e-4)
    np.testing.assert_allclose(out.logprobs, lp, atol=TOL)

    top_p = 0.3
    out = run(tiny, SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=top_p), group_size=g, seed=5)
    lp, logits = teacher_forced(tiny, out, g)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    chosen = np.take_along_axis(probs, np.asarray(out.tokens)[..., None], -1)
    mass_above = np.where(probs > chosen, probs, 0.0).sum(-1)  # mass ranked strictly above
    assert (mass_above < top_p + 1e-5).all()
    np.testing.assert_allclose(out.logprobs, lp, atol=TOL)
    assert (np.asarray(out.sampling_logprobs) >= np.asarray(out.logprobs) - 1e-6).all()


def _draws(z, n, chunk=100_000):
    """n draws from the one row z [V] by `sampling.categorical`'s group form, in chunks (memory)."""
    return np.concatenate([np.asarray(sampling.categorical(jax.random.PRNGKey(c), z[None], min(chunk, n - c))[0])
                           for c in range(0, n, chunk)])


# Block layouts: even and padded, triangular-product prefix sums (<= 64 terms) and cumsum (5000:
# blocks of 128). Every fifth logit is -inf (a filtered token), which must never be drawn.
@pytest.mark.parametrize("vocab", [7, 64, 1000, 1500, 5000])
def test_categorical_is_exact_in_distribution(vocab):
    z = (jax.random.normal(jax.random.PRNGKey(vocab), (vocab,)) * 2.0).at[::5].set(-jnp.inf)
    n = 400_000
    a = _draws(z, n)
    assert a.min() >= 0 and a.max() < vocab
    freq = np.bincount(a, minlength=vocab) / n
    p = np.asarray(jax.nn.softmax(z))
    assert freq[::5].sum() == 0
    # 5 binomial standard errors per cell.
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-6)


@pytest.mark.parametrize("vocab", [7, 1000, 1500, 5000])
def test_categorical_draws_the_only_finite_token(vocab):
    # A row whose mass sits in one token: first, middle, last (inside the padded last block).
    for pos in (0, vocab // 2, vocab - 1):
        z = jnp.full((vocab,), -jnp.inf).at[pos].set(3.0)
        assert (_draws(z, 2000) == pos).all()


def test_categorical_group_form_is_the_row_form_on_repeated_rows():
    # Draw g of row b uses the uniform of row b*n + g of the repeated rows: one sampler, two shapes.
    for vocab in (65, 1000, 5000):
        z = jax.random.normal(jax.random.PRNGKey(vocab), (6, vocab)) * 3.0
        key, n = jax.random.PRNGKey(1), 16
        grouped = sampling.categorical(key, z, n)
        assert grouped.shape == (6, n) and sampling.categorical(key, z).shape == (6,)
        np.testing.assert_array_equal(grouped, sampling.categorical(key, jnp.repeat(z, n, axis=0)).reshape(6, n))
    with pytest.raises(ValueError, match="num_samples"):
        sampling.categorical(key, z, 0)


def test_categorical_is_inverse_cdf_of_its_uniforms():
    # A caller that draws the uniforms ahead (the bandit sweep) gets exactly categorical's draws.
    for vocab, n in ((7, None), (1000, 16), (5000, 3)):
        z = (jax.random.normal(jax.random.PRNGKey(vocab), (4, vocab)) * 3.0).at[:, ::5].set(-jnp.inf)
        key = jax.random.PRNGKey(2)
        u = sampling.sampling_uniforms(key, 4, n or 1)
        drawn = sampling.inverse_cdf(u, z)
        np.testing.assert_array_equal(sampling.categorical(key, z, n), drawn if n else drawn[:, 0])


def test_group_sampling_with_shared_prompt_cache(tiny, count_compiles):
    g = 4
    config = SamplingConfig(max_new_tokens=N, temperature=1.0)
    out = run(tiny, config, group_size=g, seed=6)
    tokens = np.asarray(out.tokens).reshape(len(PROMPTS), g, N)
    for p in range(len(PROMPTS)):
        assert len({tuple(r) for r in tokens[p]}) == g, f"prompt {p}: the G samples are not distinct"
    lp, _ = teacher_forced(tiny, out, g)
    diff = np.abs(np.asarray(out.logprobs) - lp).max()
    print(f"shared-prompt sampled vs teacher-forced log-probs: max abs diff {diff:.2e}")
    assert diff < TOL
    with count_compiles() as compiled:
        other = run(tiny, config, group_size=g, seed=7)  # same sampler, new key: no new compile
    assert compiled == []
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any(1).all()  # a new key, new samples
    # The repeated-prompt cache samples the same tokens from the same key.
    rep = run(tiny, config, group_size=g, seed=6, shared=False)
    np.testing.assert_array_equal(rep.tokens, out.tokens)
    np.testing.assert_allclose(rep.logprobs, out.logprobs, atol=TOL)


def test_no_recompile_across_calls(tiny, count_compiles):
    state, fns, prompts, pmask = tiny.state, tiny.fns, tiny.prompts, tiny.mask
    config = SamplingConfig(max_new_tokens=4, temperature=0.8, top_k=20, top_p=0.9, stop_ids=(5,))

    @chex.assert_max_traces(n=1)
    def sampler(params, prompts, mask, key):
        return rollout.sample(fns, config, params, prompts, mask, key, group_size=2)

    jitted = jax.jit(sampler)  # what make_sampler returns, plus the trace counter
    keys = jax.random.key(0), jax.random.key(1)
    with count_compiles() as first:
        a = jitted(state, prompts, pmask, keys[0])
    assert "jit(sampler)" in first  # the listener sees this compile ...
    new_prompts, new_mask = rollout.left_pad([[9, 9], [1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12]], pad_id=0)
    new_state = jax.tree.map(lambda x: x * 1.01, state)  # an RL update changes params, not shapes
    with count_compiles() as again:
        b = jitted(new_state, new_prompts, new_mask, keys[1])  # a second trace would raise
    assert again == []  # ... and no other one: new params, prompts and key reuse the executable
    assert (np.asarray(a.tokens) != np.asarray(b.tokens)).any()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(stop_ids=(-2,)), "stop_ids"),
    (dict(stop_ids="eos"), "stop_ids"),
    (dict(pad_id=-1), "pad_id=-1"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_config_is_hashable_and_vocab_checked(tiny):
    a = SamplingConfig(stop_ids=[7, 3, 7])
    assert a.stop_ids == (3, 7) and hash(a) == hash(SamplingConfig(stop_ids={3, 7}))
    with pytest.raises(ValueError, match="vocab size is 1024"):
        run(tiny, SamplingConfig(max_new_tokens=2, stop_ids=(5000,)))


@pytest.mark.parametrize("shared,chunk,group_size,prefill_rows",
                         [(True, 3, 4, 4), (False, 7, 2, 4), (True, 64, 1, 1), (False, 5, 2, 3),
                          (True, 2, 2, 4)])  # chunk 2: chunks of 2, 2, 4 and 1 slots
def test_segmented_decode_samples_what_the_generic_cache_samples(tiny, shared, chunk, group_size, prefill_rows):
    # The fast path (per-layer chunks, attention over filled segments only, the prefill in parts of
    # gcd(rows, prefill_rows) prompts) against the plain qwen2.KVCache path: same key, same tokens,
    # log-probs equal to float tolerance.
    from models.qwen2_decode import generic_decode_fns

    config = rollout.SamplingConfig(max_new_tokens=N, temperature=1.0)
    fns = decode_fns(tiny.graphdef, shared_prompt=shared, chunk=chunk, prefill_rows=prefill_rows)
    fast = rollout.make_sampler(fns, config, group_size)
    slow = rollout.make_sampler(generic_decode_fns(tiny.graphdef, shared_prompt=shared), config, group_size)
    a = fast(tiny.state, tiny.prompts, tiny.mask, jax.random.key(5))
    b = slow(tiny.state, tiny.prompts, tiny.mask, jax.random.key(5))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL)


@pytest.mark.parametrize("steps,first,ends", [
    (0, 64, ()), (1, 64, (1,)), (64, 64, (64,)), (65, 64, (64, 65)), (255, 64, (64, 128, 255)),
    (1023, 64, (64, 128, 256, 512, 1023)), (19, 8, (8, 16, 19)), (10, 1, (1, 2, 4, 8, 10))])
def test_segment_ends_double_after_the_first_two(steps, first, ends):
    # Segment lengths C, C, 2C, 4C, ...: 1 + ceil(log2(steps / C)) compiled copies of the step.
    assert rollout.segment_ends(steps, first) == ends


def test_segment_ends_rejects_a_bad_first_length():
    with pytest.raises(ValueError, match="segment=0 is invalid"):
        rollout.segment_ends(10, 0)
