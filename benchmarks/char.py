"""Char testbed throughput: the experiment's compiled step against one forward pass per candidate.

    python -m benchmarks.char                     # experiments.char's defaults: cpu preset, 64 contexts x 32 chars
    python -m benchmarks.char --chunk=10 --rounds=2 --candidates_per_pass=13   # quicker

  exhaustive      the step experiments.char runs: rlsoft.exhaustive_loop.make_train_chunk over
                  experiments.char.build(cfg), `chunk` steps as one jitted lax.scan (a batch of
                  windows, the reward of all V = 65 next characters on the device, weights over the
                  65, the clipped exhaustive objective against the lagged policy from ONE forward
                  pass per context, Adam, the health monitors). Timed per call, reported per step
                  (call time / chunk).
  per_candidate_kK  benchmarks.per_candidate: the same batch, rewards, weights and optimizer, with the
                  policy gradient taken seed 002's way, 65 passes per context, each on [context, c]
                  scored at the position that predicts c; a lax.scan over 65 / K steps of K candidates x
                  B contexts (each K of `candidates_per_pass` is timed; the fastest is the baseline of
                  the ratios). One step per call (its scan already spans 65 passes).
  population_P    (--population=P > 1) the same chunk over a population of P seeds vmapped in one
                  program (what `--population=P` of experiments.char runs), reported per member-step,
                  so its contexts/s compare with `exhaustive`'s (P separate runs) directly;
                  `population_vs_separate` is the per-round ratio (> 1: the population pays).
The baseline's model is the same preset with block_size = context + 1, so that [context, c] fits.
Before timing, on its params and the first batch, its gradient is compared with the gradient of
the testbed's loss (rlsoft.exhaustive_loop.step_loss; at the first step the lagged policy is the
current one, so the clipped objective has the exhaustive gradient): grad_rel_diff.
Implementations are timed interleaved (benchmarks.timing), one call of each per round; figures are
medians per step, and `speedup_vs_baseline` is the median over rounds of the per-round ratio.
Prints one JSON line of figures, then a table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import jax
import numpy as np

from benchmarks.per_candidate import make_per_candidate_step, per_candidate_value_and_grad
from benchmarks.timing import first_calls, interleaved
from envs import chartext
from experiments import char as char_exp
from models import char_gpt
from rlsoft import exhaustive_loop as xl, monitors, roles
from rlsoft.config import check, parse_flags
from rlsoft.logger import format_table

PROG = "python -m benchmarks.char"
SHARED_TEXT = "/work/shared/data/tinyshakespeare.txt"
_EXP = char_exp.CharConfig()  # the experiment's defaults are the benchmark's


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model_preset: str = _EXP.model_preset
    batch: int = _EXP.batch_size
    context: int = _EXP.context
    scheme: str = _EXP.scheme
    tau: float = _EXP.tau
    mixing: str = _EXP.mixing
    clip_eps: float = _EXP.clip_eps
    learning_rate: float = _EXP.policy.learning_rate
    chunk: int = _EXP.chunk  # steps per compiled call of the testbed
    rounds: int = 3  # interleaved timed calls of each implementation
    candidates_per_pass: tuple[int, ...] = (1, 5, 13)  # must divide 65
    text_file: str = SHARED_TEXT
    seed: int = 0
    population: int = 0  # > 1: also time a population of this many seeds in one program

    def __post_init__(self):
        check(self.rounds >= 1, f"rounds={self.rounds} is invalid; need >= 1")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        check(self.population == 0 or self.population >= 2,
              f"population={self.population} is invalid; need 0 (off) or >= 2")
        check(len(self.candidates_per_pass) > 0 and all(k >= 1 for k in self.candidates_per_pass),
              f"candidates_per_pass={self.candidates_per_pass} is invalid; need divisors of the vocabulary")
        # The experiment's own checks: preset, batch, context, scheme, tau, learning rate, text file.
        chartext.validate_text_file(self.text_file)
        self.char_config()

    def char_config(self) -> char_exp.CharConfig:
        return char_exp.CharConfig(
            text_file=self.text_file, model_preset=self.model_preset, batch_size=self.batch, context=self.context,
            scheme=self.scheme, tau=self.tau, mixing=self.mixing, clip_eps=self.clip_eps, chunk=self.chunk,
            policy=dataclasses.replace(_EXP.policy, learning_rate=self.learning_rate), seed=self.seed, progress=False)


def _rel_diff(a, b) -> float:
    num = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return num / max(float(np.max(np.abs(y))) for y in jax.tree.leaves(b))


def stepper(step, state, *args):
    """run() -> metrics on the host: one call of `step` on the running state."""
    box = [state]

    def run():
        box[0], metrics = step(box[0], *args)
        return jax.device_get(metrics)
    return run


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog=PROG)
    ccfg = cfg.char_config()
    try:
        data, params, fns = char_exp.build(ccfg)
    except chartext.DataUnavailableError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    vocab = data.vocab.size
    bad = [k for k in cfg.candidates_per_pass if vocab % k]
    if bad:
        print(f"{PROG}: error: --candidates_per_pass={bad[0]} is invalid; need a divisor of V={vocab}",
              file=sys.stderr)
        raise SystemExit(2)
    monitor_cfg = monitors.MonitorConfig()  # the char testbed's
    data_key, explore_key = jax.random.key(cfg.seed + 1), jax.random.key(cfg.seed + 2)
    runs = {"exhaustive": stepper(xl.make_train_chunk(fns, ccfg, monitor_cfg, cfg.chunk),
                                  xl.init_state(params, ccfg, monitor_cfg), data_key, explore_key)}
    steps_per_call = {"exhaustive": cfg.chunk}
    if cfg.population:
        pop = f"population_{cfg.population}"
        mcfg = char_exp.model_config(ccfg, vocab)
        members = [xl.init_state(char_gpt.init_model(mcfg, cfg.seed + p)[1], ccfg, monitor_cfg)
                   for p in range(cfg.population)]
        keys = [jax.random.split(jax.random.fold_in(data_key, p)) for p in range(cfg.population)]
        runs[pop] = stepper(xl.make_train_chunk(fns, ccfg, monitor_cfg, cfg.chunk, population=True),
                            roles.stack_members(members),
                            jax.numpy.stack([k[0] for k in keys]), jax.numpy.stack([k[1] for k in keys]))
        steps_per_call[pop] = cfg.chunk * cfg.population  # member-steps per call

    # The baseline: the same preset with room for [context, c], and the task's batch and rewards.
    bcfg = char_gpt.CharGPTConfig.preset(cfg.model_preset, vocab_size=vocab, block_size=cfg.context + 1)
    bgraph, bparams = char_gpt.init_model(bcfg, cfg.seed)
    bfns = fns._replace(logits_fn=char_gpt.logits_fn(bgraph))
    seq_logits = char_gpt.sequence_logits_fn(bgraph)
    for k in cfg.candidates_per_pass:
        runs[f"per_candidate_k{k}"] = stepper(make_per_candidate_step(bfns, seq_logits, ccfg, k),
                                              xl.init_state(bparams, ccfg, monitor_cfg), data_key)
        steps_per_call[f"per_candidate_k{k}"] = 1

    # Same gradient from both on the first batch (k = the first candidates_per_pass).
    k0 = cfg.candidates_per_pass[0]
    contexts, targets = fns.batch_fn(jax.random.fold_in(data_key, 0))
    live_grads = jax.jit(jax.grad(lambda p: xl.step_loss(p, bparams, contexts, targets, explore_key, bfns,
                                                         ccfg)[0]))(bparams)
    probs = jax.nn.softmax(bfns.logits_fn(bparams, contexts))
    pc_loss, pc_grads = jax.jit(functools.partial(
        per_candidate_value_and_grad, sequence_logits_fn=seq_logits, scheme=ccfg.scheme, tau=ccfg.tau,
        mixing=ccfg.mixing, candidates_per_pass=k0))(bparams, contexts, fns.reward_fn(contexts, targets, probs))
    grad_rel_diff = _rel_diff(pc_grads, live_grads)

    first_out, first_s = first_calls(runs)  # compiles each
    times = interleaved(runs, cfg.rounds)
    per_step = {name: np.asarray(t) / steps_per_call[name] for name, t in times.items()}
    sec = {name: float(np.median(t)) for name, t in per_step.items()}
    rate = {name: cfg.batch / s for name, s in sec.items()}
    baseline = max((name for name in runs if name.startswith("per_candidate")), key=rate.get)
    speedup = float(np.median(per_step[baseline] / per_step["exhaustive"]))  # per round
    ex_metrics = {k: float(np.asarray(v)[-1]) for k, v in first_out["exhaustive"].items() if k.startswith("train/")}
    figures = {
        "workload": dict(model_preset=cfg.model_preset, params=char_gpt.param_count(params), batch=cfg.batch,
                         context=cfg.context, vocab=vocab, scheme=cfg.scheme, tau=cfg.tau, mixing=cfg.mixing,
                         clip_eps=cfg.clip_eps, chunk=cfg.chunk, rounds=cfg.rounds),
        "contexts_per_s": {name: round(v, 2) for name, v in rate.items()},
        "seconds_per_step": {name: round(v, 4) for name, v in sec.items()},
        "seconds_per_step_all": {name: [round(float(x), 4) for x in v] for name, v in per_step.items()},
        "first_call_seconds": {name: round(v, 2) for name, v in first_s.items()},
        "baseline": baseline,
        "speedup_vs_baseline": round(speedup, 1),
        "population_vs_separate": (round(float(np.median(per_step["exhaustive"] / per_step[pop])), 3)
                                   if cfg.population else None),
        "check": {"grad_rel_diff": grad_rel_diff, "k": k0, "loss_per_candidate": float(pc_loss)},
        "first_chunk_last_step": {k: round(ex_metrics[f"train/{k}"], 4) for k in
                                  ("loss", "entropy", "expected_reward", "accuracy", "grad_norm")},
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
    }
    print(json.dumps(figures))
    rows = []
    for name in runs:
        per_candidate = name.startswith("per_candidate")
        label = (f"per-candidate, {name.split('_k')[1]} candidates / pass" if per_candidate
                 else f"experiments.char step, population of {cfg.population} (per member-step)"
                 if name.startswith("population") else f"experiments.char step ({cfg.chunk} steps / call)")
        rows.append(dict(impl=label, passes_per_context=vocab if per_candidate else 1, contexts_per_s=rate[name],
                         s_per_step=sec[name],
                         vs_baseline=float(np.median(per_step[baseline] / per_step[name]))))
    print(format_table(rows))
    return figures


if __name__ == "__main__":
    main()
