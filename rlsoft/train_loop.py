"""The language-model testbed: rollout -> host reward -> weights -> update, one step per call.

Step t < sft_steps is a supervised warm-start step on ground-truth responses; later steps are RL:
  1. questions: `questions_per_step` indices from an epoch-wise permutation of the training set
     (a pure function of the data key and t, so the data position is the step);
  2. rollout: G samples per question with the jitted sampler (`rlsoft.rollout`), key
     fold_in(rollout_key, t);
  3. reward: host rewards, the task's Python verifiers on the decoded responses; `inject_gt`
     appends the ground-truth response to each group as an extra sample;
  4. update: `rlsoft.trainer.update` (weights by scheme, token-level loss, the policy's optax chain).
The step counter, eval cadence, logs, checkpoints and resume belong to `rlsoft.driver`, which runs
this testbed like every other. It knows no model and no task: it takes a `PolicyModel` and a
`TextTask` (below).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional, Protocol, Sequence

import jax
import numpy as np

from rlsoft import distributed, eval_stats, roles, rollout, trainer, weighting
from rlsoft import mesh as mesh_lib
from rlsoft.config import check
from rlsoft.driver import RunConfig
from rlsoft.schedules import TAU_SCHEDULES, make_tau_schedule

# The training forward's per-block rematerialisation (models/qwen2_train.py REMAT has the policies):
# none (keep every activation), full (recompute each block in the backward), dots (keep matmul outputs).
REMAT_POLICIES = ("none", "full", "dots")
# --precision -> the model's compute dtype (a name of models/dtypes.py). The parameters (master
# weights), their gradients and the optimizer state stay float32 either way: with bf16 the forward and
# backward run on a bf16 copy of each weight, cast where it is used.
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


class PolicyModel(NamedTuple):
    decode: rollout.DecodeFns
    forward: trainer.ForwardFn  # (params, tokens, positions, mask) -> logits
    # Optional: logits of the response tokens with each question's prompt run once (trainer docstring).
    response_logits: Optional[trainer.ResponseLogitsFn] = None
    # Optional: param path -> logical axis per dim (e.g. models.qwen2_sharding.logical_axes) and the
    # units of flat logical dims (heads); rlsoft.mesh's rules shard by them. None: params replicated.
    param_axes: Optional[Callable[[tuple], tuple]] = None
    axis_units: Optional[Mapping[str, int]] = None


class TextTask(Protocol):
    """A task with host rewards: prompts and references as token ids, a Python verifier as reward."""

    num_train: int
    num_eval: int
    max_prompt_length: int
    pad_id: int
    stop_ids: tuple[int, ...]

    def prompt_tokens(self, indices: Sequence[int], split: str) -> list[list[int]]: ...

    def reference_tokens(self, indices: Sequence[int], split: str) -> list[list[int]]: ...

    def score(self, indices: Sequence[int], split: str, responses: list[list[int]]) -> dict[str, np.ndarray]:
        """At least "reward" and "success" (float arrays, one entry per response)."""

    def decode(self, tokens: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TrainConfig(trainer.UpdateConfig, RunConfig):
    steps: int = 20  # RL steps, after the sft_steps warm-start steps
    questions_per_step: int = 8
    group_size: int = 8
    inject_gt: bool = False
    sampling: rollout.SamplingConfig = rollout.SamplingConfig(max_new_tokens=32)
    tau_end: Optional[float] = None
    tau_schedule: str = "constant"
    eval_questions: int = 64
    eval_batch: int = 64
    eval_k: int = 4  # samples per eval question at temperature 1 (mean@k); 0: greedy only
    samples_to_log: int = 2
    mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig()  # --mesh.data / --mesh.fsdp / --mesh.tensor
    # --distributed.coordinator / num_processes / process_id: one run over several processes (hosts)
    distributed: distributed.DistributedConfig = distributed.DistributedConfig()
    remat: str = "none"  # REMAT_POLICIES; the model builds its forward with it (the core passes no policy)
    precision: str = "fp32"  # PRECISIONS; the model is built with that compute dtype, float32 parameters

    FLAG_ALIASES: ClassVar[dict[str, str]] = {
        **trainer.UpdateConfig.FLAG_ALIASES,
        **{k: f"sampling.{k}" for k in ("max_new_tokens", "temperature", "top_k", "top_p")},
    }

    def __post_init__(self):
        trainer.UpdateConfig.__post_init__(self)
        RunConfig.__post_init__(self)
        for name in ("steps", "eval_questions", "eval_k", "samples_to_log"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} is invalid; need >= 0")
        check(self.questions_per_step >= 1, f"questions_per_step={self.questions_per_step} is invalid; need >= 1")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.questions_per_step % self.micro_batches == 0,
              f"micro_batches={self.micro_batches} is invalid; it must divide questions_per_step="
              f"{self.questions_per_step}")
        check(self.eval_batch >= 1, f"eval_batch={self.eval_batch} is invalid; need >= 1")
        check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is invalid; allowed: {', '.join(REMAT_POLICIES)}")
        check(self.precision in PRECISIONS,
              f"precision={self.precision!r} is invalid; allowed: {', '.join(PRECISIONS)}")
        check(self.tau_schedule in TAU_SCHEDULES,
              f"tau_schedule={self.tau_schedule!r} is unknown; allowed: {', '.join(TAU_SCHEDULES)}")
        if self.tau_schedule != "constant" or self.tau_end is not None:
            check(not isinstance(self.tau, str), "tau_end is invalid with tau='auto'")
            if self.tau_end is not None and self.scheme in weighting.TAU_IS_FRACTION:
                weighting.validate_tau(self.tau_end, self.scheme)  # the schedule ends there: a fraction too
            make_tau_schedule("linear" if self.tau_schedule == "constant" else self.tau_schedule,
                              float(self.tau), self.tau_end if self.tau_end is not None else float(self.tau),
                              max(self.steps, 1))

    def tau_at(self, rl_step: int) -> float:
        if isinstance(self.tau, str):
            return 1.0  # unused: "auto" is resolved per group inside the update
        if self.tau_end is None and self.tau_schedule == "constant":
            return float(self.tau)
        kind = "linear" if self.tau_schedule == "constant" else self.tau_schedule
        return float(make_tau_schedule(kind, float(self.tau), self.tau_end, max(self.steps, 1))(rl_step))


def question_indices(data_key, step: int, per_step: int, num_train: int) -> np.ndarray:
    """Questions of `step`: positions step*per_step ... in epoch-wise permutations of the train set."""
    pos = step * per_step + np.arange(per_step)
    epochs, offsets = pos // num_train, pos % num_train
    out = np.empty(per_step, np.int64)
    for e in np.unique(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, int(e)), num_train))
        out[epochs == e] = perm[offsets[epochs == e]]
    return out


def _pad_responses(seqs: Sequence[Sequence[int]], n: int, pad_id: int):
    tokens = np.full((len(seqs), n), pad_id, np.int32)
    mask = np.zeros((len(seqs), n), bool)
    for i, s in enumerate(seqs):
        s = list(s)[:n]
        tokens[i, :len(s)], mask[i, :len(s)] = s, True
    return tokens, mask


def _append_to_groups(rows: np.ndarray, extra: np.ndarray, g: int) -> np.ndarray:
    """[Q*G, n] rows and one [Q, n] row per question -> [Q*(G+1), n], each question's row last."""
    return np.concatenate([rows.reshape(-1, g, rows.shape[1]), extra[:, None]], 1).reshape(-1, rows.shape[1])


def _rows(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [list(t[m]) for t, m in zip(tokens, mask)]


class LanguageTestbed:
    """A `rlsoft.driver.Testbed`: the compiled update and samplers of one run, and its host steps."""

    streams = ("data", "rollout", "eval")
    progress_keys = ("train/reward", "eval/success", "sft/loss", "train/loss")

    def __init__(self, cfg: TrainConfig, model: PolicyModel, params: Any, task: TextTask):
        self.cfg, self.model, self.task = cfg, model, task
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.total_steps = cfg.sft_steps + cfg.steps
        # Params, optimizer state (like its params) and reference placed by the model's logical axes;
        # the update keeps them so (in/out shardings) and takes the batch's rows over data x fsdp.
        self.shard_params = lambda tree: mesh_lib.param_shardings(tree, self.mesh, model.param_axes,
                                                                  model.axis_units)
        abstract = jax.eval_shape(lambda p: trainer.init_state(p, cfg), params)
        self.state_sharding = mesh_lib.train_state_shardings(
            abstract, self.shard_params, {"policy": trainer.make_optimizer(cfg)}, self.mesh)
        self.update, self.sft_update = trainer.make_update(model.forward, cfg, model.response_logits,
                                                           self.state_sharding)
        sampling = dataclasses.replace(cfg.sampling, stop_ids=task.stop_ids, pad_id=task.pad_id)
        # The samplers take the policy params as the update leaves them (sharded, on device); their
        # rows and decode cache split over the same mesh.
        policy_sh = self.state_sharding.roles["policy"].params
        self.sample = rollout.make_sampler(model.decode, sampling, cfg.group_size, params_sharding=policy_sh)
        # One eval call: per question a greedy row, then eval_k rows sampled at temperature 1.
        k = cfg.eval_k
        plain = dataclasses.replace(sampling, temperature=1.0 if k else 0.0, top_k=0, top_p=1.0)
        self.eval_sample = rollout.make_sampler(model.decode, plain, 1 + k, greedy_rows=1 if k else 0,
                                                params_sharding=policy_sh)
        self.last_eval: Optional[dict[str, np.ndarray]] = None  # the latest eval's per-question outcomes
        self.initial_params = jax.device_put(params, self.shard_params(params))

    def init_state(self) -> roles.TrainState:
        # The whole state on the mesh, scalars (step, optimizer counts) included, as the update's
        # in/out shardings say (an input placed differently would not match them).
        return jax.device_put(trainer.init_state(self.initial_params, self.cfg), self.state_sharding)

    def steps_per_call(self) -> int:
        return 1

    def data_position(self, step: int) -> int:
        """Examples consumed: questions x G per warm-start step, questions per RL step."""
        sft = min(step, self.cfg.sft_steps)
        return sft * self.cfg.questions_per_step * self.cfg.group_size + (step - sft) * self.cfg.questions_per_step

    def train(self, state, step: int, num_steps: int, keys: Mapping[str, jax.Array]):
        assert num_steps == 1, "the language-model testbed takes one step per call"
        if step == self.cfg.sft_steps and "reference" in state.roles:
            # The KL reference is the model RL starts from (after the warm start).
            reference = jax.device_put(roles.frozen(state.params("policy")), self.state_sharding.roles["reference"])
            state = state.replace_role("reference", reference)
        if step < self.cfg.sft_steps:
            return self._sft_step(state, step, keys)
        return self._rl_step(state, step, keys)

    def lower(self, state, step: int, num_steps: int, keys: Mapping[str, jax.Array]) -> list:
        """The warm-start update (if steps before `sft_steps` remain), the RL sampler and update (if
        RL steps remain) and the eval sampler, lowered on the arguments of their first calls: the
        data of step `step` (or the first RL step), the sampler's output shapes for the batch."""
        cfg, out = self.cfg, []
        params = state.params("policy")
        if step < cfg.sft_steps:
            out.append(self.sft_update.lower(state, *self._sft_args(step, keys)))
        t = max(step, cfg.sft_steps)
        if t < self.total_steps:
            _, prompts, pmask, gt, gt_mask = self._rl_inputs(t, keys)
            sampler = self.sample.lower(params, *self._shard((prompts, pmask)), jax.random.fold_in(keys["rollout"], t))
            sampled = sampler.out_info
            rows, n = sampled.tokens.shape
            resp, rmask = np.zeros((rows, n), sampled.tokens.dtype), np.zeros((rows, n), sampled.mask.dtype)
            rewards = np.zeros((len(prompts), cfg.group_size), np.float32)
            if cfg.inject_gt:
                g = cfg.group_size
                resp, rmask = _append_to_groups(resp, gt, g), _append_to_groups(rmask, gt_mask, g)
                rewards = np.zeros((len(prompts), g + 1), np.float32)
            out += [sampler, self.update.lower(state, self._rl_batch(t, prompts, pmask, resp, rmask, rewards, gt, gt_mask))]
        if min(cfg.eval_questions, self.task.num_eval):
            idx = np.arange(min(cfg.eval_batch, cfg.eval_questions, self.task.num_eval))
            out.append(self.eval_sample.lower(params, *self._eval_prompts(idx), jax.random.fold_in(keys["eval"], 0)))
        return out

    # ---- device placement ---------------------------------------------------------------
    def _shard(self, tree):
        """Rows over data x fsdp where they divide (rlsoft.mesh.shard_rows), scalars replicated."""
        return mesh_lib.shard_rows(tree, self.mesh)

    def _shard_rows(self, batch: trainer.Batch) -> trainer.Batch:
        return mesh_lib.shard_rows(batch, self.mesh)

    def _prompts(self, indices, split):
        toks, mask = rollout.left_pad(self.task.prompt_tokens(indices, split), self.task.pad_id,
                                      self.task.max_prompt_length)
        return np.asarray(toks, np.int32), np.asarray(mask, bool)

    # ---- steps --------------------------------------------------------------------------
    def _sft_args(self, t: int, keys):
        # A warm-start step trains on as many sequences as an RL update: questions x G.
        per_step = self.cfg.questions_per_step * self.cfg.group_size
        idx = question_indices(keys["data"], t, per_step, self.task.num_train)
        prompts, pmask = self._prompts(idx, "train")
        resp, rmask = _pad_responses(self.task.reference_tokens(idx, "train"), self.cfg.sampling.max_new_tokens,
                                     self.task.pad_id)
        return self._shard((prompts, pmask, resp, rmask))

    def _sft_step(self, state, t: int, keys):
        return self.sft_update(state, *self._sft_args(t, keys))

    def _rl_inputs(self, t: int, keys):
        """Step t's questions, their prompts and their ground-truth responses (padded)."""
        idx = question_indices(keys["data"], t, self.cfg.questions_per_step, self.task.num_train)
        prompts, pmask = self._prompts(idx, "train")
        gt, gt_mask = _pad_responses(self.task.reference_tokens(idx, "train"), self.cfg.sampling.max_new_tokens,
                                     self.task.pad_id)
        return idx, prompts, pmask, gt, gt_mask

    def _rl_batch(self, t: int, prompts, pmask, resp, rmask, rewards, gt, gt_mask) -> trainer.Batch:
        """The update's batch: rows of `rewards.shape[1]` responses per question (G, or G + 1 with
        the ground truth injected), placed on the mesh."""
        gp = rewards.shape[1]
        return self._shard_rows(trainer.Batch(
            prompts=np.repeat(prompts, gp, 0), prompt_mask=np.repeat(pmask, gp, 0),
            responses=resp, response_mask=rmask, rewards=rewards.astype(np.float32),
            tau=np.float32(self.cfg.tau_at(t - self.cfg.sft_steps)),
            sl_responses=gt, sl_prompts=prompts, sl_prompt_mask=pmask,
            sl_mask=gt_mask if self.cfg.sl_weight > 0 else np.zeros_like(gt_mask)))

    def _rl_step(self, state, t: int, keys):
        cfg, task = self.cfg, self.task
        idx, prompts, pmask, gt, gt_mask = self._rl_inputs(t, keys)
        start = time.perf_counter()
        out = self.sample(state.params("policy"), *self._shard((prompts, pmask)), jax.random.fold_in(keys["rollout"], t))
        # Every process gets all rows (gathered across processes), so host rewards agree everywhere.
        resp, rmask, lengths = distributed.to_host((out.tokens, out.mask, out.lengths))
        sample_s = time.perf_counter() - start
        g = cfg.group_size
        sampled = _rows(resp, rmask)
        scores = task.score(np.repeat(idx, g), "train", sampled)
        rewards = scores["reward"].reshape(-1, g)
        if cfg.inject_gt:
            gt_scores = task.score(idx, "train", _rows(gt, gt_mask))
            resp, rmask = _append_to_groups(resp, gt, g), _append_to_groups(rmask, gt_mask, g)
            rewards = np.concatenate([rewards, gt_scores["reward"][:, None]], 1)
        state, metrics = self.update(state, self._rl_batch(t, prompts, pmask, resp, rmask, rewards, gt, gt_mask))
        metrics = dict(distributed.to_host(metrics))  # lengths: the sampled responses, not injected ground truth
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in scores.items()})
        metrics["train/reward_std"] = float(np.mean(rewards.std(axis=1)))
        metrics["train/completions/mean_length"] = float(np.mean(lengths))
        metrics["train/tokens_per_s"] = float(np.sum(lengths)) / max(sample_s, 1e-9)
        for i, row in enumerate(sampled[: cfg.samples_to_log]):
            metrics[f"text/sample_{i}"] = task.decode(row)
        return state, metrics

    def _eval_prompts(self, idx: np.ndarray):
        """Held-out questions `idx`'s prompts, padded to `eval_batch` rows (one compiled shape for
        every eval batch), placed on the mesh."""
        prompts, pmask = self._prompts(idx, "eval")
        pad = self.cfg.eval_batch - len(idx)
        if pad:
            prompts, pmask = np.concatenate([prompts, prompts[:1].repeat(pad, 0)]), np.concatenate(
                [pmask, pmask[:1].repeat(pad, 0)])
        return self._shard((prompts, pmask))

    def eval_outcomes(self, state, keys) -> dict[str, np.ndarray]:
        """Per held-out question (the first `eval_questions`, in order): the greedy response's scores
        ("success", "reward", ...) and, with eval_k > 0, "mean_at_k": the mean success of eval_k
        responses sampled at temperature 1. Eval batch b samples with fold_in(eval key, b); the
        same key at every eval, so evals of one run compare on the same draws."""
        n, g = min(self.cfg.eval_questions, self.task.num_eval), 1 + self.cfg.eval_k
        parts: dict[str, list] = {}
        for lo in range(0, n, self.cfg.eval_batch):
            idx = np.arange(lo, min(lo + self.cfg.eval_batch, n))
            out = self.eval_sample(state.params("policy"), *self._eval_prompts(idx),
                                   jax.random.fold_in(keys["eval"], lo))
            rows = _rows(*distributed.to_host((out.tokens, out.mask)))[: len(idx) * g]
            for k, v in self.task.score(np.repeat(idx, g), "eval", rows).items():
                v = np.asarray(v, np.float64).reshape(len(idx), g)
                parts.setdefault(k, []).append(v[:, 0])
                if k == "success" and g > 1:
                    parts.setdefault("mean_at_k", []).append(v[:, 1:].mean(1))
        self.last_eval = {k: np.concatenate(v) for k, v in parts.items()}
        return self.last_eval

    def evaluate(self, state, keys) -> dict:
        """The means of `eval_outcomes`, with the standard errors of success and mean_at_k
        (rlsoft.eval_stats); nothing when eval_questions is 0."""
        outcomes = self.eval_outcomes(state, keys)
        return eval_stats.summarize(outcomes) if outcomes else {}
