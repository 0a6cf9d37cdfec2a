"""Would a population of seeds pay on Countdown? The RL step at Q questions against P x Q questions.

    python -m benchmarks.countdown_population                    # P = 5, the CPU default's step
    python -m benchmarks.countdown_population --population=5 --repeats=15 --out=results/benchmarks/countdown_population.json

A population of P seeds in one program (params vmapped through the sampler and the update, rewards
scored on the host for all of them) does P times the FLOPs of one run per step; what it can save is
the per-step overhead that does not grow with the batch (dispatch, host transfers, Python). A step on
P x Q questions does the same FLOPs, with the same per-call overhead as one run, so

    bound = P x time(step at Q) / time(step at P x Q)

is what the best possible population could gain over P runs one after another (a vmapped population
also pays for P separate weight matrices, so it can only do worse). Both steps are the experiment's
own (`experiments.countdown.make_driver`'s LanguageTestbed at the CPU default: tiny Qwen2, generated
3-number problems, G = 8, 24 new tokens): rollout, host reward, update; interleaved, one call of each
per round, so load from other jobs hits both; the ratio is the median of the per-round ratios.
Also reported: the seconds each part takes (sampler, host reward, update) and the FLOPs of the
update against the f32 matmul rate measured in the same run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.timing import first_calls, interleaved, paired, write_json
from benchmarks.train_step import matmul_flops, update_forward_flops
from rlsoft.config import check, parse_flags
from rlsoft.logger import format_table


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    population: int = 5
    questions: int = 16  # the CPU default's questions per step
    repeats: int = 10
    out: str = ""  # write the JSON here too

    def __post_init__(self):
        check(self.population >= 2, f"population={self.population} is invalid; need >= 2")
        check(self.questions >= 1, f"questions={self.questions} is invalid; need >= 1")
        check(self.repeats >= 1, f"repeats={self.repeats} is invalid; need >= 1")


def _testbed(questions: int, logdir: str):
    """The Countdown driver's testbed at the CPU default with `questions` per step, no warm start."""
    from experiments import countdown

    cfg = parse_flags(countdown.CountdownConfig, [
        f"--questions_per_step={questions}", "--sft_steps=0", "--eval_every=0", "--checkpoint_every=0",
        "--eval_questions=8", "--progress=False", f"--logdir={logdir}"], presets=countdown.PRESETS, prog="bench")
    driver = countdown.make_driver(cfg)
    return driver, cfg


def _parts(bed) -> dict:
    """Wrap the testbed's sampler, host reward and update with timers (blocking on device results)."""
    seconds = {"sampler": [], "reward": [], "update": []}

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            seconds[name].append(time.perf_counter() - start)
            return out
        return call

    bed.sample, bed.update = timed("sampler", bed.sample), timed("update", bed.update)
    bed.task.score = timed("reward", bed.task.score)
    return seconds


def _update_flops(driver, tcfg) -> float:
    """Useful FLOPs of one update at Q questions: forward + backward = 3 group-shared forwards
    (benchmarks.train_step's count), prompts at the task's padded length."""
    bed = driver.testbed
    params = bed.initial_params
    from models import qwen2

    vocab = params["embed_tokens"]["embedding"].shape[0]  # the tokenizer trained on the problems
    mcfg = qwen2.Qwen2Config.preset(tcfg.model_preset, vocab_size=vocab)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    non_embedding = n_params - mcfg.vocab_size * mcfg.hidden_size * (1 if mcfg.tie_word_embeddings else 2)
    shared = update_forward_flops(mcfg, non_embedding, tcfg.questions_per_step, tcfg.group_size,
                                  bed.task.max_prompt_length, tcfg.sampling.max_new_tokens)["shared"]
    return 3 * shared


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.countdown_population")
    sizes = {"one_run": cfg.questions, "batch_of_population": cfg.questions * cfg.population}
    runs, parts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, q in sizes.items():
            driver, tcfg = _testbed(q, os.path.join(tmp, name))
            bed, keys, box = driver.testbed, driver.keys, {"state": driver.state, "t": 0}
            parts[name] = _parts(bed)

            def step(bed=bed, keys=keys, box=box):
                box["state"], metrics = bed.train(box["state"], box["t"], 1, keys)
                box["t"] += 1
                return metrics

            runs[name] = step
            if name == "one_run":
                update_flops = _update_flops(driver, tcfg)
        _, first = first_calls(runs)
        for seconds in parts.values():
            for v in seconds.values():
                v.clear()
        times = interleaved(runs, cfg.repeats)
    ratio = paired(times, "one_run", "batch_of_population")
    g, n = tcfg.group_size, tcfg.sampling.max_new_tokens
    mm = matmul_flops({"square": (1024, 1024, 1024)})
    out_update_s = lambda p: float(np.median(p["one_run"]["update"]))
    out = dict(
        population=cfg.population, questions=cfg.questions, group_size=g, max_new_tokens=n, repeats=cfg.repeats,
        load_average=os.getloadavg()[0], first_call_s={k: round(v, 2) for k, v in first.items()},
        step_s={k: float(np.median(v)) for k, v in times.items()},
        part_s={k: {p: float(np.median(v)) for p, v in s.items()} for k, s in parts.items()},
        time_ratio_batch_over_one=ratio, population_bound=cfg.population / ratio,
        update_gflop=update_flops / 1e9, matmul_gflop_s=mm["square"] / 1e9,
        update_fraction_of_matmul_rate=update_flops / out_update_s(parts) / mm["square"], devices=[str(d) for d in jax.devices()])
    print(json.dumps(out))
    rows = [{"step": k, "questions x G": f"{sizes[k]} x {g}", "ms/step": round(out["step_s"][k] * 1e3),
             **{f"{p} ms": round(out["part_s"][k][p] * 1e3) for p in ("sampler", "reward", "update")}} for k in sizes]
    print(format_table(rows))
    print(f"time(P x Q) / time(Q) = {ratio:.2f} for P = {cfg.population}: a population of {cfg.population} "
          f"seeds could at best run {out['population_bound']:.2f}x faster than {cfg.population} runs in turn "
          f"(load average {out['load_average']:.1f})")
    write_json(out, cfg.out)
    return out


if __name__ == "__main__":
    main()
