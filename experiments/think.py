"""Thinking tokens on modular addition: a thinker writes thoughts, an answerer reads them.

    python -m experiments.think --modulus=100 --blind --super --scheme=softmax --tau=0.5

A thinker GPT reads a question (k operands in [0, M)) and writes T thought tokens; an answerer GPT
reads the thoughts ("--blind"), or the question and the thoughts, and predicts the sum mod M. The
thinker's reward is the answerer's log p(correct) computed on the device (or, with --clean, 1 when
its thoughts equal the hand-made ones: the answer's base-V digits). Thoughts are explored by
sampling G per question (with --epsilon / --token_epsilon), by enumerating all of them
(--search=enumerate) or by Gumbel MuZero tree search (--search=mctx). --super trains the answerer
on the hand-made thoughts. --no_think is the baseline answerer reading the question alone.
A population of --population seeds trains in one compiled program (`rlsoft.think_testbed`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp

from envs import modadd
from models import thinking
from rlsoft import think_loop as tl
from rlsoft.config import check, parse_flags
from rlsoft.driver import Driver, RunConfig
from rlsoft.run_dir import RunError, prepare_run
from rlsoft.logger import format_table
from rlsoft.think_testbed import ThinkTestbed

PROG = "python -m experiments.think"


@dataclasses.dataclass(frozen=True)
class ThinkExperimentConfig(tl.ThinkConfig, RunConfig):
    modulus: int = 100
    num_operands: int = 2
    thought_vocab: int = 10
    max_thoughts: int = 2
    fixed_length: bool = True  # False: thoughts may end early with an end-of-thought token
    blind: bool = False  # the answerer reads only the thoughts
    no_think: bool = False  # the baseline: the answerer reads only the question
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    test_fraction: float = 0.2
    split_seed: int = 0
    test_questions: int = 1000  # held-out questions evaluated (all of them if fewer)
    train_questions: int = 256  # a fixed sample of training questions, also evaluated
    steps: int = 1500  # ~4 steps/s on 2 busy cores (benchmarks.think): the default run ends in < 10 min
    chunk: int = 100  # steps per compiled call (one lax.scan)
    population: int = 1  # seeds seed .. seed+P-1 trained together (vmap)
    eval_every: int = 500
    checkpoint_every: int = 500

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"learning_rate": "thinker.learning_rate"}

    def __post_init__(self):
        tl.ThinkConfig.__post_init__(self)
        RunConfig.__post_init__(self)
        check(self.steps >= 1 and self.chunk >= 1, f"steps={self.steps}, chunk={self.chunk} are invalid; need >= 1")
        check(self.population >= 1, f"population={self.population} is invalid; need >= 1")
        check(self.test_questions >= 1, f"test_questions={self.test_questions} is invalid; need >= 1")
        check(self.train_questions >= 1, f"train_questions={self.train_questions} is invalid; need >= 1")
        check(not (self.no_think and self.blind), "no_think and blind are exclusive: a blind answerer needs thoughts")
        task = self.task_config()
        self.model_config()
        if not self.no_think:
            tl.validate(self, task.thought_classes, self.max_thoughts, None if self.fixed_length else task.eot)

    def task_config(self) -> modadd.ModAddConfig:
        return modadd.ModAddConfig(modulus=self.modulus, num_operands=self.num_operands,
                                   thought_vocab=self.thought_vocab, max_thoughts=self.max_thoughts,
                                   fixed_length=self.fixed_length, test_fraction=self.test_fraction,
                                   split_seed=self.split_seed)

    def model_config(self) -> thinking.ThinkingModelConfig:
        reads = "question" if self.no_think else "blind" if self.blind else "normal"
        return thinking.ThinkingModelConfig(modulus=self.modulus, num_operands=self.num_operands,
                                            thought_vocab=self.thought_vocab, max_thoughts=self.max_thoughts,
                                            d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head,
                                            answerer_reads=reads)


PRESETS = {
    # About a minute on a CPU: blind + super + clean on M = 10 rises well above chance on the
    # training questions (tests check it). With 80 training tuples, held-out accuracy stays near
    # chance: the thinker memorises the table rather than learning addition.
    "smoke": dict(modulus=10, max_thoughts=1, blind=True, super=True, clean=True, batch_size=32, group_size=16,
                  tau=0.25, thinker=dict(learning_rate=1e-2), answerer=dict(learning_rate=3e-3), steps=400,
                  chunk=100, eval_every=200, checkpoint_every=0, progress=False),
}


def build(cfg: ThinkExperimentConfig):
    """(fns, init_member, test_set, train_set) of the task and the two models (nothing compiled yet)."""
    task = modadd.ModAdd(cfg.task_config())
    mcfg = cfg.model_config()
    tcfg = cfg.task_config()
    graphdefs = [g for g, _ in thinking.init_models(mcfg, 0)]  # shapes only; members init their own
    full_th = thinking.thinker_logits_fn(graphdefs[0], mcfg)
    classes = tcfg.thought_classes  # V (fixed length) or V + 1 (with the end-of-thought class)
    thinker_logits = None if cfg.no_think else (lambda p, q, th: full_th(p, q, th)[..., :classes])
    answer_logits = thinking.answer_logits_fn(graphdefs[1], mcfg)

    def batch_fn(key):
        questions = task.train_batch(key, cfg.batch_size)
        answers = task.answers(questions)
        return questions, answers, task.hand_thoughts(answers)

    fns = tl.ThinkFns(thinker_logits, answer_logits, batch_fn, length=cfg.max_thoughts, num_classes=classes,
                      eot=None if cfg.fixed_length else tcfg.eot, blind=cfg.blind)

    def init_member(seed: int):
        (_, th), (_, ans) = thinking.init_models(mcfg, seed)
        return th, ans

    def labelled(questions):
        answers = task.answers(jnp.asarray(questions))
        return tuple(jax.device_get(x) for x in (jnp.asarray(questions), answers, task.hand_thoughts(answers)))

    test_set = labelled(task.test_questions(cfg.test_questions))
    train_set = labelled(task.train_batch(jax.random.PRNGKey(cfg.split_seed), cfg.train_questions))
    return fns, init_member, test_set, train_set


def make_driver(cfg: ThinkExperimentConfig) -> Driver:
    run_dir = prepare_run(cfg, "think")
    fns, init_member, test_set, train_set = build(cfg)
    testbed = ThinkTestbed(cfg, fns, init_member, test_set, total_steps=cfg.steps, train_set=train_set)
    return Driver(testbed, cfg, run_dir)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(ThinkExperimentConfig, argv, presets=PRESETS, prog=PROG)
    try:
        driver = make_driver(cfg)
    except (RunError, ValueError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    result = driver.run()
    if driver.stopped is not None:
        driver.close()
        print(f"stopped at step {driver.step}; resume with --resume", file=sys.stderr)
        raise SystemExit(128 + driver.stopped)
    per_member = driver.testbed.evaluate_members(driver.state)
    rows = [dict(seed=cfg.seed + p, **{k: float(v[p]) for k, v in per_member.items()})
            for p in range(cfg.population)]
    print(format_table(rows))
    driver.close()
    return dict(final=per_member, history=result.history, state=driver.state, run_dir=driver.run_dir.path)


if __name__ == "__main__":
    main()
