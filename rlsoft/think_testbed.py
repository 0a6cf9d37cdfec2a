"""The thinking-token testbed for `rlsoft.driver.Driver`: a population of P members trained in one program.

Member p is seed `seed + p`: its parameters come from `init_member(seed + p)` and its PRNG streams
from `driver.stream_keys(seed + p, streams)`, exactly as a run of one member with `--seed=seed+p`,
so a population of P equals P separate runs (tested). Training metrics are the population mean;
eval reports the mean and each member (`eval/member<p>/...`).

Eval, on the held-out questions (module `rlsoft.think_loop` for the roles):
  accuracy            the answerer's argmax on the thinker's greedy thoughts (the whole system)
  hand_accuracy       the answerer on the hand-made thoughts (has it learned the language?)
  shuffled_accuracy   the answerer on the thinker's greedy thoughts of another question: near
                      chance when the answer comes from the thoughts, near `accuracy` when the
                      answerer ignores them
  thought_entropy     mean per-token entropy (nats) of the thinker along sampled thoughts
  mutual_information  plug-in I(sampled thoughts; answer) in bits (`think_loop.mutual_information_bits`)
  hand_match          share of greedy thought sequences equal to the hand-made ones
  train_accuracy      `accuracy` on a fixed sample of training questions (given `train_set`):
                      what RL fitted, beside what generalised
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlsoft import losses
from rlsoft import think_loop as tl
from rlsoft.driver import stream_keys


def make_evaluator(fns: tl.ThinkFns):
    """Jitted (population state, questions [E,k], answers [E], hand [E,T], keys [P]) -> {name: [P,...]}."""

    def member(state, questions, answers, hand, key):
        ans = state.roles["answerer"].params
        e = questions.shape[0]
        acc = lambda th: jnp.mean(jnp.argmax(fns.answer_logits(ans, questions, th), -1) == answers)
        if fns.thinker_logits is None:
            return {"accuracy": acc(hand)}
        logits_at = tl.thinker_logits_at(fns, state.roles["thinker"].params, questions)
        greedy = tl.greedy_thoughts(logits_at, e, fns)
        sampled = tl.sample_thoughts(key, logits_at, e, fns, 0.0, 0.0)
        logits = fns.thinker_logits(state.roles["thinker"].params, questions, sampled)
        entropy = losses.aggregate(jax.vmap(losses.sequence_entropy)(logits), tl.thought_mask(sampled, fns.eot),
                                   "token_mean")
        shuffled = jnp.roll(greedy, 1, axis=0)
        return {"accuracy": acc(greedy), "hand_accuracy": acc(hand), "shuffled_accuracy": acc(shuffled),
                "thought_entropy": entropy, "hand_match": jnp.mean(jnp.all(greedy == hand, -1)),
                "sampled": sampled}

    return jax.jit(jax.vmap(member, in_axes=(0, None, None, None, 0)))


class ThinkTestbed:
    """`cfg`: a ThinkConfig with `seed`, `population` and `chunk` fields. `init_member(seed) ->
    (thinker params or None, answerer params)`; `test_set` and `train_set` = (questions, answers,
    hand thoughts), numpy."""

    streams = ("data", "explore", "eval")
    progress_keys = ("train/reward", "train/answer_accuracy", "train/thought_entropy", "eval/accuracy")

    def __init__(self, cfg, fns: tl.ThinkFns, init_member: Callable[[int], tuple[Any, Any]], test_set,
                 total_steps: int, train_set=None):
        if fns.thinker_logits is not None:
            tl.validate(cfg, fns.num_classes, fns.length, fns.eot)
        self.cfg, self.fns, self.init_member, self.total_steps = cfg, fns, init_member, total_steps
        self.test_set = tuple(jnp.asarray(x) for x in test_set)
        self.train_set = None if train_set is None else tuple(jnp.asarray(x) for x in train_set)
        self.seeds = [cfg.seed + p for p in range(cfg.population)]
        member_keys = [stream_keys(s, self.streams) for s in self.seeds]
        self.member_keys = {k: jnp.stack([m[k] for m in member_keys]) for k in self.streams}
        self._chunks: dict[int, Callable] = {}
        self._evaluator = make_evaluator(fns)

    def init_state(self):
        members = []
        for s in self.seeds:
            thinker, answerer = self.init_member(s)
            members.append(tl.init_state(thinker if self.fns.thinker_logits else None, answerer, self.cfg))
        return tl.stack_members(members)

    def steps_per_call(self) -> int:
        return self.cfg.chunk

    def data_position(self, step: int) -> int:
        return step * self.cfg.batch_size

    def _chunk(self, num_steps: int) -> Callable:
        if num_steps not in self._chunks:
            self._chunks[num_steps] = tl.make_train_chunk(self.fns, self.cfg, num_steps)
        return self._chunks[num_steps]

    def lower(self, state, step: int, num_steps: int, keys=None) -> list:
        """The first train call's scan and the evaluator, lowered (the driver compiles them at once)."""
        out = [self._chunk(num_steps).lower(state, self.member_keys["data"], self.member_keys["explore"])]
        for data in (self.test_set, self.train_set):
            if data is not None:
                out.append(self._evaluator.lower(state, *data, self.member_keys["eval"]))
        return out

    def train(self, state, step: int, num_steps: int, keys: Mapping[str, jax.Array]):
        # The driver's `keys` are the streams of `seed`, member 0's own; every member uses its own.
        state, metrics = self._chunk(num_steps)(state, self.member_keys["data"], self.member_keys["explore"])
        return state, {k: jnp.mean(v, axis=0) for k, v in metrics.items()}  # [P, n] -> [n]

    def evaluate_members(self, state) -> dict[str, np.ndarray]:
        """Each member's eval metrics: {name: [P]}."""
        questions, answers, hand = self.test_set
        out = jax.device_get(self._evaluator(state, questions, answers, hand, self.member_keys["eval"]))
        sampled = out.pop("sampled", None)
        if sampled is not None:
            out["mutual_information"] = np.array([tl.mutual_information_bits(s, np.asarray(answers))
                                                  for s in sampled])
        if self.train_set is not None:
            questions, answers, hand = self.train_set
            out["train_accuracy"] = np.asarray(
                self._evaluator(state, questions, answers, hand, self.member_keys["eval"])["accuracy"])
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    def evaluate(self, state, keys=None) -> dict[str, float]:
        per_member = self.evaluate_members(state)
        out = {f"eval/{k}": float(np.mean(v)) for k, v in per_member.items()}
        if len(self.seeds) > 1:
            for k, v in per_member.items():
                out.update({f"eval/member{p}/{k}": float(x) for p, x in enumerate(v)})
        return out
