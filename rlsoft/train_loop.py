"""The one training loop of every language-model experiment: rollout -> reward -> weights -> update.

Step t < sft_steps is a supervised warm-start step on ground-truth responses; later steps are RL:
  1. questions: `questions_per_step` indices from an epoch-wise permutation of the training set
     (a pure function of the data key and t, so the data position is the step);
  2. rollout: G samples per question with the jitted sampler (`rlsoft.rollout`), key
     fold_in(rollout_key, t);
  3. reward: the task scores the decoded responses on the host (verifiers are Python);
     `inject_gt` appends the ground-truth response to each group as an extra sample;
  4. update: `rlsoft.trainer.update` (weights by scheme, token-level loss, AdamW).
Every `checkpoint_every` steps the state, keys and data position are saved (atomic, orbax); with
`resume` the loop continues from the newest valid checkpoint and reproduces an uninterrupted run.

The loop knows no model and no task: it takes a `PolicyModel` and a `Task` (below).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlsoft import rollout, trainer
from rlsoft.config import check
from rlsoft.schedules import TAU_SCHEDULES, make_tau_schedule
from rlsoft.sharding import make_mesh, replicate, shard_batch

STREAMS = ("data", "rollout", "eval")


class PolicyModel(NamedTuple):
    decode: rollout.DecodeFns
    forward: trainer.ForwardFn  # (params, tokens, positions, mask) -> logits
    # Optional: logits of the response tokens with each question's prompt run once (trainer docstring).
    response_logits: Optional[trainer.ResponseLogitsFn] = None


class Task(Protocol):
    """What the loop needs from a task (implemented in experiments/, from envs/)."""

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
class TrainConfig(trainer.UpdateConfig):
    steps: int = 20  # RL steps, after the sft_steps warm-start steps
    questions_per_step: int = 8
    group_size: int = 8
    inject_gt: bool = False
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    tau_end: Optional[float] = None
    tau_schedule: str = "constant"
    eval_every: int = 10
    eval_questions: int = 64
    eval_batch: int = 64
    log_every: int = 1
    samples_to_log: int = 2
    checkpoint_every: int = 10
    seed: int = 0
    logdir: str = ""
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name in ("steps", "eval_every", "log_every", "checkpoint_every", "eval_questions"):
            check(getattr(self, name) >= 0, f"{name}={getattr(self, name)} is invalid; need >= 0")
        check(self.questions_per_step >= 1, f"questions_per_step={self.questions_per_step} is invalid; need >= 1")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.questions_per_step % self.micro_batches == 0,
              f"micro_batches={self.micro_batches} is invalid; it must divide questions_per_step="
              f"{self.questions_per_step}")
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} is invalid; need >= 1")
        check(self.eval_batch >= 1, f"eval_batch={self.eval_batch} is invalid; need >= 1")
        check(self.tau_schedule in TAU_SCHEDULES,
              f"tau_schedule={self.tau_schedule!r} is unknown; allowed: {', '.join(TAU_SCHEDULES)}")
        if self.tau_schedule != "constant" or self.tau_end is not None:
            check(not isinstance(self.tau, str), "tau_end is invalid with tau='auto'")
            make_tau_schedule("linear" if self.tau_schedule == "constant" else self.tau_schedule,
                              float(self.tau), self.tau_end if self.tau_end is not None else float(self.tau),
                              max(self.steps, 1))
        rollout.SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                               top_k=self.top_k, top_p=self.top_p)

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


def _rows(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    return [list(t[m]) for t, m in zip(tokens, mask)]


class Loop:
    """Holds the compiled functions, the state and the host-side bookkeeping of one run."""

    def __init__(self, cfg: TrainConfig, model: PolicyModel, params: Any, task: Task, logger=None):
        self.cfg, self.model, self.task, self.logger = cfg, model, task, logger
        self.mesh = make_mesh()
        root = jax.random.PRNGKey(cfg.seed)
        self.keys = dict(zip(STREAMS, jax.random.split(root, len(STREAMS))))
        self.update, self.sft_update = trainer.make_update(model.forward, cfg, model.response_logits)
        sampling = rollout.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                          top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=task.stop_ids,
                                          pad_id=task.pad_id)
        self.sample = rollout.make_sampler(model.decode, sampling, cfg.group_size)
        self.greedy = rollout.make_sampler(model.decode, dataclasses.replace(sampling, temperature=0.0), 1)
        self.state = trainer.init_state(replicate(params, self.mesh), cfg)
        self.checkpointer = None
        if cfg.logdir:
            from rlsoft.checkpoint import Checkpointer

            self.checkpointer = Checkpointer(f"{cfg.logdir}/checkpoints")
        self.step = 0
        if cfg.resume and self.checkpointer is not None:
            self._restore()

    # ---- device placement ---------------------------------------------------------------
    def _shard(self, tree):
        rows = jax.tree.leaves(tree)[0].shape[0]
        return shard_batch(tree, self.mesh) if rows % self.mesh.size == 0 else tree

    def _shard_rows(self, batch: trainer.Batch) -> trainer.Batch:
        """Split every batch field with a leading row axis across the devices (params are replicated)."""
        n = self.mesh.size
        return batch._replace(**{k: shard_batch(v, self.mesh) if np.ndim(v) and v.shape[0] % n == 0 and n > 1
                                 else v for k, v in batch._asdict().items()})

    def _prompts(self, indices, split):
        toks, mask = rollout.left_pad(self.task.prompt_tokens(indices, split), self.task.pad_id,
                                      self.task.max_prompt_length)
        return np.asarray(toks, np.int32), np.asarray(mask, bool)

    # ---- checkpoints --------------------------------------------------------------------
    def _save(self):
        if self.checkpointer is None:
            return
        tree = {"state": self.state, "keys": self.keys}
        self.checkpointer.save(self.step, tree, {"step": self.step,
                                                 "data_position": self.step * self.cfg.questions_per_step})

    def _restore(self):
        target = {"state": self.state, "keys": self.keys}
        restored = self.checkpointer.restore(target=target)
        if restored is None:
            return
        tree, meta = restored
        self.state, self.keys, self.step = tree["state"], tree["keys"], int(meta["step"])
        print(f"resumed from step {self.step}", file=sys.stderr)

    # ---- steps --------------------------------------------------------------------------
    def sft_step(self, t: int) -> dict:
        # A warm-start step trains on as many sequences as an RL update: questions x G.
        per_step = self.cfg.questions_per_step * self.cfg.group_size
        idx = question_indices(self.keys["data"], t, per_step, self.task.num_train)
        prompts, pmask = self._prompts(idx, "train")
        resp, rmask = _pad_responses(self.task.reference_tokens(idx, "train"), self.cfg.max_new_tokens,
                                     self.task.pad_id)
        self.state, metrics = self.sft_update(self.state, *self._shard((prompts, pmask, resp, rmask)))
        return jax.device_get(metrics)

    def rl_step(self, t: int) -> tuple[dict, list[str]]:
        cfg, task = self.cfg, self.task
        idx = question_indices(self.keys["data"], t, cfg.questions_per_step, task.num_train)
        prompts, pmask = self._prompts(idx, "train")
        start = time.perf_counter()
        out = self.sample(self.state.params, *self._shard((prompts, pmask)),
                          jax.random.fold_in(self.keys["rollout"], t))
        resp, rmask = np.asarray(out.tokens), np.asarray(out.mask)
        sample_s = time.perf_counter() - start
        g = cfg.group_size
        q_idx = np.repeat(idx, g)
        sampled = _rows(resp, rmask)
        scores = task.score(q_idx, "train", sampled)
        gt, gt_mask = _pad_responses(task.reference_tokens(idx, "train"), cfg.max_new_tokens, task.pad_id)
        if cfg.inject_gt:
            gt_scores = task.score(idx, "train", _rows(gt, gt_mask))
            gp = g + 1
            resp = np.concatenate([resp.reshape(-1, g, resp.shape[1]), gt[:, None]], 1).reshape(-1, resp.shape[1])
            rmask = np.concatenate([rmask.reshape(-1, g, rmask.shape[1]), gt_mask[:, None]], 1).reshape(
                -1, rmask.shape[1])
            rewards = np.concatenate([scores["reward"].reshape(-1, g), gt_scores["reward"][:, None]], 1)
        else:
            gp, rewards = g, scores["reward"].reshape(-1, g)
        batch = trainer.Batch(
            prompts=np.repeat(prompts, gp, 0), prompt_mask=np.repeat(pmask, gp, 0),
            responses=resp, response_mask=rmask, rewards=rewards.astype(np.float32),
            tau=np.float32(cfg.tau_at(t - cfg.sft_steps)),
            sl_responses=gt, sl_prompts=prompts, sl_prompt_mask=pmask,
            sl_mask=gt_mask if cfg.sl_weight > 0 else np.zeros_like(gt_mask))
        self.state, metrics = self.update(self.state, self._shard_rows(batch))
        metrics = jax.device_get(metrics)
        lengths = np.asarray(out.lengths)  # the sampled responses only, not injected ground truth
        metrics.update({f"train/{k}": float(np.mean(v)) for k, v in scores.items()})
        metrics["train/reward_std"] = float(np.mean(rewards.std(axis=1)))
        metrics["response_length"] = float(np.mean(lengths))
        metrics["tokens_per_s"] = float(np.sum(out.lengths)) / max(sample_s, 1e-9)
        texts = [task.decode(row) for row in sampled[: cfg.samples_to_log]]
        return metrics, texts

    def evaluate(self) -> dict:
        """Greedy decoding of the first `eval_questions` held-out questions; mean of every score."""
        n = min(self.cfg.eval_questions, self.task.num_eval)
        totals: dict[str, list] = {}
        for lo in range(0, n, self.cfg.eval_batch):
            idx = np.arange(lo, min(lo + self.cfg.eval_batch, n))
            prompts, pmask = self._prompts(idx, "eval")
            pad = self.cfg.eval_batch - len(idx)  # one compiled shape for every eval batch
            if pad:
                prompts, pmask = np.concatenate([prompts, prompts[:1].repeat(pad, 0)]), np.concatenate(
                    [pmask, pmask[:1].repeat(pad, 0)])
            out = self.greedy(self.state.params, prompts, pmask, self.keys["eval"])
            rows = _rows(np.asarray(out.tokens), np.asarray(out.mask))[: len(idx)]
            for k, v in self.task.score(idx, "eval", rows).items():
                totals.setdefault(k, []).extend(np.asarray(v).tolist())
        return {f"eval/{k}": float(np.mean(v)) for k, v in totals.items()}

    def run(self, until: Optional[int] = None) -> list[dict]:
        """Train until step `until` (default: sft_steps + steps); returns each step's metrics."""
        cfg = self.cfg
        total = cfg.sft_steps + cfg.steps
        end = total if until is None else min(until, total)
        history = []
        bar = _progress(end, self.step, cfg.progress)
        while self.step < end:
            t = self.step
            if t == cfg.sft_steps and cfg.kl_coef > 0:  # the reference is the model RL starts from
                self.state = self.state._replace(ref_params=jax.tree.map(jnp.copy, self.state.params))
            texts = []
            if t < cfg.sft_steps:
                metrics = self.sft_step(t)
            else:
                metrics, texts = self.rl_step(t)
            self.step = t + 1
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == total):
                metrics.update(self.evaluate())
            metrics = {k: float(np.asarray(v)) for k, v in metrics.items()}
            metrics["step"] = t
            history.append(metrics)
            self._log(t, metrics, texts)
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == total):
                self._save()
            bar(metrics)
        return history

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

    def _log(self, t: int, metrics: dict, texts: list[str]) -> None:
        if self.logger is None or (self.cfg.log_every and t % self.cfg.log_every):
            return
        self.logger.scalars(t, metrics)
        for i, text in enumerate(texts):
            self.logger.text(t, f"sample_{i}", text)


def _progress(total: int, start: int, enabled: bool):
    """A tqdm bar on stderr showing reward and eval success; a no-op when disabled."""
    if not enabled:
        return lambda metrics: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, file=sys.stderr, dynamic_ncols=True)

    def update(metrics):
        shown = {k: v for k, v in metrics.items() if k in ("train/reward", "eval/success", "sl_loss", "loss")}
        bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in shown.items() if math.isfinite(v)})
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return update
