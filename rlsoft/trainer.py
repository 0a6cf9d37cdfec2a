"""The canonical update of every language-model experiment: weights -> token-level loss -> AdamW.

One RL step of `rlsoft.train_loop` is rollout -> reward -> weights -> update. This module holds the
pure, jitted part: given a batch of prompts + sampled responses and their rewards (one group of G
per question), it computes the per-sample weights with any `rlsoft.weighting` scheme, the
teacher-forced log-probs, the token-level policy loss (`rlsoft.losses`: PPO clipping, KL to a
frozen reference, entropy bonus), an optional supervised term on ground-truth solutions (teacher
forcing beside RL: L = rl_weight * L_RL + sl_weight * L_SL; rl_weight = 0 is the supervised-only
control), and applies AdamW with gradient clipping and
warmup, accumulating gradients over micro-batches. A step whose loss or gradient is not finite is
skipped (params and optimizer state unchanged) and counted.

It knows no model. It takes `forward(params, tokens[B,L], positions[B,L], mask[B,L]) -> logits[B,L,V]`
and, optionally, a faster `response_logits(params, prompts[Q,P], prompt_mask, responses[Q*G,N],
response_mask) -> logits[Q*G,N,V]` (the logits that predict each response token) that runs the
prompt of a group once for its G rows (models/qwen2_train.py has both for Qwen2).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from rlsoft import losses, optim, roles, weighting
from rlsoft import mesh as mesh_lib
from rlsoft.config import check
from rlsoft.roles import TrainState
from rlsoft.rollout import prompt_positions

ForwardFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
ResponseLogitsFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Everything the jitted update needs to know statically. The policy's optimizer is nested
    (`--policy.learning_rate=...`); the flat names users already type are aliases of it."""

    scheme: str = "softmax"
    tau: Union[float, str] = 0.5  # a float (then scheduled by the loop) or "auto"
    policy: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=10)
    sft_steps: int = 0  # warm-start steps before RL (run by the loop)
    sft_learning_rate: Optional[float] = None  # None: policy.learning_rate
    micro_batches: int = 1
    ppo_epochs: int = 1
    aggregation: str = "token_mean"
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    sl_weight: float = 0.0
    rl_weight: float = 1.0  # the policy-gradient term's coefficient; 0 with sl_weight > 0: supervised only
    diag_tau: float = 0.5  # the temperature of the softmax weights logged beside every scheme

    FLAG_ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "policy.learning_rate", "warmup_steps": "policy.warmup_steps",
        "weight_decay": "policy.weight_decay", "grad_clip": "policy.grad_clip",
        "adam_b1": "policy.b1", "adam_b2": "policy.b2", "optimizer": "policy.name",
    }

    def __post_init__(self):
        weighting.validate_scheme(self.scheme)
        if self.scheme in weighting.NEEDS_TAU or isinstance(self.tau, str):
            weighting.validate_tau(self.tau, self.scheme)
        check(self.sft_steps >= 0, f"sft_steps={self.sft_steps} is invalid; need >= 0")
        check(self.sft_learning_rate is None or (self.sft_learning_rate > 0 and math.isfinite(self.sft_learning_rate)),
              f"sft_learning_rate={self.sft_learning_rate} is invalid; need a finite value > 0")
        check(self.micro_batches >= 1, f"micro_batches={self.micro_batches} is invalid; need >= 1")
        check(self.ppo_epochs >= 1, f"ppo_epochs={self.ppo_epochs} is invalid; need >= 1")
        check(self.sl_weight >= 0 and math.isfinite(self.sl_weight),
              f"sl_weight={self.sl_weight} is invalid; need a finite value >= 0")
        check(self.rl_weight >= 0 and math.isfinite(self.rl_weight),
              f"rl_weight={self.rl_weight} is invalid; need a finite value >= 0")
        check(self.rl_weight > 0 or self.sl_weight > 0,
              "rl_weight=0 with sl_weight=0 trains nothing; give one of them a positive value")
        weighting.validate_tau(self.diag_tau)
        self.loss_config()  # validates the loss fields

    def loss_config(self) -> losses.PolicyLossConfig:
        return losses.PolicyLossConfig(
            aggregation=self.aggregation, clip_eps=self.clip_eps, kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef)


class Batch(NamedTuple):
    """B = questions x G' rows (G' = G, plus one if the ground truth is injected)."""

    prompts: jax.Array  # [B,P] int32, left-padded
    prompt_mask: jax.Array  # [B,P] bool
    responses: jax.Array  # [B,N] int32
    response_mask: jax.Array  # [B,N] bool
    rewards: jax.Array  # [Q,G'] f32, one group per question
    tau: jax.Array  # f32 scalar, this step's temperature (ignored when tau == "auto")
    sl_responses: jax.Array  # [S,N] int32 ground-truth responses for the supervised term
    sl_prompts: jax.Array  # [S,P]
    sl_prompt_mask: jax.Array  # [S,P]
    sl_mask: jax.Array  # [S,N] bool (all False when there is no supervised term)


def make_optimizer(cfg: UpdateConfig) -> optax.GradientTransformation:
    """The policy's chain (`rlsoft.optim`): a warm-start phase at `sft_learning_rate`, then RL at
    `policy.learning_rate`, each with its own warmup (RL after SFT has gradients of another scale)."""
    sft_rate = cfg.policy.learning_rate if cfg.sft_learning_rate is None else cfg.sft_learning_rate
    return optim.make_optimizer(cfg.policy, phases=((cfg.sft_steps, sft_rate),))


def init_state(params: Any, cfg: UpdateConfig) -> TrainState:
    """Roles: `policy` (trained), plus a frozen `reference` when the KL term needs one."""
    named = {"policy": roles.trainable(params, make_optimizer(cfg))}
    if cfg.kl_coef > 0:
        named["reference"] = roles.frozen(params)
    return TrainState.create(named)


def response_logits_from_forward(forward: ForwardFn) -> ResponseLogitsFn:
    """The generic `response_logits`: each prompt repeated for its G rows, prompt + response through
    `forward`; the logits at position i predict token i + 1, so response token n is predicted at
    position P - 1 + n."""

    def response_logits(params, prompts, prompt_mask, responses, response_mask):
        g = responses.shape[0] // prompts.shape[0]
        if g > 1:
            prompts, prompt_mask = jnp.repeat(prompts, g, axis=0), jnp.repeat(prompt_mask, g, axis=0)
        p = prompts.shape[1]
        tokens = jnp.concatenate([prompts, responses], axis=1)
        mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(bool)
        return forward(params, tokens, prompt_positions(mask), mask)[:, p - 1:-1]

    return response_logits


def response_log_probs(logits_fn: ResponseLogitsFn, params, prompts, prompt_mask, responses, response_mask):
    """Teacher-forced log-probs [B,N] and entropies [B,N] of the response tokens; prompts are one
    per row ([B,P]) or one per group of G rows ([B/G,P])."""
    logits = logits_fn(params, prompts, prompt_mask, responses, response_mask)
    return losses.token_log_probs(logits, responses), losses.token_entropy(logits)


def group_weights(rewards: jax.Array, scheme: str, tau, batch_tau: jax.Array, logp=None, ref_logp=None) -> jax.Array:
    """[Q,G] rewards -> [Q,G] weights; a float tau is the loop's scheduled value (traced). `logp`,
    `ref_logp`: [Q,G] sequence log-probs under the rollout policy and the reference (NEEDS_LOGP)."""
    return weighting.compute_weights(rewards, scheme, tau="auto" if tau == "auto" else batch_tau, logp=logp,
                                     ref_logp=ref_logp)


def group_sequence_log_probs(token_logp: jax.Array, response_mask: jax.Array, groups: int) -> jax.Array:
    """[B,N] token log-probs -> [Q,G] log-probs of the whole responses (sums over their tokens)."""
    return jnp.sum(jnp.where(response_mask, token_logp, 0.0), axis=-1).reshape(groups, -1)


def _micro(x: jax.Array, m: int) -> jax.Array:
    return x.reshape((m, x.shape[0] // m) + x.shape[1:])


def _loss_shares(mask: jax.Array, m: int, aggregation: str) -> jax.Array:
    """Each micro-batch's share of the batch loss, so that accumulation is exact.

    A micro-batch's loss is a mean over its own tokens (token_mean) or non-empty sequences
    (seq_mean); weighting it by its share of those units gives the full-batch mean.
    """
    mb = _micro(mask.astype(jnp.float32), m)
    units = jnp.sum(mb, axis=2) if aggregation == "token_mean" else jnp.sum(mb, axis=2) > 0
    per = jnp.sum(units.astype(jnp.float32), axis=1)
    return per / jnp.maximum(jnp.sum(per), 1.0)


def _varying(tree, x):
    """`tree`, tied to this micro-batch's `x` by an optimization barrier, on a multi-device mesh (else unchanged).

    The weights are the same in every micro-batch, so XLA's loop-invariant code motion hoisted their
    FSDP all-gathers out of the micro-batch loop and kept every layer's gathered weights live through
    the whole loop (Qwen2.5-7B, 2 layers, 8 devices: five V x d and twelve MLP matrices whole, in
    float32, outside the loop at the update's peak), which no remat policy can release. Tied to
    the loop's input they are gathered where used, as FSDP means. On one device nothing is gathered:
    unchanged, so XLA may still hoist the weights' casts."""
    if jax.sharding.get_abstract_mesh().size <= 1:  # no mesh (size 0) or one device
        return tree
    return jax.lax.optimization_barrier((tree, x))[0]


def _accumulated_grads(params, loss_fn, micro_xs):
    """Sum the gradients of `loss_fn(params, x) -> (loss, metrics)` over the micro-batches of
    `micro_xs` (leading axis). Each micro-batch's loss must already carry its share of the batch
    mean (`_loss_shares`), so the sums are the full-batch loss, metrics and gradient."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro_xs)
    (_, metric_shape), _ = jax.eval_shape(grad_fn, params, first)

    def accumulate(acc, x):
        (loss, metrics), grads = grad_fn(_varying(params, x), x)
        return jax.tree.map(jnp.add, acc, (grads, loss, metrics)), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, jnp.zeros(()), metric_shape))
    (grads, loss, metrics), _ = jax.lax.scan(accumulate, zeros, micro_xs)
    return grads, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


def _train_policy(state: TrainState, tx, loss_fn, xs, epochs: int) -> tuple[TrainState, dict]:
    """`epochs` optimizer steps of the policy on the accumulated gradient; the last epoch's metrics."""

    def epoch(policy, _):
        grads, metrics = _accumulated_grads(policy.params, loss_fn, xs)
        return roles.apply_updates(policy, grads, tx), metrics

    policy, per_epoch = jax.lax.scan(epoch, state.roles["policy"], None, length=epochs)
    metrics = jax.tree.map(lambda v: v[-1], per_epoch)
    metrics["skipped_updates"] = optim.skipped_updates(policy.opt_state).astype(jnp.float32)
    return state.replace_role("policy", policy)._replace(step=state.step + 1), metrics


def update(state: TrainState, batch: Batch, *, logits_fn: ResponseLogitsFn, grouped: bool, cfg: UpdateConfig):
    """One RL update (ppo_epochs passes over the batch). Pure: (state, batch) -> (state, metrics).

    `grouped`: `logits_fn` takes one prompt per question (`batch.prompts[::G]`; the G rows of a
    question share its prompt), else one per row. `batch.sl_*` rows (one per question, may be
    empty) add `sl_weight * L_SL` when sl_weight > 0; the RL term is scaled by rl_weight.

    With ppo_epochs == 1 the params cannot move between the rollout and the loss, so the old
    log-probs are stop_gradient(logp) of the loss's own forward: the same loss and gradient (the
    ratio is exactly 1) without a separate forward over the batch (measured 1.14-1.40x on the
    tiny preset's update). With more epochs they come from one forward before the first epoch.
    The NEEDS_LOGP schemes (gvpo, tpo) weight with the rollout policy's sequence log-probs, from
    that forward (so with ppo_epochs == 1 they cost one extra forward), and gvpo with the frozen
    reference's when kl_coef > 0 (else its reference is uniform).
    """
    q, g = batch.rewards.shape
    chex.assert_axis_dimension(batch.responses, 0, q * g)
    m = cfg.micro_batches
    if grouped and q % m:
        raise ValueError(f"micro_batches={m} is invalid; with shared prompts it must divide the questions={q}")
    loss_cfg = cfg.loss_config()
    prompts = (batch.prompts[::g], batch.prompt_mask[::g]) if grouped else (batch.prompts, batch.prompt_mask)
    seq = prompts + (batch.responses, batch.response_mask)
    log_probs = functools.partial(response_log_probs, logits_fn)
    # None (an empty pytree) where a term does not need them: nothing extra goes through the scan.
    policy_params = state.params("policy")
    needs_logp = cfg.scheme in weighting.NEEDS_LOGP
    rollout_logp = (jax.lax.stop_gradient(log_probs(policy_params, *seq)[0])
                    if cfg.ppo_epochs > 1 or needs_logp else None)
    old_logp = rollout_logp if cfg.ppo_epochs > 1 else None
    ref_logp = jax.lax.stop_gradient(log_probs(state.params("reference"), *seq)[0]) if cfg.kl_coef > 0 else None
    seq_logp, seq_ref = (None if x is None or not needs_logp else group_sequence_log_probs(x, batch.response_mask, q)
                         for x in (rollout_logp, ref_logp))
    weights = group_weights(batch.rewards, cfg.scheme, cfg.tau, batch.tau, seq_logp, seq_ref)
    use_sl = cfg.sl_weight > 0 and batch.sl_responses.shape[0] > 0
    sl = (batch.sl_prompts, batch.sl_prompt_mask, batch.sl_responses, batch.sl_mask)
    xs = {
        "rl": jax.tree.map(lambda x: _micro(x, m), seq + (weights.reshape(-1), old_logp, ref_logp)),
        "rl_share": _loss_shares(batch.response_mask, m, cfg.aggregation),
        "sl": jax.tree.map(lambda x: _micro(x, m), sl) if use_sl else None,
        "sl_share": _loss_shares(batch.sl_mask, m, cfg.aggregation) if use_sl else None,
    }

    def loss_fn(params, x):
        prompts, pmask, resp, rmask, w, old, ref = x["rl"]
        logp, ent = log_probs(params, prompts, pmask, resp, rmask)
        if old is None:  # ppo_epochs == 1
            old = jax.lax.stop_gradient(logp)
        # The entropy is always reported; it carries a gradient only with an entropy bonus.
        ent = ent if cfg.entropy_coef > 0 else jax.lax.stop_gradient(ent)
        loss, metrics = losses.policy_loss(logp, old, rmask, jax.lax.stop_gradient(w), loss_cfg,
                                           ref_logp=ref, entropy=ent)
        metrics = jax.tree.map(lambda v: v * x["rl_share"], metrics)
        loss = loss * x["rl_share"]
        if cfg.rl_weight != 1.0:  # static: the default program is unchanged
            loss = cfg.rl_weight * loss
        if use_sl:
            sl_logp, _ = log_probs(params, *x["sl"])
            sl_loss = losses.sft_loss(sl_logp, x["sl"][3], cfg.aggregation) * x["sl_share"]
            loss = loss + cfg.sl_weight * sl_loss
            metrics["sl_loss"] = sl_loss
        return loss, metrics

    state, metrics = _train_policy(state, make_optimizer(cfg), loss_fn, xs, cfg.ppo_epochs)
    out = {f"train/{TRL_NAMES.get(k, k)}": v for k, v in metrics.items()}
    out.update(weight_metrics(batch.rewards, weights, cfg.diag_tau))
    out["train/tau"] = batch.tau
    return state, out


def sft_update(state: TrainState, prompts, prompt_mask, responses, response_mask, *, logits_fn: ResponseLogitsFn,
               cfg: UpdateConfig):
    """One supervised update on ground-truth responses (the warm start): L_SL only; one prompt per row."""
    m = cfg.micro_batches
    xs = {"seq": jax.tree.map(lambda x: _micro(x, m), (prompts, prompt_mask, responses, response_mask)),
          "share": _loss_shares(response_mask, m, cfg.aggregation)}

    def loss_fn(params, x):
        logp, _ = response_log_probs(logits_fn, params, *x["seq"])
        loss = losses.sft_loss(logp, x["seq"][3], cfg.aggregation) * x["share"]
        return loss, {"sl_loss": loss}

    state, metrics = _train_policy(state, make_optimizer(cfg), loss_fn, xs, 1)
    return state, {f"sft/{k}": v for k, v in metrics.items() if k != "sl_loss"}


# Where TRL logs the same quantity, its name (GRPOTrainer): a reader can compare runs directly.
TRL_NAMES = {"clip_frac": "clip_ratio/region_mean"}


def weight_metrics(rewards: jax.Array, weights: jax.Array, diag_tau: float) -> dict[str, jax.Array]:
    """The training scheme's weight stats under `train/weights/`, and, for comparison, the shape of
    the GRPO (linear) and softmax(tau=diag_tau) weights of the same groups under `diag/<scheme>/`."""
    stats = weighting.summarize_weight_stats(weighting.weight_stats(weights, rewards))
    out = {f"train/weights/{k}": v for k, v in stats.items()}
    out["train/frac_reward_zero_std"] = stats["zero_std_frac"]
    for name, w in (("linear", weighting.compute_weights(rewards, "linear")),
                    (f"softmax_tau{diag_tau:g}", weighting.compute_weights(rewards, "softmax", tau=diag_tau))):
        diag = weighting.summarize_weight_stats(weighting.weight_stats(w, rewards))
        out.update({f"diag/{name}/{k}": v for k, v in diag.items() if k in weighting.WEIGHT_SHAPE_STATS})
    return out


def make_update(forward: ForwardFn, cfg: UpdateConfig, response_logits: Optional[ResponseLogitsFn] = None,
                state_sharding: Any = None):
    """`update` and `sft_update` jitted once each, donating the old state.

    With `response_logits` (a model's group-shared-prompt version, see the module docstring) the
    RL update runs each question's prompt once for its G rows; otherwise `forward` serves both.
    `state_sharding` (a TrainState of NamedShardings, rlsoft.mesh.train_state_shardings) fixes the
    state's input and output shardings, so the updated state stays sharded as it came (params,
    optimizer state and reference) and the next call reuses the compiled update; the batch keeps the
    shardings it was placed with (rlsoft.mesh.shard_rows).
    """
    grouped = response_logits is not None
    logits_fn = response_logits if grouped else response_logits_from_forward(forward)
    rl = functools.partial(update, logits_fn=logits_fn, grouped=grouped, cfg=cfg)
    sft = functools.partial(sft_update, logits_fn=logits_fn, cfg=cfg)
    if state_sharding is None:
        return jax.jit(rl, donate_argnums=0), jax.jit(sft, donate_argnums=0)
    out = (state_sharding, None)
    rl = jax.jit(rl, donate_argnums=0, in_shardings=(state_sharding, None), out_shardings=out)
    sft = jax.jit(sft, donate_argnums=0, in_shardings=(state_sharding,) + (None,) * 4, out_shardings=out)
    mesh = jax.tree.leaves(state_sharding)[0].mesh
    return mesh_lib.under_mesh(rl, mesh), mesh_lib.under_mesh(sft, mesh)

