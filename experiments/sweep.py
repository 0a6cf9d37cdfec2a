"""Sweeps of arms x seeds on any testbed, with 95% CIs: `rlsoft.sweep` on the experiments' mains.

    python -m experiments.sweep bandit --name=tau --seeds=5 \\
        --arms="grpo: --scheme=linear; soft0.5: --scheme=softmax --tau=0.5" --common="--preset=tiny"
    python -m experiments.sweep char --name=tau --arms="..." --common="--preset=smoke" --seeds=5
    python -m experiments.sweep --preset=bandit_tau    # a named study (experiments/studies.py)
    python -m experiments.sweep report        # results/index.md and the README's results blocks

An arm is a name and the flags of that testbed's own command line (`experiments.<testbed>`), so
every flag the testbed has can be swept, and checked by its own parser before anything runs. The
first arm is the baseline unless --baseline names another. Seeds first_seed .. first_seed+seeds-1
are the same in every arm. Results: results/<testbed>/<name>/ (see rlsoft/sweep.py).

How each testbed runs its (arm, seed) pairs, the fastest way its shapes allow:
  bandit     every arm that differs only in --scheme, --tau, --lr joins ONE compiled program
             (rlsoft.bandit_sweep: arms x seeds vmapped, common random numbers); seed i is the
             bandit's seed index i under its root key --seed (default 0; a --seed in the
             common flags draws new bandits), so first_seed must be 0
  think      one program per arm: its seeds as a population (`--population`; member p = seed p)
  char       on an accelerator as think; on a CPU one run per (arm, seed), the faster there
             (`python -m benchmarks.char --population=5`: 0.86-0.89x the contexts/s of 5 separate runs);
             `--population=true` / `false` forces either
  countdown  one run per (arm, seed), `--seed=s`, in this process
Scores: the final eval metrics (eval/*) of each run, and train/* metrics averaged over the last
10% of steps (train/*@end) and over the whole run (train/*@mean; the bandit's eval/p_best@mean,
the area under its exact learning curve, says how fast it learned); curves (<= 100 points, 6
significant digits): every eval/* at its eval steps and the train/* diagnostics in CURVES.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import shlex
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from experiments.studies import STUDIES
from rlsoft import sweep as sw
from rlsoft.config import check, parse_flags

PROG = "python -m experiments.sweep"
TESTBEDS = ("bandit", "char", "countdown", "think")
DEFAULT_METRICS = {
    "bandit": ("eval/p_best@mean", "eval/p_best", "train/weights/effective_n@mean", "train/weights/entropy@mean",
               "train/grad_norm@mean"),
    "char": ("eval/top1", "eval/cross_entropy", "train/expected_reward@end", "train/weights/effective_n@end"),
    "countdown": ("eval/success", "eval/mean_at_k", "eval/success_before", "eval/success_gain", "train/reward@mean",
                  "train/weights/effective_n@mean", "train/entropy@end", "train/completions/mean_length@end",
                  "train/grad_norm@mean"),
    "think": ("train_accuracy", "accuracy", "hand_accuracy", "shuffled_accuracy", "hand_match", "thought_entropy",
              "mutual_information"),
}
CONFIGS = {"char": "CharConfig", "countdown": "CountdownConfig", "think": "ThinkExperimentConfig"}
MAX_POINTS = 100
# train/* curves kept in the run files (every eval/* curve is kept): the weight and policy diagnostics.
CURVES = ("train/reward", "train/success", "train/expected_reward", "train/entropy", "train/grad_norm",
          "train/completions/mean_length", "train/weights/effective_n", "train/weights/entropy", "train/weights/max_weight",
          "train/weights/zero_std_frac", "train/skipped_updates")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    testbed: str = ""  # also the first positional argument
    name: str = "default"  # results/<testbed>/<name>
    arms: str = ""  # "name: --flag=v ...; name2: ..."
    baseline: str = ""  # default: the first arm
    common: str = ""  # flags every arm gets first, e.g. "--preset=smoke --steps=200"
    seeds: int = 5
    first_seed: int = 0
    metrics: tuple[str, ...] = ()  # the first is the table's primary score; default: the testbed's
    comparisons: str = ""  # more paired differences: "armA - armB [metric]; ..."
    title: str = ""
    out: str = "results"
    population: str = "auto"  # seeds (bandit: and arms) in one program: auto (bandit, think; char off a CPU), true, false
    allow_changed: bool = False  # keep runs of an arm whose flags changed
    table_only: bool = False

    def __post_init__(self):
        check(self.testbed in TESTBEDS + ("report",),
              f"testbed={self.testbed!r} is unknown; allowed: {', '.join(TESTBEDS)}, report")
        if self.testbed == "report":
            return
        check(sw.ARM_NAME.match(self.name) is not None, f"name={self.name!r} is invalid; use letters, digits, _ . -")
        check(self.seeds >= 1, f"seeds={self.seeds} is invalid; need >= 1")
        check(self.population in ("auto", "true", "false"),
              f"population={self.population!r} is invalid; allowed: auto, true, false")
        check(self.first_seed >= 0, f"first_seed={self.first_seed} is invalid; need >= 0")
        arms = sw.parse_arms(self.arms)  # SweepError is a ValueError: one line, exit 2
        check(not self.baseline or self.baseline in {a.name for a in arms},
              f"baseline={self.baseline} is not one of the arms ({', '.join(a.name for a in arms)})")
        sw.parse_comparisons(self.comparisons, [a.name for a in arms])
        check(self.testbed != "bandit" or self.first_seed == 0,
              "first_seed must be 0 for the bandit (its seeds are indices under one root key)")

    @property
    def arm_list(self) -> list[sw.Arm]:
        return sw.parse_arms(self.arms)

    @property
    def out_dir(self) -> str:
        return os.path.join(self.out, self.testbed, self.name)

    @property
    def score_metrics(self) -> tuple[str, ...]:
        return self.metrics or DEFAULT_METRICS[self.testbed]

    def spec(self, argv: Sequence[str]) -> dict:
        arms = self.arm_list
        return dict(testbed=self.testbed, common=self.common.split(), arms={a.name: list(a.flags) for a in arms},
                    baseline=self.baseline or arms[0].name, metrics=list(self.score_metrics), title=self.title,
                    comparisons=sw.parse_comparisons(self.comparisons, [a.name for a in arms]),
                    command=shlex.join(PROG.split() + [a for a in argv if not a.startswith("--table_only")]))


def _module(testbed: str):
    return importlib.import_module(f"experiments.{testbed}")


# ---- scores and curves from a driver history ---------------------------------------------------
def history_scores(history: list[dict], prefix_map: Callable[[str], Optional[str]] = lambda k: k, train: bool = True,
                   train_map: Callable[[str], Optional[str]] = lambda k: k):
    """(final, curves) from a driver history: the last eval row's eval/* metrics (renamed by
    `prefix_map`, None drops one), train/* means over the last 10% of steps (as train/*@end; renamed
    by `train_map`), and curves of both (train/* thinned to MAX_POINTS). `train=False` leaves
    train/* out."""
    final, curves = {}, {}
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    for k, v in (evals[-1] if evals else {}).items():
        name = prefix_map(k) if k.startswith("eval/") else None
        if name is not None and np.ndim(v) == 0:
            final[name] = float(v)
    for r in evals:
        for k, v in r.items():
            name = prefix_map(k) if k.startswith("eval/") else None
            if name is not None and np.ndim(v) == 0:
                curves.setdefault(name, []).append([float(r["step"]), _round(v)])
    train = [r for r in history if train and any(k.startswith("train/") for k in r)]
    tail = train[-max(1, len(train) // 10):]
    every = max(1, len(train) // MAX_POINTS)
    for k in sorted({k for r in train for k in r if k.startswith("train/")}):
        name = train_map(k)
        if name is None:
            continue
        vals = [float(r[k]) for r in tail if k in r and np.ndim(r[k]) == 0]
        if vals:
            final[f"{name}@end"] = float(np.mean(vals))
            final[f"{name}@mean"] = float(np.mean([float(r[k]) for r in train if k in r and np.ndim(r[k]) == 0]))
        pts = [[float(r["step"]), _round(r[k])] for r in train[::every] if k in r and np.ndim(r[k]) == 0]
        if pts and name in CURVES:
            curves[name] = pts
    return final, curves


def _round(x) -> float:
    return float(f"{float(x):.6g}")  # curves: 6 significant digits keep the run files small


def _record(arm: sw.Arm, seed: int, flags, final, curves, start: float, program: str) -> sw.RunRecord:
    return sw.RunRecord(arm=arm.name, seed=seed, flags=list(flags), final=final, curves=curves,
                        wall_s=round(time.time() - start, 1), load_average=round(os.getloadavg()[0], 2),
                        program=program)


# ---- runners: (cfg, {arm: pending seeds}) -> yields finished RunRecords --------------------------
def run_single(cfg: SweepConfig, todo: dict[str, list[int]]):
    """char, countdown: one run per (arm, seed) in this process, seed by seed (every arm's seed 0
    first), so a sweep stopped early still holds paired runs of every arm."""
    main = _module(cfg.testbed).main
    for seed in sorted({s for seeds in todo.values() for s in seeds}):
        for arm in (a for a in cfg.arm_list if seed in todo.get(a.name, [])):
            flags = cfg.common.split() + list(arm.flags) + [f"--seed={seed}", "--progress=false"]
            start = time.time()
            result = main(flags)
            final, curves = history_scores(result["history"])
            final.update(before_after(result.get("eval_before"), result.get("eval_after")))
            yield _record(arm, seed, flags, final, curves, start, "one run")


def before_after(before: Optional[dict], after: Optional[dict]) -> dict[str, float]:
    """Countdown's per-problem outcomes before and after RL -> eval/<m>_before and eval/<m>_gain
    (after - before over the same problems), for success and mean@k."""
    out = {}
    for m in ("success", "mean_at_k"):
        if before is not None and after is not None and m in before and m in after:
            out[f"eval/{m}_before"] = float(np.mean(before[m]))
            out[f"eval/{m}_gain"] = float(np.mean(after[m]) - np.mean(before[m]))
    return out


def _contiguous(seeds: list[int]) -> list[list[int]]:
    blocks: list[list[int]] = []
    for s in seeds:
        if blocks and s == blocks[-1][-1] + 1:
            blocks[-1].append(s)
        else:
            blocks.append([s])
    return blocks


def member_names(p: int, population: int) -> Callable[[str], Optional[str]]:
    """Member p's metrics of a population's history under a single run's names
    (<head>/member<p>/<m> -> <head>/<m>; the members' means are dropped); a run of one: as logged."""
    if population == 1:
        return lambda k: k

    def rename(k: str) -> Optional[str]:
        head, _, rest = k.partition("/")
        member, _, name = rest.partition("/")
        return f"{head}/{name}" if member == f"member{p}" and name else None

    return rename


def run_char(cfg: SweepConfig, todo: dict[str, list[int]]):
    """char: each arm's pending seeds as populations of contiguous seeds where populations pay (module
    docstring), scored from each member's own eval and train metrics, exactly as its own run."""
    import jax

    if cfg.population == "false" or (cfg.population == "auto" and jax.default_backend() == "cpu"):
        yield from run_single(cfg, todo)
        return
    main = _module("char").main
    for arm in cfg.arm_list:
        for block in _contiguous(todo.get(arm.name, [])):
            flags = cfg.common.split() + list(arm.flags) + [f"--seed={block[0]}", f"--population={len(block)}",
                                                            "--progress=false"]
            start = time.time()
            result = main(flags)
            for p, seed in enumerate(block):
                rename = member_names(p, len(block))
                final, curves = history_scores(result["history"], rename, train_map=rename)
                program = f"population of {len(block)} seeds" if len(block) > 1 else "one run"
                yield _record(arm, seed, flags, final, curves, start, program)


def run_think(cfg: SweepConfig, todo: dict[str, list[int]]):
    """think: each arm's pending seeds as populations of contiguous seeds (member p = seed + p)."""
    main = _module("think").main
    for arm in cfg.arm_list:
        blocks = (_contiguous(todo.get(arm.name, [])) if cfg.population != "false"
                  else [[s] for s in todo.get(arm.name, [])])
        for block in blocks:
            flags = cfg.common.split() + list(arm.flags) + [f"--seed={block[0]}", f"--population={len(block)}",
                                                            "--progress=false"]
            start = time.time()
            result = main(flags)
            for p, seed in enumerate(block):
                # A population logs member p's eval as eval/member<p>/<m>; a single run as eval/<m>.
                prefix = f"eval/member{p}/" if len(block) > 1 else "eval/"
                member = lambda k, prefix=prefix: k[len(prefix):] if k.startswith(prefix) and "/" not in \
                    k[len(prefix):] else None
                _, curves = history_scores(result["history"], member, train=len(block) == 1)
                final = {k: float(v[p]) for k, v in result["final"].items()}
                program = f"population of {len(block)} seeds" if len(block) > 1 else "one run"
                yield _record(arm, seed, flags, final, curves, start, program)


def _split_point(flags: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """A bandit arm's --scheme/--tau/--lr (one grid point) and its other flags."""
    point, rest = {}, []
    for f in flags:
        key, _, value = f[2:].partition("=")
        if key in ("schemes", "taus", "lrs", "ref_lr", "seeds"):
            raise sw.SweepError(f"--{key} is set by the sweep; an arm names one point: --scheme, --tau, --lr")
        if key in ("scheme", "tau", "lr"):
            point[key] = value
        else:
            rest.append(f)
    return point, rest


def bandit_arm(cfg: SweepConfig, arm: sw.Arm):
    """(BanditConfig, HParams of one point) for an arm; exits 2 on bad flags like the bandit itself."""
    from experiments import bandit
    from rlsoft import bandit_sweep

    point, rest = _split_point(cfg.common.split() + list(arm.flags))
    scheme = point.get("scheme", "linear")
    lr = point.get("lr", "3.0")
    flags = rest + [f"--schemes={scheme}", f"--taus={point.get('tau', '0.5')}", f"--lrs={lr}", f"--ref_lr={lr}",
                    f"--seeds={cfg.first_seed + cfg.seeds}", "--tensorboard=false", "--plot=false"]
    bcfg = parse_flags(bandit.BanditConfig, flags, presets=bandit.PRESETS, prog=f"{PROG} bandit (arm {arm.name})")
    return bcfg, bandit_sweep.make_hparams(bcfg.schemes, bcfg.taus, bcfg.lrs), flags


def run_bandit(cfg: SweepConfig, todo: dict[str, list[int]]):
    """Arms that share every flag but --scheme/--tau/--lr run as one compiled program of arms x seeds."""
    import jax.numpy as jnp

    from experiments import bandit
    from rlsoft import bandit_sweep
    from rlsoft.config import config_to_dict

    groups: dict[str, list] = {}
    for arm in cfg.arm_list:
        if arm.name in todo:
            bcfg, hps, flags = bandit_arm(cfg, arm)
            rest = {k: v for k, v in config_to_dict(bcfg).items() if k not in ("schemes", "taus", "lrs", "ref_lr")}
            key = repr(sorted(rest.items())) if cfg.population != "false" else arm.name
            groups.setdefault(key, []).append((arm, bcfg, hps, flags))
    for members in groups.values():
        start = time.time()
        hps = bandit_sweep.HParams(*(jnp.concatenate([m[2][i] for m in members]) for i in range(3)))
        _, metrics = bandit.run_sweep(members[0][1], hps)  # [C, S, T]
        program = f"one program of {len(members)} arms x {members[0][1].seeds} seeds"
        for c, (arm, bcfg, _, flags) in enumerate(members):
            for seed in todo[arm.name]:
                series = {k: v[c, seed] for k, v in metrics.items()}
                steps = np.arange(1, bcfg.steps + 1)
                tail = max(1, bcfg.steps // 10)
                final = {k: float(v[-1]) for k, v in series.items() if k.startswith("eval/")}
                final["eval/p_best@mean"] = float(np.mean(series["eval/p_best"]))
                for k, v in series.items():
                    if k.startswith("train/"):
                        final[f"{k}@end"], final[f"{k}@mean"] = float(np.mean(v[-tail:])), float(np.mean(v))
                every = max(1, bcfg.steps // MAX_POINTS)
                curves = {k: [[float(s), _round(x)] for s, x in zip(steps[every - 1::every], v[every - 1::every])]
                          for k, v in series.items() if k.startswith("eval/") or k in CURVES}
                yield _record(arm, seed, flags, final, curves, start, program)


RUNNERS = {"bandit": run_bandit, "char": run_char, "countdown": run_single, "think": run_think}


def validate_arms(cfg: SweepConfig) -> None:
    """Every arm's command line through its testbed's own parser, before anything compiles (exit 2)."""
    if cfg.testbed == "bandit":
        for arm in cfg.arm_list:
            bandit_arm(cfg, arm)
        return
    mod = _module(cfg.testbed)
    config_cls = getattr(mod, CONFIGS[cfg.testbed])
    for arm in cfg.arm_list:
        parse_flags(config_cls, cfg.common.split() + list(arm.flags) + [f"--seed={cfg.first_seed}"],
                    presets=getattr(mod, "PRESETS", None), prog=f"{PROG} {cfg.testbed} (arm {arm.name})")


def report(out: str = "results", readme: str = "README.md") -> None:
    print(sw.write_index(out), end="")
    filled = sw.update_readme(readme, out) if os.path.exists(readme) else []
    print(f"README: {len(filled)} results blocks rebuilt" + (f" ({', '.join(filled)})" if filled else ""))


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = [f"--testbed={argv[0]}"] + argv[1:]
    cfg = parse_flags(SweepConfig, argv, presets=STUDIES, prog=PROG)
    try:
        if cfg.testbed == "report":
            report(cfg.out)
            return None
        validate_arms(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
        spec = cfg.spec(argv)
        sw.check_spec(cfg.out_dir, spec, cfg.allow_changed)
    except (sw.SweepError, OSError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    if not cfg.table_only:
        seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
        todo = sw.pending(cfg.out_dir, cfg.arm_list, seeds)
        done = len(cfg.arm_list) * len(seeds) - sum(map(len, todo.values()))
        print(f"{cfg.out_dir}: {sum(map(len, todo.values()))} runs to do, {done} already done", flush=True)
        for record in RUNNERS[cfg.testbed](cfg, todo):
            sw.write_run(cfg.out_dir, record)
            primary = cfg.score_metrics[0]
            print(f"  {record.arm} seed {record.seed}: {primary} = {record.final.get(primary, float('nan')):.4f} "
                  f"({record.program}, {record.wall_s} s)", flush=True)
    text = sw.write_report(cfg.out_dir, spec)
    sw.write_index(cfg.out)
    print(text)
    return text


if __name__ == "__main__":
    main()
