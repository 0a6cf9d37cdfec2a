"""Token-level policy losses for a GRPO-style trainer: PPO clip, KL to a reference, entropy, SFT.

Inputs for a batch of N sampled responses (N = questions x G) padded to T tokens:
    logp, old_logp, ref_logp, entropy: [N, T]   mask: [N, T] (response token != 0)   weights: [N]
`weights` are the per-sequence weights of `rlsoft.weighting` (advantage-like), broadcast over the
tokens of their sequence. Values where mask == 0 are ignored, even if non-finite (-inf log-probs of
pad tokens, NaN from an out-of-range target id): they get zero loss and zero gradient.

Per token (A = weight of the token's sequence, eps_lo = clip_eps, eps_hi = clip_eps_high):
    ratio = exp(logp - old_logp)
    pg    = -min(ratio A, clip(ratio, 1 - eps_lo, 1 + eps_hi) A)    PPO (Schulman et al. 2017);
                                                                    eps_hi > eps_lo is DAPO's
                                                                    clip-higher (Yu et al. 2025)
    pg    = -A logp                              clip_eps None or 0: the seed's weighted
                                                 log-likelihood L = -sum_i w_i log pi(y_i)
    kl    = k1 = logp - ref_logp   or   k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp)
            (Schulman, http://joschu.net/blog/kl-approx.html; k3 >= 0 and unbiased for
            KL(pi || ref) under samples of pi; k3 is GRPO's choice, DeepSeekMath eq. 4)
    loss_t = pg + kl_coef kl - entropy_coef entropy
then one scalar by `aggregation`. With len_i = #response tokens of sequence i and N' = #sequences
with len_i > 0 (empty rows, e.g. batch padding, are left out of every denominator, no NaN):
    token_mean               sum_{i,t} loss_it / sum_i len_i      DAPO; GRPO-Zero's loss (sums over
                                                                  the batch / num_target_tokens)
    seq_mean                 (1/N') sum_i (1/len_i) sum_t loss_it GRPO as written (DeepSeekMath)
    seq_mean_token_sum       (1/N') sum_i sum_t loss_it           per-sequence sums (verl's name)
    seq_mean_token_sum_norm  (1/N') sum_i sum_t loss_it / T       Dr. GRPO (Liu et al. 2025): the
                                                                  1/len_i replaced by a constant

At ratio = 1 (old_logp = logp, the first update on fresh samples) the clipped objective's gradient
is exactly the unclipped one, -A grad logp; only its value differs (-A instead of -A logp).

Like rlsoft.weighting, per-token terms are pure jnp functions of ONE unbatched sequence (checked
with chex) vmapped over the batch; only the aggregation looks across sequences.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp

AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k3")
# |log ratio| is clamped here before exp: e^20 ~ 5e8 is far past any clip range, and an inf ratio
# would turn the zero cotangent of the unselected PPO branch into 0 * inf = NaN gradients.
LOG_RATIO_CLAMP = 20.0

METRIC_NAMES: tuple[str, ...] = (
    "pg_loss", "kl", "entropy", "clip_frac", "ratio_mean", "approx_kl_old", "num_tokens",
)


# --------------------------------------------------------------------------------------------
# Config.


def _check_number(name: str, value, *, allowed: str, low: float, low_open: bool, high: float = math.inf):
    """ValueError naming `name` unless `value` is a real finite number in the given range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Static settings of `policy_loss` (frozen and hashable, so it can be a jit static argument).

    clip_eps None or 0 turns clipping off (weighted log-likelihood); clip_eps_high None means
    clip_eps (symmetric PPO). Defaults are GRPO-Zero's token-level loss plus PPO's clip at 0.2.
    """

    aggregation: str = "token_mean"
    clip_eps: Optional[float] = 0.2
    clip_eps_high: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is unknown; allowed: {', '.join(AGGREGATIONS)}")
        if self.clip_eps is not None:
            # clip_eps >= 1 would put the lower clip at ratio <= 0, which no ratio can cross.
            _check_number("clip_eps", self.clip_eps, allowed="None or a float in [0, 1)", low=0.0,
                          low_open=False, high=1.0)
        if self.clip_eps_high is not None:
            if not self.clipped:
                raise ValueError(f"clip_eps_high={self.clip_eps_high!r} needs clip_eps > 0 (clipping is off)")
            _check_number("clip_eps_high", self.clip_eps_high, allowed="None or a finite float > 0",
                          low=0.0, low_open=True)
        _check_number("kl_coef", self.kl_coef, allowed="a finite float >= 0", low=0.0, low_open=False)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is unknown; allowed: {', '.join(KL_ESTIMATORS)}")
        _check_number("entropy_coef", self.entropy_coef, allowed="a finite float >= 0", low=0.0, low_open=False)

    @property
    def clipped(self) -> bool:
        return self.clip_eps is not None and self.clip_eps > 0

    @property
    def eps_low(self) -> float:
        return float(self.clip_eps or 0.0)

    @property
    def eps_high(self) -> float:
        return float(self.eps_low if self.clip_eps_high is None else self.clip_eps_high)


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, one sequence each.


def sequence_log_probs(logits: chex.Array, targets: chex.Array) -> chex.Array:
    """log softmax(logits[t])[targets[t]] for one sequence: logits [T, V] (any float), targets [T].

    Computed in float32 whatever the logits' dtype (bf16 logits lose too much in log_softmax's
    subtraction). An out-of-range target gives NaN (take_along_axis's fill mode); mask it.
    """
    chex.assert_rank([logits, targets], [2, 1])
    chex.assert_equal_shape_prefix([logits, targets], 1)
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.take_along_axis(logp, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]


def sequence_entropy(logits: chex.Array) -> chex.Array:
    """H_t = -sum_v p_tv log p_tv, p = softmax(logits[t]), for one sequence [T, V] -> [T], float32.

    0 log 0 = 0: -inf logits (masked vocabulary) give finite values and finite gradients.
    """
    chex.assert_rank(logits, 2)
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    # Double where: p * logp at p = 0, logp = -inf is NaN in value and in gradient.
    finite = jnp.isfinite(logp)
    safe = jnp.where(finite, logp, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


def token_log_probs(logits, targets) -> jax.Array:
    """`sequence_log_probs` over leading axes: logits [..., T, V], targets [..., T] -> [..., T] f32."""
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    chex.assert_equal_shape_prefix([logits, targets], targets.ndim)
    lead, (t, v) = logits.shape[:-2], logits.shape[-2:]
    out = jax.vmap(sequence_log_probs)(logits.reshape((-1, t, v)), targets.reshape((-1, t)))
    return out.reshape(lead + (t,))


def token_entropy(logits) -> jax.Array:
    """`sequence_entropy` over leading axes: logits [..., T, V] -> [..., T] float32."""
    logits = jnp.asarray(logits)
    lead, (t, v) = logits.shape[:-2], logits.shape[-2:]
    return jax.vmap(sequence_entropy)(logits.reshape((-1, t, v))).reshape(lead + (t,))


# --------------------------------------------------------------------------------------------
# Per-token terms (elementwise: any shape).


def kl_k1(logp: chex.Array, ref_logp: chex.Array) -> chex.Array:
    """k1 = -log(ref / pi) = logp - ref_logp. Unbiased for KL(pi || ref) under y ~ pi; can be < 0."""
    return logp - ref_logp


def kl_k3(logp: chex.Array, ref_logp: chex.Array) -> chex.Array:
    """k3 = r - 1 - log r with log r = ref_logp - logp (clamped to +-LOG_RATIO_CLAMP).

    Unbiased for KL(pi || ref) under y ~ pi and >= 0 pointwise (r - 1 >= log r). expm1 keeps it
    accurate for r near 1; the max(., 0) only removes a possible -1 ulp of rounding.
    """
    log_r = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.maximum(jnp.expm1(log_r) - log_r, 0.0)


def ppo_surrogate(logp, old_logp, adv, eps_low: float, eps_high: float):
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) -> (loss, clipped, ratio).

    `clipped` marks the tokens where the clipped term is the (strictly) larger loss, i.e. where
    the gradient is cut to zero: A > 0 with r > 1 + eps_high, A < 0 with r < 1 - eps_low.
    Selecting with where (not jnp.maximum) gives the unclipped gradient -A r grad logp exactly
    inside the range, with no half-and-half split of maximum's gradient at ties.
    """
    ratio = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped_loss = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    clipped = clipped_loss > unclipped
    return jnp.where(clipped, clipped_loss, unclipped), clipped, ratio


def sequence_terms(logp, old_logp, mask, weight, ref_logp, entropy, cfg: PolicyLossConfig):
    """Per-token loss and diagnostics of ONE sequence ([T] each, `weight` a scalar).

    Every returned [T] array is exactly 0 where mask == 0. old_logp, ref_logp and weight are data
    (stop_gradient here, so passing logp itself as old_logp on the first update is safe).
    """
    chex.assert_rank([logp, old_logp, mask, weight, ref_logp, entropy], [1, 1, 1, 0, 1, 1])
    chex.assert_equal_shape([logp, old_logp, mask, ref_logp, entropy])
    live = mask != 0
    # Sanitise first: a where after a NaN-producing op would still leak NaN into the gradient.
    z = lambda x: jnp.where(live, x, jnp.zeros_like(x))
    logp, entropy = z(logp), z(entropy)
    old_logp, ref_logp = z(jax.lax.stop_gradient(old_logp)), z(jax.lax.stop_gradient(ref_logp))
    adv = jax.lax.stop_gradient(weight)

    if cfg.clipped:
        pg, clipped, ratio = ppo_surrogate(logp, old_logp, adv, cfg.eps_low, cfg.eps_high)
    else:
        pg = -adv * logp
        clipped = jnp.zeros_like(live)
        ratio = jnp.exp(jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    kl = (kl_k1 if cfg.kl_estimator == "k1" else kl_k3)(logp, ref_logp)
    loss = pg + cfg.kl_coef * kl - cfg.entropy_coef * entropy
    # approx_kl_old: samples come from pi_old, so k3 with r = pi / pi_old estimates KL(old || pi).
    approx_kl_old = kl_k3(old_logp, logp)
    return {
        "loss": z(loss),
        "pg_loss": z(pg),
        "kl": z(kl),
        "entropy": entropy,
        "clip_frac": z(clipped.astype(logp.dtype)),
        "ratio_mean": z(ratio),
        "approx_kl_old": z(approx_kl_old),
    }


# --------------------------------------------------------------------------------------------
# Aggregation over the batch.


def aggregate(x: chex.Array, mask: chex.Array, aggregation: str) -> jax.Array:
    """One scalar from per-token values x [N, T] (0 where mask == 0); see the module docstring."""
    chex.assert_rank([x, mask], 2)
    chex.assert_equal_shape([x, mask])
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is unknown; allowed: {', '.join(AGGREGATIONS)}")
    live = (mask != 0).astype(x.dtype)
    x = jnp.where(live > 0, x, 0.0)
    if aggregation == "token_mean":
        return jnp.sum(x) / jnp.maximum(jnp.sum(live), 1.0)
    lengths = jnp.sum(live, axis=-1)
    seq_sum = jnp.sum(x, axis=-1)
    n_seq = jnp.maximum(jnp.sum(lengths > 0), 1).astype(x.dtype)
    if aggregation == "seq_mean":
        return jnp.sum(seq_sum / jnp.maximum(lengths, 1.0)) / n_seq
    if aggregation == "seq_mean_token_sum":
        return jnp.sum(seq_sum) / n_seq
    return jnp.sum(seq_sum) / (n_seq * x.shape[-1])  # seq_mean_token_sum_norm


def _as_float(x, dtype=None) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(dtype or jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# The losses.


def policy_loss(logp, old_logp, mask, weights, cfg: PolicyLossConfig, ref_logp=None, entropy=None):
    """The trainer's RL loss: (scalar loss, metrics) for one batch of N responses of length T.

    logp [N, T] carries the gradient (a teacher-forced forward of the current policy, e.g.
    `token_log_probs`); old_logp [N, T] are the sampler's log-probs (rollout `logprobs`, or
    stop_gradient(logp) on the first update); weights [N] from `rlsoft.weighting`; mask [N, T]
    marks response tokens. ref_logp [N, T] is needed iff kl_coef > 0 and entropy [N, T] (e.g.
    `token_entropy`, differentiable) iff entropy_coef > 0; missing ones report 0 in the metrics.

    metrics (all scalars): pg_loss (the PG term, aggregated like the loss), kl and entropy (mean
    per response token), clip_frac (fraction of response tokens whose gradient the clip cut),
    ratio_mean, approx_kl_old (k3 estimate of KL(pi_old || pi), per token), num_tokens.

    Teacher forcing + RL (supervised loss on ground truth beside the policy loss): the trainer forms L = L_SL + lambda * L_RL from two forwards,
    L_RL = policy_loss(...) on the sampled responses and L_SL = sft_loss(logp_demo, mask_demo) on
    the teacher-forced demonstration tokens, each normalised by its own token count, and
    differentiates the sum once; lambda (a trainer flag) sets the RL share. No helper is needed.

    Raises ValueError at trace time for a missing ref_logp / entropy that the config needs.
    """
    if not isinstance(cfg, PolicyLossConfig):
        raise ValueError(f"cfg must be a PolicyLossConfig; got {type(cfg).__name__}")
    if ref_logp is None and cfg.kl_coef > 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp")
    if entropy is None and cfg.entropy_coef > 0:
        raise ValueError(f"entropy_coef={cfg.entropy_coef} needs entropy")
    logp = _as_float(logp)
    dtype = logp.dtype
    old_logp, weights = _as_float(old_logp, dtype), _as_float(weights, dtype)
    mask = jnp.asarray(mask)
    chex.assert_rank([logp, weights], [2, 1])
    chex.assert_equal_shape([logp, old_logp, mask])
    chex.assert_equal_shape_prefix([logp, weights], 1)
    # Absent inputs become values whose terms are exactly 0: ref = logp gives k1 = k3 = 0.
    ref = logp if ref_logp is None else _as_float(ref_logp, dtype)
    ent = jnp.zeros_like(logp) if entropy is None else _as_float(entropy, dtype)
    chex.assert_equal_shape([logp, ref, ent])

    terms = jax.vmap(lambda *a: sequence_terms(*a, cfg=cfg))(logp, old_logp, mask, weights, ref, ent)
    loss = aggregate(terms["loss"], mask, cfg.aggregation)
    per_token = lambda k: aggregate(terms[k], mask, "token_mean")
    metrics = {
        "pg_loss": aggregate(terms["pg_loss"], mask, cfg.aggregation),
        "kl": per_token("kl"),
        "entropy": per_token("entropy"),
        "clip_frac": per_token("clip_frac"),
        "ratio_mean": per_token("ratio_mean"),
        "approx_kl_old": per_token("approx_kl_old"),
        "num_tokens": jnp.sum(mask != 0).astype(dtype),
    }
    return loss, metrics


def sft_loss(logp, mask, aggregation: str = "token_mean") -> jax.Array:
    """Supervised (teacher-forcing) loss: -log-likelihood of the target tokens, aggregated.

    token_mean: -sum_{i,t} m_it logp_it / sum m (the usual per-token cross-entropy). Masked
    positions are ignored even if non-finite.
    """
    logp = _as_float(logp)
    chex.assert_rank(logp, 2)
    chex.assert_equal_shape([logp, jnp.asarray(mask)])
    return aggregate(-logp, jnp.asarray(mask), aggregation)
