"""Sweeps: arms x seeds, one file per finished run, and the tables, curves and logs made from them.

A sweep compares ARMS, each a set of command-line flags that changes one thing against a named
baseline arm, over the SAME seeds (so arms share their random numbers wherever the arm allows).
It knows no testbed: a runner (experiments/sweep.py) turns (arms, seeds) into `RunRecord`s.

Layout under `out` (e.g. results/<testbed>/<sweep>/):
    sweep.json                 the spec: testbed, common flags, arms, baseline, metrics
    runs/<arm>/seed<s>.json    one finished run: final scores, learning curves, wall time
    table.md                   per arm: mean, IQM, each with a 95% stratified-bootstrap CI over
                               seeds (rliable), the paired difference from the baseline and the
                               probability of improvement over it; then the other metrics
    curves.png                 the primary metric's learning curve per arm, mean over seeds with a
                               95% bootstrap band
    tb/<arm>/seed<s>/          TensorBoard scalars of every run's curves (derived from the run
                               files, so not kept in git: `tensorboard --logdir=<out>/tb`)

A run's file is written atomically when the run ends, so a killed sweep resumes where it stopped
and never reruns a finished run. The spec is compared with the stored one: an arm whose flags
changed is refused (its old runs would be mixed with new ones) unless the caller allows it.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import textwrap
import re
import shutil
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from rlsoft import stats

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+@-]*$")


class SweepError(ValueError):
    """A bad sweep specification or a conflict with the stored one (one line, for exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    flags: tuple[str, ...]


def parse_arms(text: str) -> list[Arm]:
    """`"name: --flag=v --flag2=w; name2: --flag=u"` -> arms, in order. An arm with no flags
    (`"grpo:"`) runs the common flags alone."""
    arms = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, flags = part.partition(":")
        name = name.strip()
        if not sep:
            raise SweepError(f"arm {part!r} is invalid; write name: --flag=value ... (arms separated by ';')")
        if not ARM_NAME.match(name):
            raise SweepError(f"arm name {name!r} is invalid; use letters, digits and _ . = + @ -")
        bad = [f for f in flags.split() if not f.startswith("--")]
        if bad:
            raise SweepError(f"arm {name}: {bad[0]!r} is not a flag; write --name=value")
        arms.append(Arm(name, tuple(flags.split())))
    if not arms:
        raise SweepError("arms is empty; give e.g. --arms='grpo: --scheme=linear; soft: --scheme=softmax'")
    dup = [a.name for i, a in enumerate(arms) if a.name in {b.name for b in arms[:i]}]
    if dup:
        raise SweepError(f"arm {dup[0]} is named twice")
    return arms


@dataclasses.dataclass
class RunRecord:
    """One finished (arm, seed) run. `final`: metric -> score; `curves`: metric -> [[step, value]]."""

    arm: str
    seed: int
    flags: list[str]
    final: dict[str, float]
    curves: dict[str, list[list[float]]]
    wall_s: float
    load_average: float
    program: str = ""  # how it ran, e.g. "population of 5 seeds" or "one run"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


COMPARISON = re.compile(r"^\s*(\S+)\s+-\s+(\S+)(?:\s+\[(\S+)\])?\s*$")


def parse_comparisons(text: str, arms: Sequence[str]) -> list[tuple[str, str, Optional[str]]]:
    """`"a - b [metric]; c - d"` -> [(a, b, metric or None = the primary)]: paired differences
    between arms other than against the baseline, each one variable apart."""
    out = []
    for part in filter(str.strip, text.split(";")):
        m = COMPARISON.match(part)
        if not m:
            raise SweepError(f"comparison {part.strip()!r} is invalid; write 'armA - armB [metric]'")
        for name in m.group(1, 2):
            if name not in arms:
                raise SweepError(f"comparison {part.strip()!r} names {name}, which is not an arm")
        out.append((m.group(1), m.group(2), m.group(3)))
    return out


def run_path(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, "runs", arm, f"seed{seed}.json")


def _write_json(path: str, obj, indent: Optional[int] = 1) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent, allow_nan=True)
    os.replace(path + ".tmp", path)  # a file is complete or absent


def write_run(out: str, record: RunRecord) -> None:
    _write_json(run_path(out, record.arm, record.seed), record.to_json(), indent=None)  # compact: many files


def load_runs(out: str) -> list[RunRecord]:
    paths = sorted(glob.glob(os.path.join(out, "runs", "*", "seed*.json")))
    return [RunRecord(**json.load(open(p))) for p in paths]


def pending(out: str, arms: Sequence[Arm], seeds: Sequence[int]) -> dict[str, list[int]]:
    """arm -> the seeds without a finished run file (arms with none pending are left out)."""
    todo = {a.name: [s for s in seeds if not os.path.exists(run_path(out, a.name, s))] for a in arms}
    return {k: v for k, v in todo.items() if v}


def check_spec(out: str, spec: Mapping, allow_changed: bool = False) -> None:
    """Write `spec` to out/sweep.json, refusing an arm (or the common flags) whose flags changed
    since the stored spec unless `allow_changed`. New arms and more seeds are fine."""
    path = os.path.join(out, "sweep.json")
    ran = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(out, "runs", "*", "seed*.json"))}
    if os.path.exists(path) and ran and not allow_changed:  # nothing finished: nothing to mix with
        old = json.load(open(path))
        if old.get("testbed") != spec["testbed"]:
            raise SweepError(f"{out} holds a {old.get('testbed')} sweep, not {spec['testbed']}; choose another --name")
        if old.get("common") != spec["common"]:
            raise SweepError(f"common flags changed since {path} ({' '.join(old.get('common', []))!r}); "
                             "pass --allow_changed to mix runs, or choose another --name")
        for name, flags in spec["arms"].items():
            if name in ran and name in old.get("arms", {}) and old["arms"][name] != flags:
                raise SweepError(f"arm {name} changed since {path} ({' '.join(old['arms'][name])!r}); "
                                 "pass --allow_changed to mix runs, or rename the arm")
        spec = {**spec, "arms": {**old.get("arms", {}), **spec["arms"]}}
    _write_json(path, dict(spec))


# ---- reading the files: tables, curves, TensorBoard --------------------------------------------
def _by_arm(records: Iterable[RunRecord]) -> dict[str, dict[int, RunRecord]]:
    out: dict[str, dict[int, RunRecord]] = {}
    for r in records:
        out.setdefault(r.arm, {})[r.seed] = r
    return out


def _scores(runs: Mapping[int, RunRecord], metric: str, seeds: Sequence[int]) -> Optional[np.ndarray]:
    vals = [runs[s].final.get(metric) for s in seeds]
    if any(v is None for v in vals):
        return None
    return np.asarray(vals, np.float64)


def _fmt(x: stats.Interval, digits: int) -> str:
    return "n/a" if not np.isfinite(x.estimate) else x.format(digits)


def _interval_or_note(scores: np.ndarray, digits: int, aggregate: str = "mean") -> str:
    if not np.all(np.isfinite(scores)):
        return f"{int(np.sum(~np.isfinite(scores)))} non-finite"
    return _fmt(stats.interval(scores, aggregate), digits)


def summary_table(records: Sequence[RunRecord], arms: Sequence[str], baseline: str, metric: str,
                  others: Sequence[str] = (), digits: int = 3,
                  comparisons: Sequence[tuple[str, str, Optional[str]]] = ()) -> str:
    """Markdown, from the run files only. Rows follow `arms`; the comparison with the baseline (and
    each of `comparisons`) uses the seeds both arms finished (paired)."""
    runs = _by_arm(records)
    base = runs.get(baseline, {})
    head = ["arm", "seeds", f"{metric} mean [95% CI]", "IQM [95% CI]", f"- {baseline} (paired)",
            f"P({metric} > {baseline})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        mine = runs.get(arm, {})
        seeds = sorted(mine)
        x = _scores(mine, metric, seeds) if seeds else None
        if x is None:
            lines.append(f"| {arm} | {len(seeds)} | - | - | - | - |")
            continue
        cells = [arm, str(len(seeds)), _interval_or_note(x, digits), _interval_or_note(x, digits, "iqm")]
        shared = sorted(set(seeds) & set(base))
        y = _scores(base, metric, shared) if shared else None
        if arm == baseline or y is None or not np.all(np.isfinite(y)) or not np.all(np.isfinite(x)):
            cells += ["-", "-"]
        else:
            xs = _scores(mine, metric, shared)
            cells.append(_fmt(stats.paired_difference(xs, y), digits))
            cells.append(_fmt(stats.probability_of_improvement(xs, y), 2))
        lines.append("| " + " | ".join(cells) + " |")
    if others:
        lines += ["", "| arm | " + " | ".join(others) + " |", "|" + "---|" * (len(others) + 1)]
        for arm in arms:
            mine = runs.get(arm, {})
            cells = [arm]
            for m in others:
                x = _scores(mine, m, sorted(mine)) if mine else None
                cells.append("-" if x is None else _interval_or_note(x, digits))
            lines.append("| " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "| A - B (paired over shared seeds) | metric | seeds | mean [95% CI] | P(A > B) |",
                  "|---|---|---|---|---|"]
        for a, b, m in comparisons:
            m = m or metric
            shared = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
            xa = _scores(runs.get(a, {}), m, shared) if shared else None
            xb = _scores(runs.get(b, {}), m, shared) if shared else None
            if xa is None or xb is None or not (np.all(np.isfinite(xa)) and np.all(np.isfinite(xb))):
                lines.append(f"| {a} - {b} | {m} | {len(shared)} | - | - |")
                continue
            lines.append(f"| {a} - {b} | {m} | {len(shared)} | {_fmt(stats.paired_difference(xa, xb), digits)} | "
                         f"{_fmt(stats.probability_of_improvement(xa, xb), 2)} |")
    return "\n".join(lines)


def curve_matrix(runs: Mapping[int, RunRecord], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [points], values [runs, points]) on the steps every run logged."""
    curves = [np.asarray(r.curves.get(metric, []), np.float64).reshape(-1, 2) for r in runs.values()]
    if not curves or any(len(c) == 0 for c in curves):
        return np.zeros(0), np.zeros((len(curves), 0))
    steps = sorted(set.intersection(*(set(c[:, 0].tolist()) for c in curves)))
    values = np.stack([np.array([dict(c.tolist())[s] for s in steps]) for c in curves])
    return np.asarray(steps), values


def plot_curves(records: Sequence[RunRecord], arms: Sequence[str], metric: str, path: str, title: str = "") -> bool:
    """The metric's curve per arm (a summary score `m@mean` / `m@end` plots the curve of m): mean over
    seeds and a 95% bootstrap band. False: nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_arm(records)
    metric = metric.split("@")[0]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for arm in arms:
        steps, values = curve_matrix(runs.get(arm, {}), metric)
        if steps.size == 0 or not np.all(np.isfinite(values)):
            continue
        mean, low, high = stats.bootstrap_band(values)
        line, = ax.plot(steps, mean, label=f"{arm} (n={values.shape[0]})")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric}, mean over seeds, 95% CI")
        ax.set_title(textwrap.fill(title, 70), fontsize=10)  # a study's long title stays inside the figure
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_tensorboard(out: str, records: Sequence[RunRecord]) -> None:
    """tb/<arm>/seed<s>: each run's curves; written once per run (a `.complete` marker), so a
    killed writer's partial directory is replaced, never appended to."""
    from rlsoft.logger import TensorBoardLogger

    for r in records:
        path = os.path.join(out, "tb", r.arm, f"seed{r.seed}")
        if os.path.exists(os.path.join(path, ".complete")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        with TensorBoardLogger(path) as tb:
            by_step: dict[float, dict[str, float]] = {}
            for metric, points in r.curves.items():
                for step, value in points:
                    by_step.setdefault(step, {})[metric] = value
            for step in sorted(by_step):
                tb.scalars(int(step), by_step[step])
        open(os.path.join(path, ".complete"), "w").close()


def write_report(out: str, spec: Mapping) -> str:
    """table.md, curves.png and tb/ from the run files; returns the table's text."""
    records = load_runs(out)
    arms = list(spec["arms"])
    arms += sorted({r.arm for r in records} - set(arms))
    metrics = list(spec["metrics"])
    primary = metrics[0]
    seeds = sorted({r.seed for r in records})
    title = spec.get("title") or f"{spec['testbed']} sweep {os.path.basename(os.path.normpath(out))}"
    text = "\n".join([
        f"# {title}", "",
        f"`{spec.get('command', '')}`", "",
        f"Seeds {seeds}; the same seeds in every arm. Common flags: `{' '.join(spec['common']) or '(none)'}`.",
        "Arms: " + "; ".join(f"**{a}** `{' '.join(spec['arms'].get(a, [])) or '(baseline flags only)'}`"
                             for a in arms if a in spec["arms"]) + ".",
        "Mean and IQM over seeds with 95% stratified-bootstrap CIs (rliable); the difference from the "
        "baseline is paired over shared seeds; P(X > baseline) is rliable's probability of improvement."
        + (f" **Only {len(seeds)} seed(s): no claim can rest on this table.**" if len(seeds) < 5 else ""), "",
        summary_table(records, arms, spec["baseline"], primary, metrics[1:],
                      comparisons=[tuple(c) for c in spec.get("comparisons", [])]),
    ])
    if plot_curves(records, arms, primary, os.path.join(out, "curves.png"), title):
        text += f"\n\n![{primary.split('@')[0]}](curves.png)"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    write_tensorboard(out, records)
    return text


# ---- the results index and the README's results blocks ---------------------------------------
def write_index(root: str = "results") -> str:
    """results/index.md: a link to every table under `root` (sweeps and benchmarks)."""
    tables = sorted(p for p in glob.glob(os.path.join(root, "**", "table.md"), recursive=True))
    lines = ["# Results", "", "Every table here is written by the command in its header, from the run files beside it.", ""]
    for p in tables:
        rel = os.path.relpath(p, root)
        first = open(p).readline().strip()
        first = first[2:] if first.startswith("# ") else "a table"
        lines.append(f"- [{os.path.dirname(rel)}]({rel}): {first}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "index.md"), "w") as f:
        f.write(text)
    return text


BLOCK = re.compile(r"(<!-- results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def update_readme(readme: str, root: str = "results") -> list[str]:
    """Replace each `<!-- results: PATH -->...<!-- /results -->` block of the README with the file
    root/PATH (its '# ' title in bold). Returns the paths filled in; a missing file is an error."""
    text = open(readme).read()
    filled = []

    def fill(m):
        path = os.path.join(root, m.group("path"))
        if not os.path.exists(path):
            raise SweepError(f"README block names {path}, which does not exist; run its sweep first")
        body = "".join(f"**{l[2:].strip()}**\n" if l.startswith("# ") else l for l in open(path).readlines())
        here = os.path.dirname(path)  # the table's own relative links (its curves) seen from the README
        body = re.sub(r"\]\((?![a-z]+:|/)([^)]+)\)", lambda l: f"]({os.path.join(here, l.group(1))})", body)
        filled.append(m.group("path"))
        return m.group(1) + body.strip("\n") + "\n" + m.group(4)

    new = BLOCK.sub(fill, text)
    if new != text:
        with open(readme, "w") as f:
            f.write(new)
    return filled
