"""Thinking tokens: a thinker writes T thought tokens, an answerer reads them; one compiled step trains both.

The question (Hutchins' "think tokens" experiments, public repository ekhadley/think_tokens): can
a policy learn to write intermediate tokens that a second policy needs in order to answer, when
the only signal is whether the answer comes out right? Per step, for B questions q with answers a:

  thoughts   G per question: sampled from the thinker pi_th(. | q) token by token ("sample",
             with whole-step epsilon-greedy and per-token epsilon exploration), or every one of
             the A^T sequences ("enumerate", the original's "search"), or one per question chosen
             by Gumbel MuZero tree search over thought tokens ("mctx"; `rlsoft.thought_search`).
  reward     r = log p_ans(a | thoughts) from the answerer's parameters, on the device inside
             the step ("logp"), or r = 1[thoughts = the hand-made thoughts] ("clean").
  thinker    sample / enumerate: w = any `rlsoft.weighting` scheme over the G rewards of a
             question; L_th = token-mean PPO surrogate of w with an entropy bonus
             (`rlsoft.losses.policy_loss`; one update per batch, so the ratio is 1 and the clip
             does not act, as in the original). mctx (AlphaZero, Silver et al. 2018): L_th =
             cross-entropy of the thinker's logits to the search's improved policy, minus the
             entropy bonus.
  answerer   L_ans = -log p_ans(a | thoughts) on the thoughts the thinker wrote, or on the
             hand-made thoughts ("super").

Both roles (`thinker`, `answerer`) are updated from one backward pass of L_th + L_ans: the reward
is a stop-gradient, so the two losses touch disjoint parameters. Without a thinker
(`ThinkFns.thinker_logits` None) the step trains the answerer alone: the no-think baseline.

The core knows no model and no task: `ThinkFns` holds pure jnp functions. Thought ids are classes
in [0, A); with an end-of-thought class `eot`, every position after the first eot is eot and is
left out of the thinker's loss (`thought_mask`).

`make_train_chunk` scans `chunk` steps in one jit and vmaps a population of P members (seeds, or
settings that share shapes) over a leading axis of the state and the keys: member i of a
population is the same computation as a population of one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlsoft import losses, optim, roles, thought_search, weighting
from rlsoft.roles import stack_members, unstack_member  # noqa: F401 (re-exported: think_testbed, tests)
from rlsoft.config import check, check_finite
from rlsoft.roles import TrainState
from rlsoft.sampling import categorical

SEARCHES = ("sample", "enumerate", "mctx")
_ENUMERATE_LIMIT = 4096  # sequences per question: beyond this, use --search=mctx


@dataclasses.dataclass(frozen=True)
class ThinkConfig:
    scheme: str = "softmax"
    tau: float = 0.5
    clean: bool = False  # thinker reward 1[thoughts = hand-made] instead of log p_ans(correct)
    super: bool = False  # the answerer learns from the hand-made thoughts, not the thinker's
    search: str = "sample"
    batch_size: int = 64
    group_size: int = 32  # sample only; enumerate's group is every sequence, mctx's is one
    epsilon: float = 0.0  # probability that a whole step uses uniform random thoughts ...
    epsilon_decay: float = 1.0  # ... multiplied by this every step
    token_epsilon: float = 0.0  # probability that each thought token is uniform random
    entropy_coef: float = 0.01
    clip_eps: float = 0.2
    num_simulations: int = 32  # mctx: simulations per thought position
    thinker: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)
    answerer: optim.OptimizerConfig = optim.OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)

    def __post_init__(self):
        weighting.validate_scheme(self.scheme)
        weighting.validate_tau(self.tau, self.scheme)
        check(self.scheme not in weighting.NEEDS_LOGP, f"scheme={self.scheme} is unavailable here: it needs the "
              "samples' log-probs, which this testbed does not pass; use experiments.bandit or experiments.countdown")
        check(self.search in SEARCHES, f"search={self.search!r} is unknown; allowed: {', '.join(SEARCHES)}")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} is invalid; need >= 1")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        for name in ("epsilon", "epsilon_decay", "token_epsilon"):
            check_finite(0 <= getattr(self, name) <= 1, name, getattr(self, name), "0 <= value <= 1")
        check_finite(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "a finite value >= 0")
        check_finite(0 <= self.clip_eps < 1, "clip_eps", self.clip_eps, "0 <= value < 1")
        check(self.num_simulations >= 2, f"num_simulations={self.num_simulations} is invalid; need >= 2")

    @property
    def loss_config(self) -> losses.PolicyLossConfig:
        return losses.PolicyLossConfig(clip_eps=self.clip_eps, entropy_coef=self.entropy_coef)


class ThinkFns(NamedTuple):
    """The models and the task as pure jnp functions, and the shape of a thought."""

    thinker_logits: Optional[Callable]  # (params, questions [B,k], thoughts [B,T]) -> [B,T,A]; None: no-think
    answer_logits: Callable  # (params, questions [B,k], thoughts [B,T]) -> [B,M]
    batch_fn: Callable  # key -> (questions [B,k], answers [B], hand_thoughts [B,T])
    length: int  # T, thought tokens per sequence
    num_classes: int  # A, thought classes (eot included when there is one)
    eot: Optional[int] = None  # the end-of-thought class; None: always T thoughts
    blind: bool = False  # the answerer ignores the question: rewards may be scored per distinct sequence


def count_sequences(num_classes: int, length: int, eot: Optional[int]) -> int:
    """Distinct thought sequences: A^T, or with an eot (V = A - 1 thoughts) those of l < T thoughts
    then eot, plus those of T thoughts: sum_{l<T} V^l + V^T."""
    if eot is None:
        return num_classes ** length
    v = num_classes - 1
    return sum(v ** n for n in range(length)) + v ** length


def validate(cfg: ThinkConfig, num_classes: int, length: int, eot: Optional[int]) -> None:
    """One-line errors for settings this task cannot run (call it before anything compiles)."""
    if cfg.search == "enumerate":
        n = count_sequences(num_classes, length, eot)
        check(n <= _ENUMERATE_LIMIT, f"search=enumerate is invalid here: {n} thought sequences per question "
              f"(limit {_ENUMERATE_LIMIT}); use --search=mctx")


# --------------------------------------------------------------------------------------------
# Thought sequences.


thought_mask = thought_search.thought_mask  # 1 up to and including the first eot (all: no eot)


def canonicalize(thoughts: chex.Array, eot: Optional[int]) -> chex.Array:
    """Every position after the first eot becomes eot (what the answerer reads)."""
    return thoughts if eot is None else thought_search.canonicalize(thoughts, eot)


@functools.lru_cache(maxsize=None)
def _every_sequence(num_classes: int, length: int) -> np.ndarray:
    with jax.ensure_compile_time_eval():
        return np.asarray(thought_search.enumerate_sequences(num_classes, length, max_sequences=2**22))


@functools.lru_cache(maxsize=None)
def _canonical_sequences(num_classes: int, length: int, eot: Optional[int]) -> np.ndarray:
    every = _every_sequence(num_classes, length)
    if eot is None:
        return every
    ended = np.cumsum(every == eot, axis=1) - (every == eot) > 0  # past the first eot
    return every[~np.any(ended & (every != eot), axis=1)]


def canonical_sequences(fns: ThinkFns) -> np.ndarray:
    """Every distinct thought sequence [S,T] (the enumeration's group), in lexicographic order
    (numpy, a constant under jit)."""
    return _canonical_sequences(fns.num_classes, fns.length, fns.eot)


def sample_thoughts(key: chex.PRNGKey, logits_at: Callable, n: int, fns: ThinkFns, epsilon: chex.Numeric,
                    token_epsilon: float, first_logits: Optional[chex.Array] = None) -> chex.Array:
    """n thought sequences [n,T], token by token with `rlsoft.sampling.categorical`.

    `logits_at(thoughts [n,T], t) -> [n,A]` (causal: reads thoughts[:, :t] only). The first
    position reads the question alone, so a caller may pass its logits [n,A] computed once per
    question (`first_logits`) instead of a pass over all n rows. With probability `epsilon` the
    whole batch is uniform random; each token independently with `token_epsilon`.
    """
    k_all, k_tok = jax.random.split(key)
    uniform_step = jax.random.uniform(k_all) < epsilon
    thoughts = jnp.zeros((n, fns.length), jnp.int32)
    for t in range(fns.length):  # T is small and static: unrolled
        k_pol, k_eps, k_uni = jax.random.split(jax.random.fold_in(k_tok, t), 3)
        logits = first_logits if t == 0 and first_logits is not None else logits_at(thoughts, t)
        policy = categorical(k_pol, logits)
        explore = uniform_step | (jax.random.uniform(k_eps, (n,)) < token_epsilon)
        uniform = jax.random.randint(k_uni, (n,), 0, fns.num_classes)
        thoughts = thoughts.at[:, t].set(jnp.where(explore, uniform, policy).astype(jnp.int32))
    return canonicalize(thoughts, fns.eot)


def greedy_thoughts(logits_at: Callable, n: int, fns: ThinkFns) -> chex.Array:
    """The thinker's most likely token at each position, in turn: [n,T]."""

    def body(thoughts, t):
        return thoughts.at[:, t].set(jnp.argmax(logits_at(thoughts, t), -1).astype(jnp.int32)), None

    thoughts, _ = jax.lax.scan(body, jnp.zeros((n, fns.length), jnp.int32), jnp.arange(fns.length))
    return canonicalize(thoughts, fns.eot)


def thinker_logits_at(fns: ThinkFns, params: Any, questions: chex.Array) -> Callable:
    """(thoughts [n,T], t) -> the thinker's logits [n,A] at position t (one teacher-forced pass)."""
    return lambda thoughts, t: jax.lax.dynamic_index_in_dim(
        fns.thinker_logits(params, questions, thoughts), t, axis=1, keepdims=False)


def answer_log_prob(fns: ThinkFns, params: Any, questions, thoughts, answers) -> chex.Array:
    """log p_ans(answer | thoughts) [n]: the thinker's device reward (and the answerer's -loss)."""
    logp = jax.nn.log_softmax(fns.answer_logits(params, questions, thoughts))
    return jnp.take_along_axis(logp, answers[:, None], axis=-1)[:, 0]


def blind_answer_log_prob(fns: ThinkFns, params: Any, thoughts, answers, num_operands: int) -> chex.Array:
    """`answer_log_prob` for an answerer that reads only the thoughts: one pass over the A^T
    possible sequences (canonicalized), then a gather, instead of one per row (cheaper when the
    batch holds more rows than there are sequences)."""
    every = jnp.asarray(_every_sequence(fns.num_classes, fns.length))
    no_question = jnp.zeros((every.shape[0], num_operands), jnp.int32)  # a blind answerer does not read it
    table = jax.nn.log_softmax(fns.answer_logits(params, no_question, canonicalize(every, fns.eot)))
    place = fns.num_classes ** jnp.arange(fns.length - 1, -1, -1)
    return table[jnp.sum(thoughts * place, axis=-1), answers]


# --------------------------------------------------------------------------------------------
# One step.


def init_state(thinker_params: Any, answerer_params: Any, cfg: ThinkConfig) -> TrainState:
    role_map = {"answerer": roles.trainable(answerer_params, optim.make_optimizer(cfg.answerer))}
    if thinker_params is not None:
        role_map["thinker"] = roles.trainable(thinker_params, optim.make_optimizer(cfg.thinker))
    return TrainState.create(role_map)


def epsilon_at(cfg: ThinkConfig, step: chex.Array) -> chex.Array:
    """The whole-step exploration probability at `step`: epsilon * epsilon_decay^step."""
    return cfg.epsilon * jnp.power(cfg.epsilon_decay, step.astype(jnp.float32))


def _explore(fns: ThinkFns, cfg: ThinkConfig, th_params, ans_params, questions, answers, hand, step, key):
    """(thoughts [B,G,T], rewards [B,G], search targets [B,T,A] or None) for one batch."""
    b, t = questions.shape[0], fns.length
    sg = jax.lax.stop_gradient

    def reward(q, thoughts, a, h):
        if cfg.clean:
            return jnp.all(thoughts == h, axis=-1).astype(jnp.float32)
        if fns.blind and 2 * fns.num_classes ** t <= thoughts.shape[0]:
            return blind_answer_log_prob(fns, sg(ans_params), thoughts, a, q.shape[1])
        return answer_log_prob(fns, sg(ans_params), q, thoughts, a)

    if cfg.search == "mctx":
        result = thought_search.search_sequences(
            key, lambda prefix, pos: jnp.take_along_axis(
                fns.thinker_logits(sg(th_params), questions, prefix), pos[:, None, None], axis=1)[:, 0],
            _prefix_value(fns, cfg, sg(ans_params), questions, answers),
            lambda seqs: reward(questions, canonicalize(seqs, fns.eot), answers, hand),
            batch_size=b, length=t, num_classes=fns.num_classes, num_simulations=cfg.num_simulations, eot=fns.eot)
        thoughts = canonicalize(result.sequences, fns.eot)
        return thoughts[:, None], reward(questions, thoughts, answers, hand)[:, None], result.policy_targets
    if cfg.search == "enumerate":
        every = jnp.asarray(canonical_sequences(fns), jnp.int32)
        thoughts = jnp.broadcast_to(every[None], (b,) + every.shape)
    else:
        g = cfg.group_size
        rep = jnp.repeat(questions, g, axis=0)
        eps = epsilon_at(cfg, step)
        first = fns.thinker_logits(sg(th_params), questions, jnp.zeros((b, t), jnp.int32))[:, 0]
        thoughts = sample_thoughts(key, thinker_logits_at(fns, sg(th_params), rep), b * g, fns, eps,
                                   cfg.token_epsilon, first_logits=jnp.repeat(first, g, axis=0)).reshape(b, g, t)
    g = thoughts.shape[1]
    flat = lambda x: jnp.repeat(x, g, axis=0)
    r = reward(flat(questions), thoughts.reshape(b * g, t), flat(answers), flat(hand))
    return thoughts, r.reshape(b, g), None


def _prefix_value(fns, cfg, ans_params, questions, answers):
    """The tree search's value of an unfinished prefix: with an eot, the answerer's log p(correct)
    reading the prefix ended there; without one (fixed length) the answerer never reads a partial
    sequence, so unfinished nodes get 0 and only finished sequences are scored."""
    if fns.eot is None or cfg.clean:
        return lambda prefix, length: jnp.zeros(prefix.shape[:1], jnp.float32)

    def value(prefix, length):
        ended = jnp.where(jnp.arange(fns.length)[None] < length[:, None], prefix, fns.eot)
        return answer_log_prob(fns, ans_params, questions, ended, answers)

    return value


def step_loss(trained, questions, answers, hand, thoughts, rewards, targets, fns: ThinkFns, cfg: ThinkConfig):
    """L_th + L_ans for one batch (module docstring); (loss, metrics)."""
    b, g, t = thoughts.shape
    ans_params = trained["answerer"]
    metrics = {}
    loss = 0.0
    if fns.thinker_logits is not None:
        rep = jnp.repeat(questions, g, axis=0)
        flat = thoughts.reshape(b * g, t)
        logits = fns.thinker_logits(trained["thinker"], rep, flat)
        mask = thought_mask(flat, fns.eot)
        logp = jax.vmap(losses.sequence_log_probs)(logits, flat)
        entropy = jax.vmap(losses.sequence_entropy)(logits)
        if targets is None:
            weights = weighting.compute_weights(rewards, cfg.scheme, tau=cfg.tau)
            l_th, pm = losses.policy_loss(logp, jax.lax.stop_gradient(logp), mask, weights.reshape(-1),
                                          cfg.loss_config, entropy=entropy)
            stats = weighting.summarize_weight_stats(weighting.weight_stats(weights, rewards))
            metrics.update({f"weights/{k}": v for k, v in stats.items()})
            metrics["clip_ratio/region_mean"] = pm["clip_frac"]
        else:  # AlphaZero: match the search's improved policy
            ce = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
            l_th = losses.aggregate(ce - cfg.entropy_coef * entropy, mask, "token_mean")
        loss = loss + l_th
        metrics.update(thinker_loss=l_th, thought_entropy=losses.aggregate(entropy, mask, "token_mean"),
                       hand_match=jnp.mean(jnp.all(thoughts == hand[:, None], axis=-1)),
                       thought_length=jnp.mean(jnp.sum(mask, -1).astype(jnp.float32)))
    if cfg.super or fns.thinker_logits is None:
        q, th, a = questions, hand, answers
    else:
        q, th, a = jnp.repeat(questions, g, axis=0), thoughts.reshape(b * g, t), jnp.repeat(answers, g, axis=0)
    ans_logits = fns.answer_logits(ans_params, q, th)
    l_ans = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(ans_logits), a[:, None], axis=-1))
    metrics.update(answerer_loss=l_ans, answer_accuracy=jnp.mean(jnp.argmax(ans_logits, -1) == a),
                   reward=jnp.mean(rewards))
    return loss + l_ans, metrics


def train_step(state: TrainState, batch, key: chex.PRNGKey, *, fns: ThinkFns, cfg: ThinkConfig):
    """One pure step: (state, (questions, answers, hand_thoughts), key) -> (state, metrics)."""
    questions, answers, hand = batch
    thinking = fns.thinker_logits is not None
    th_params = state.params("thinker") if thinking else None
    if thinking:
        thoughts, rewards, targets = _explore(fns, cfg, th_params, state.params("answerer"), questions, answers,
                                              hand, state.step, key)
    else:
        thoughts, rewards, targets = hand[:, None], jnp.zeros((questions.shape[0], 1)), None
    trained = {name: role.params for name, role in state.roles.items()}
    grads, metrics = jax.grad(step_loss, has_aux=True)(trained, questions, answers, hand, thoughts, rewards,
                                                        targets, fns, cfg)
    new_roles = {}
    for name, role in state.roles.items():
        tx = optim.make_optimizer(getattr(cfg, name))
        new_roles[name] = roles.apply_updates(role, grads[name], tx)
        metrics[f"{name}_grad_norm"] = optax.tree.norm(grads[name])
        metrics[f"skipped_updates/{name}"] = optim.skipped_updates(new_roles[name].opt_state).astype(jnp.float32)
    if thinking and cfg.search == "sample":
        metrics["epsilon"] = epsilon_at(cfg, state.step)
    metrics = {f"train/{k}": jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return TrainState(state.step + 1, new_roles, state.extra), metrics


def make_train_chunk(fns: ThinkFns, cfg: ThinkConfig, chunk: int):
    """`chunk` steps of a population as one jitted call:
    (state [P,...], data_keys [P], explore_keys [P]) -> (state, metrics {name: [P, chunk]}).
    Member p's step s draws its batch with fold_in(data_keys[p], s) and explores with
    fold_in(explore_keys[p], s)."""
    step_fn = functools.partial(train_step, fns=fns, cfg=cfg)

    def member(state, data_key, explore_key):
        def body(s, _):
            batch = fns.batch_fn(jax.random.fold_in(data_key, s.step))
            return step_fn(s, batch, jax.random.fold_in(explore_key, s.step))

        return jax.lax.scan(body, state, None, length=chunk)

    return jax.jit(jax.vmap(member), donate_argnums=0)


def mutual_information_bits(thoughts: np.ndarray, answers: np.ndarray) -> float:
    """Plug-in estimate of I(thoughts; answer) in bits from paired samples (rows of `thoughts`).

    I = sum_{x,y} p(x,y) log2 p(x,y) / (p(x) p(y)) with empirical frequencies; it is biased upward
    by about (|X|-1)(|Y|-1) / (2 N ln 2) bits for N samples, so compare runs at the same N.
    """
    _, x = np.unique(np.asarray(thoughts).reshape(len(answers), -1), axis=0, return_inverse=True)
    _, y = np.unique(np.asarray(answers), return_inverse=True)
    x, y = x.reshape(-1), y.reshape(-1)
    joint = np.zeros((x.max() + 1, y.max() + 1))
    np.add.at(joint, (x, y), 1.0)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / (px @ py)[nz])))
