"""Seed 001, Phase 2: how each weighting scheme shares credit in a sparse-reward group (no training).

    python -m experiments.weight_analysis [--taus=1,0.5,0.1] [--sparsity_tau=0.5] [--out=DIR]

Three analyses, all of them pure calls into rlsoft.weighting:
  1. The seed's group (1 correct sample at R = 1.1, 7 wrong: three at 0.1, four at 0): for every
     scheme, the weight on the correct sample, effective N, max weight and entropy, and the weight on
     the correct sample relative to linear (GRPO). Schemes with a temperature are shown at each tau.
  2. Tau sweep of the temperature schemes over a log-spaced grid, with the seed's tau = "auto" marked.
  3. Sparsity sweep: one correct sample in a group of G, for every scheme at one tau.
Writes weight_analysis.md (every table) and weight_analysis.png (four panels) under --out.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlsoft import weighting, weighting_recent
from rlsoft.config import check, parse_flags
from rlsoft.logger import format_table

PROG = "python -m experiments.weight_analysis"

CORRECT = 1.1  # the seed's reward of a correct, well-formatted answer
SEED_GROUP = (CORRECT, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0)
# Sparsity sweep: the G - 1 wrong samples cycle through "nothing" (0) and "format-only" (0.1), the
# same two kinds of failure as the seed's group. Starting the cycle at 0 makes G = 8 exactly the
# seed's group (four 0s, three 0.1s), so that column can be checked against analysis 1.
WRONG_CYCLE = (0.0, 0.1)

# The seeds' reward-only schemes; the 2025-26 ones (rlsoft.weighting_recent) need log-probs or read
# tau as a fraction, and are compared in the bandit instead.
SCHEMES = tuple(n for n in weighting.SCHEME_NAMES if n not in weighting_recent.SCHEMES)
TAU_SCHEMES = tuple(n for n in SCHEMES if n in weighting.NEEDS_TAU)
# What each temperature scheme feeds into its softmax; "auto" tau is half the range of THIS input,
# so quantile_softmax's auto tau lives on the quantile scale, not the reward scale.
_SOFTMAX_INPUT = {"softmax": lambda r: r, "softmax_centered": lambda r: r,
                  "quantile_softmax": weighting.quantile}


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


@dataclasses.dataclass(frozen=True)
class Config:
    taus: tuple[float, ...] = (1.0, 0.5, 0.1)  # temperatures of the main table
    sweep_min: float = 0.05
    sweep_max: float = 5.0
    sweep_points: int = 21  # log-spaced: 10 per decade over 0.05..5, so 0.5 is on the grid
    group_sizes: tuple[int, ...] = (4, 8, 16, 32, 64)
    sparsity_tau: float = 0.5  # tau of the temperature schemes in the sparsity sweep
    out: str = "runs/weight_analysis"
    plot: bool = True

    def __post_init__(self):
        check(len(self.taus) > 0, "taus is empty; give at least one, e.g. --taus=1,0.5,0.1")
        check(all(_positive(t) for t in self.taus),
              f"taus={self.taus} is invalid; each must be a finite float > 0")
        check(len(set(self.taus)) == len(self.taus), f"taus={self.taus} has duplicates")
        check(_positive(self.sweep_min), f"sweep_min={self.sweep_min} is invalid; must be a finite float > 0")
        check(_positive(self.sweep_max) and self.sweep_max > self.sweep_min,
              f"sweep_max={self.sweep_max} is invalid; must be finite and > sweep_min={self.sweep_min}")
        check(2 <= self.sweep_points <= 1000,
              f"sweep_points={self.sweep_points} is invalid; allowed: 2..1000")
        check(len(self.group_sizes) > 0, "group_sizes is empty; give at least one, e.g. --group_sizes=4,8,16")
        # The cap keeps the O(G^2) average-rank computation of the rank schemes light.
        check(all(2 <= g <= 1024 for g in self.group_sizes),
              f"group_sizes={self.group_sizes} is invalid; each must be in 2..1024")
        check(len(set(self.group_sizes)) == len(self.group_sizes),
              f"group_sizes={self.group_sizes} has duplicates")
        check(_positive(self.sparsity_tau),
              f"sparsity_tau={self.sparsity_tau} is invalid; must be a finite float > 0")
        check(self.out.strip() != "", "out is empty; give an output directory")


PRESETS = {"tiny": {"sweep_points": 5, "group_sizes": (4, 8, 16)}}


# --------------------------------------------------------------------------------------------
# Computation: one compiled call per group covers every scheme at every tau.


@jax.jit
def _grid_stats(rewards: jax.Array, taus: jax.Array) -> dict[str, jax.Array]:
    """weight_stats [T, S] of every scheme S at every tau T for one group `rewards: [G]`.

    compute_weights_by_index takes the scheme as a traced index, so vmapping over it batches all
    schemes into one call; schemes without a temperature ignore tau (identical along T). Stats are
    jitted together with the weights: one compile per group size instead of many eager dispatches.
    """
    idx = jnp.arange(len(SCHEMES))
    per_tau = lambda t: jax.vmap(lambda i: weighting.compute_weights_by_index(rewards, i, t, among=SCHEMES))(idx)
    w = jax.vmap(per_tau)(taus)
    return weighting.weight_stats(w, jnp.broadcast_to(rewards, w.shape))


def _stats(rewards, taus) -> dict[str, np.ndarray]:
    """`_grid_stats` as numpy. The correct sample is the group's unique best, so weight_on_best is
    exactly the weight on the correct sample."""
    st = _grid_stats(jnp.asarray(rewards, jnp.float32), jnp.asarray(taus, jnp.float32))
    return {k: np.asarray(v) for k, v in st.items()}


def sparse_group(g: int) -> np.ndarray:
    """One correct sample followed by G - 1 wrong ones cycling through WRONG_CYCLE."""
    wrong = [WRONG_CYCLE[i % len(WRONG_CYCLE)] for i in range(g - 1)]
    return np.asarray([CORRECT] + wrong, np.float32)


def seed_table(cfg: Config) -> list[dict]:
    st = _stats(SEED_GROUP, cfg.taus)
    lin = float(st["weight_on_best"][0, SCHEMES.index("linear")])
    rows = []
    for s, name in enumerate(SCHEMES):
        for t in range(len(cfg.taus)) if name in TAU_SCHEMES else [0]:
            w = float(st["weight_on_best"][t, s])
            rows.append({
                "scheme": name,
                "tau": cfg.taus[t] if name in TAU_SCHEMES else None,
                "weight_on_correct": w,
                "effective_n": float(st["effective_n"][t, s]),
                "max_weight": float(st["max_weight"][t, s]),
                "entropy": float(st["entropy"][t, s]),
                "vs_linear": w / lin,
            })
    return rows


def sweep_taus(cfg: Config) -> np.ndarray:
    return np.geomspace(cfg.sweep_min, cfg.sweep_max, cfg.sweep_points)


def tau_sweep(cfg: Config) -> list[dict]:
    taus = sweep_taus(cfg)
    st = _stats(SEED_GROUP, taus)
    return [
        {"scheme": name, "tau": float(tau),
         "weight_on_correct": float(st["weight_on_best"][t, SCHEMES.index(name)]),
         "effective_n": float(st["effective_n"][t, SCHEMES.index(name)])}
        for name in TAU_SCHEMES for t, tau in enumerate(taus)
    ]


@jax.jit
def _auto_stats(r: jax.Array) -> dict[str, tuple[jax.Array, dict[str, jax.Array]]]:
    """Per temperature scheme: (resolved tau, weight_stats) under the seed's tau = "auto" rule,
    evaluated by rlsoft itself rather than re-derived here."""
    out = {}
    for name in TAU_SCHEMES:
        w = weighting.compute_weights(r, name, tau="auto")
        # The resolved value is only needed to place the marker on the tau axis.
        out[name] = (weighting.resolve_tau(_SOFTMAX_INPUT[name](r), "auto"), weighting.weight_stats(w, r))
    return out


def tau_auto(cfg: Config) -> list[dict]:
    del cfg
    res = _auto_stats(jnp.asarray(SEED_GROUP, jnp.float32))
    # Iterate TAU_SCHEMES, not `res`: jit returns dicts with their keys sorted.
    return [{"scheme": name, "tau": float(res[name][0]),
             "weight_on_correct": float(res[name][1]["weight_on_best"]),
             "effective_n": float(res[name][1]["effective_n"])} for name in TAU_SCHEMES]


def sparsity_sweep(cfg: Config) -> list[dict]:
    rows = []
    for g in sorted(cfg.group_sizes):
        st = _stats(sparse_group(g), [cfg.sparsity_tau])
        rows += [{"scheme": name, "G": g, "weight_on_correct": float(st["weight_on_best"][0, s]),
                  "effective_n": float(st["effective_n"][0, s])} for s, name in enumerate(SCHEMES)]
    return rows


def analyse(cfg: Config) -> dict[str, list[dict]]:
    return {"seed": seed_table(cfg), "tau_sweep": tau_sweep(cfg), "tau_auto": tau_auto(cfg),
            "sparsity": sparsity_sweep(cfg)}


# --------------------------------------------------------------------------------------------
# Rendering.


def _two_decimals(rows: list[dict]) -> list[dict]:
    # The seed quotes 2 decimals (2.33 / 6.38); showing the same precision lets the main table be
    # checked against it by eye. format_table prints strings as they are.
    # round(.) + 0.0 turns -0.0 (e.g. best_of_n's entropy) into 0.0 so it prints without a sign.
    fmt = lambda v: f"{round(v, 2) + 0.0:.2f}" if isinstance(v, float) else "-" if v is None else v
    return [{k: fmt(v) for k, v in r.items()} for r in rows]


def _pivot(rows: list[dict], index: str, column: str, value: str, fmt=lambda c: str(c)) -> list[dict]:
    """Long rows -> one row per `index`, one column per `column` value."""
    out: dict = {}
    for r in rows:
        out.setdefault(r[index], {index: r[index]})[fmt(r[column])] = r[value]
    return list(out.values())


def render(cfg: Config, res: dict[str, list[dict]]) -> str:
    seed_cols = ["scheme", "tau", "weight_on_correct", "effective_n", "max_weight", "entropy", "vs_linear"]
    sweep = _pivot(res["tau_sweep"], "tau", "scheme", "weight_on_correct", lambda s: f"{s} w")
    for r, e in zip(sweep, _pivot(res["tau_sweep"], "tau", "scheme", "effective_n", lambda s: f"{s} n_eff")):
        r.update(e)
    sweep_cols = ["tau"] + [f"{s} {m}" for s in TAU_SCHEMES for m in ("w", "n_eff")]
    g_col = lambda g: f"G={g}"
    parts = [
        "# Weight analysis (seed 001, Phase 2)",
        f"Group: rewards {list(SEED_GROUP)} (1 correct at {CORRECT}, 7 wrong). "
        "effective_n = 1 / sum p^2 with p = |w| / sum|w|; entropy of the same p; "
        "vs_linear = weight on correct / linear (GRPO)'s.",
        "## Weight on the correct sample, per scheme",
        format_table(_two_decimals(res["seed"]), seed_cols),
        f"## Tau sweep (w = weight on correct, n_eff = effective_n; {cfg.sweep_points} log-spaced taus)",
        format_table(sweep, sweep_cols),
        "## tau = \"auto\" (half the range of the softmax input; "
        "quantile_softmax's is on the quantile scale)",
        format_table(res["tau_auto"], ["scheme", "tau", "weight_on_correct", "effective_n"]),
        f"## Sparsity sweep: weight on correct vs G (tau = {cfg.sparsity_tau} for {', '.join(TAU_SCHEMES)})",
        f"1 correct sample at {CORRECT}; the G - 1 wrong ones alternate 0 (nothing) and 0.1 (format only), "
        "starting at 0, so G = 8 is the seed's group.",
        format_table(_pivot(res["sparsity"], "scheme", "G", "weight_on_correct", g_col)),
        "## Sparsity sweep: effective_n vs G",
        "linear, drgrpo and rloo are all proportional to r - mean, hence the same effective_n.",
        format_table(_pivot(res["sparsity"], "scheme", "G", "effective_n", g_col)),
    ]
    return "\n\n".join(parts) + "\n"


def plot(cfg: Config, res: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: only files are written
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colors = dict(zip(SCHEMES, plt.cm.tab10(np.linspace(0, 1, 10))))
    lin = next(r for r in res["seed"] if r["scheme"] == "linear")
    for ax, key, label in ((axes[0, 0], "weight_on_correct", "weight on correct"),
                           (axes[0, 1], "effective_n", "effective N")):
        for name in TAU_SCHEMES:
            rows = [r for r in res["tau_sweep"] if r["scheme"] == name]
            ax.plot([r["tau"] for r in rows], [r[key] for r in rows], "-", color=colors[name], label=name)
            auto = next(r for r in res["tau_auto"] if r["scheme"] == name)
            ax.plot(auto["tau"], auto[key], "*", ms=14, mec="k", color=colors[name])
        ax.axhline(lin[key], ls="--", color="gray", label=f"linear (GRPO) = {lin[key]:.2f}")
        ax.plot([], [], "*", ms=12, mec="k", color="w", label='tau = "auto"')
        ax.set(xscale="log", xlabel="tau (quantile_softmax's is on the quantile scale)", ylabel=label,
               title=f"{label} vs tau (seed group, G = 8)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9)
    groups = sorted(cfg.group_sizes)
    for ax, key, label in ((axes[1, 0], "weight_on_correct", "weight on correct"),
                           (axes[1, 1], "effective_n", "effective N")):
        for name in SCHEMES:
            rows = [r for r in res["sparsity"] if r["scheme"] == name]
            ax.plot([r["G"] for r in rows], [r[key] for r in rows], marker="o", ms=4, color=colors[name],
                    label=name, ls="--" if name in TAU_SCHEMES else "-")
        values = [r[key] for r in res["sparsity"]]
        # Log y when possible: best_of_n's weight grows like G while raw's stays at 1.1.
        log_y = min(values) > 0
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel="group size G",
               ylabel=label, title=f"{label} vs G (1 correct; tau = {cfg.sparsity_tau} where needed)")
        ax.set_xticks(groups, [str(g) for g in groups])
        if log_y:  # plain power-of-two ticks read better than 10^0, 10^1 on a 1..64 range
            ticks = [2.0**k for k in range(-10, 11) if min(values) / 2 <= 2.0**k <= max(values) * 2]
            ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    axes[1, 0].legend(fontsize=8, ncol=2)
    # These three are all proportional to r - mean, so their |w| shares coincide and the curves overlap.
    axes[1, 1].text(0.02, 0.97, "linear = drgrpo = rloo (all proportional to r - mean)",
                    transform=axes[1, 1].transAxes, va="top", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the analysis; returns {"seed", "tau_sweep", "tau_auto", "sparsity": rows, "paths": {...}}."""
    cfg = parse_flags(Config, argv, presets=PRESETS, prog=PROG)
    start = time.perf_counter()
    res = analyse(cfg)
    text = render(cfg, res)
    os.makedirs(cfg.out, exist_ok=True)
    paths = {"md": os.path.join(cfg.out, "weight_analysis.md")}
    with open(paths["md"], "w") as f:
        f.write(text)
    if cfg.plot:
        paths["png"] = os.path.join(cfg.out, "weight_analysis.png")
        plot(cfg, res, paths["png"])
    print(text)
    for p in paths.values():
        print(f"wrote {p}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return {**res, "paths": paths}


if __name__ == "__main__":
    main()
