"""Sparse-bandit testbed: every scheme x tau x learning rate x seed in ONE compiled call.

    python -m experiments.bandit --schemes=linear,softmax --taus=0.25,0.5,1 --seeds=64 --arms=1000

Prints, per grid point, p(best arm) averaged over the run (the tuning criterion), final p(best),
the median steps to the first success and to p(best) > 0.9; then the comparison at equal learning
rate (`--ref_lr`) and at each scheme's tuned learning rate. Writes TensorBoard curves (one run
directory per grid point), a PNG plot and a markdown table under `--out`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import numpy as np

from envs import bandit as bandit_env
from rlsoft import bandit_sweep, weighting
from rlsoft.config import check, parse_flags
from rlsoft.logger import TensorBoardLogger, format_table
from rlsoft.sharding import make_mesh, shard_batch


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    schemes: tuple[str, ...] = ("linear", "softmax")
    taus: tuple[float, ...] = (0.25, 0.5, 1.0)
    lrs: tuple[float, ...] = (1.0, 3.0, 10.0)
    ref_lr: float = 3.0  # the "equal learning rate" of the comparison; must be one of lrs
    seeds: int = 64
    arms: int = 1000
    paying_arms: int = 1
    noise_std: float = 0.0
    group_size: int = 16
    steps: int = 1000
    optimizer: str = "sgd"
    seed: int = 0
    out: str = "runs/bandit"
    tensorboard: bool = True
    plot: bool = True
    log_every: int = 10

    def __post_init__(self):
        check(len(self.schemes) > 0, "schemes is empty; allowed: " + ", ".join(weighting.SCHEME_NAMES))
        for s in self.schemes:
            weighting.validate_scheme(s)
        check(len(set(self.schemes)) == len(self.schemes), f"schemes={','.join(self.schemes)} has duplicates")
        for t in self.taus:
            check(math.isfinite(t) and t > 0, f"taus contains {t}; temperatures must be finite and > 0")
        for lr in self.lrs:
            check(math.isfinite(lr) and lr > 0, f"lrs contains {lr}; learning rates must be finite and > 0")
        check(len(self.lrs) > 0, "lrs is empty")
        check(self.ref_lr in self.lrs, f"ref_lr={self.ref_lr} is not one of lrs={self.lrs}")
        check(self.seeds >= 1, f"seeds={self.seeds} is invalid; need >= 1")
        check(self.arms >= 2, f"arms={self.arms} is invalid; need >= 2")
        check(1 <= self.paying_arms < self.arms, f"paying_arms={self.paying_arms} is invalid; need 1..arms-1")
        check(math.isfinite(self.noise_std) and self.noise_std >= 0,
              f"noise_std={self.noise_std} is invalid; need a finite value >= 0")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.steps >= 1, f"steps={self.steps} is invalid; need >= 1")
        check(self.optimizer in bandit_sweep.OPTIMIZERS,
              f"optimizer={self.optimizer!r} is unknown; allowed: {', '.join(bandit_sweep.OPTIMIZERS)}")
        check(self.log_every >= 1, f"log_every={self.log_every} is invalid; need >= 1")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        check(self.out.strip() != "", "out is empty; give an output directory")
        if any(s in weighting.NEEDS_TAU for s in self.schemes):
            check(len(self.taus) > 0, "taus is empty but a scheme needs a temperature")
        for s in weighting.TAU_IS_FRACTION.intersection(self.schemes):
            for t in self.taus:
                weighting.validate_tau(t, s)  # e.g. softmax_ess: taus are fractions in (0, 1]


PRESETS = {
    "tiny": dict(seeds=8, arms=50, steps=100, lrs=(1.0, 3.0), ref_lr=1.0, log_every=5),
    "adam": dict(optimizer="adam", lrs=(0.03, 0.1, 0.3), ref_lr=0.1),
}


def run_sweep(cfg: BanditConfig, hps: bandit_sweep.HParams | None = None
              ) -> tuple[bandit_sweep.HParams, dict[str, np.ndarray]]:
    """Build the tasks and the grid (cfg's schemes x taus x lrs, or the C points `hps`), run the
    compiled sweep; metrics as numpy [C, S, T]."""
    root = jax.random.PRNGKey(cfg.seed)
    seed_keys = jax.random.split(root, cfg.seeds)
    # Named streams per seed: the task (which arm pays) and the policy's sampling.
    streams = jax.vmap(lambda k: jax.random.split(k, 2))(seed_keys)
    env_keys, policy_keys = streams[:, 0], streams[:, 1]
    envs = bandit_env.make_bandits(env_keys, cfg.arms, cfg.paying_arms, 1.0, cfg.noise_std)
    mesh = make_mesh()
    if cfg.seeds % mesh.size == 0:  # seeds are independent: split them across the devices
        envs, policy_keys = shard_batch((envs, policy_keys), mesh)
    if hps is None:
        hps = bandit_sweep.make_hparams(cfg.schemes, cfg.taus, cfg.lrs)
    metrics = bandit_sweep.sweep(
        hps, envs, policy_keys,
        num_actions=cfg.arms, num_steps=cfg.steps, reward_fn=bandit_env.reward_fn_for(cfg.noise_std),
        values_fn=bandit_env.arm_values, group_size=cfg.group_size, optimizer=cfg.optimizer,
        schemes=bandit_sweep.schemes_in(hps),  # only the grid's schemes are compiled
    )
    return hps, jax.tree.map(np.asarray, metrics)


def grid_labels(hps: bandit_sweep.HParams) -> list[dict]:
    out = []
    for idx, tau, lr in zip(np.asarray(hps.scheme_index), np.asarray(hps.tau), np.asarray(hps.learning_rate)):
        name = weighting.SCHEME_NAMES[int(idx)]
        label = name if math.isnan(tau) else f"{name} tau={tau:g}"
        out.append(dict(scheme=name, tau=float(tau), lr=float(lr), label=label))
    return out


def summarize(cfg: BanditConfig, hps, metrics) -> list[dict]:
    """One row per grid point: means over seeds (medians for the step counts)."""
    # Draws until a best arm is first sampled (1-based); updates until p(best) first exceeds 0.9.
    # Runs that never get there count as `steps` (censored): see reached_p90.
    first_success = np.asarray(bandit_sweep.first_step(metrics["train/success"] > 0)) + 1
    p_best = metrics["eval/p_best"]
    to_90 = np.asarray(bandit_sweep.first_step(p_best > 0.9))
    rows = []
    for c, lab in enumerate(grid_labels(hps)):
        informative = metrics["train/weights/zero_std"][c] == 0

        def over_informative(stat):
            return float(metrics["train/weights/" + stat][c][informative].mean()) if informative.any() else math.nan

        rows.append(dict(
            **lab,
            p_best_auc=float(p_best[c].mean()),
            p_best_final=float(p_best[c, :, -1].mean()),
            steps_to_first_success=float(np.median(first_success[c])),
            steps_to_p90=float(np.median(to_90[c])),
            reached_p90=float(np.mean(to_90[c] < cfg.steps)),
            effective_n=over_informative("effective_n"),
            max_weight=over_informative("max_weight"),
        ))
    return rows


def tuned_rows(rows: list[dict]) -> list[dict]:
    """For each scheme (and tau), the learning rate with the highest mean p(best) over the run."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["label"] not in best or r["p_best_auc"] > best[r["label"]]["p_best_auc"]:
            best[r["label"]] = r
    return list(best.values())


def write_tensorboard(cfg: BanditConfig, hps, metrics) -> None:
    """One run directory per grid point; the curves carry every testbed's names (`logged_curves`)."""
    curves = jax.tree.map(np.asarray, bandit_sweep.logged_curves(metrics))
    for c, lab in enumerate(grid_labels(hps)):
        run_name = f"{lab['label'].replace(' ', '_')}_lr={lab['lr']:g}"
        with TensorBoardLogger(os.path.join(cfg.out, "tb"), run_name) as tb:
            tb.scalar_series({n: v[c] for n, v in curves.items()}, every=cfg.log_every)


def plot(cfg: BanditConfig, hps, metrics, rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = [(f"equal learning rate ({cfg.ref_lr:g})", [r for r in rows if r["lr"] == cfg.ref_lr]),
              ("tuned learning rate", tuned_rows(rows))]
    index = {(r["label"], r["lr"]): c for c, r in enumerate(rows)}
    for ax, (title, chosen) in zip(axes, panels):
        for r in chosen:
            curve = metrics["eval/p_best"][index[(r["label"], r["lr"])]].mean(axis=0)
            ax.plot(curve, label=f"{r['label']} (lr={r['lr']:g})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"p(best arm), mean of {cfg.seeds} seeds")
    fig.suptitle(f"{cfg.arms} arms, {cfg.paying_arms} paying, G={cfg.group_size}, {cfg.optimizer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ["label", "lr", "p_best_auc", "p_best_final", "steps_to_first_success", "steps_to_p90",
           "reached_p90", "effective_n", "max_weight"]


def main(argv=None) -> dict:
    cfg = parse_flags(BanditConfig, argv, presets=PRESETS, prog="python -m experiments.bandit")
    os.makedirs(cfg.out, exist_ok=True)
    start = time.perf_counter()
    hps, metrics = run_sweep(cfg)
    seconds = time.perf_counter() - start
    runs = int(hps.learning_rate.shape[0]) * cfg.seeds
    print(f"{runs} runs x {cfg.steps} steps in one compiled call: {seconds:.1f} s "
          f"({runs * cfg.steps / seconds:,.0f} run-steps/s, compile included)")
    rows = summarize(cfg, hps, metrics)
    equal = [r for r in rows if r["lr"] == cfg.ref_lr]
    tuned = tuned_rows(rows)
    text = "\n\n".join([
        "## All grid points\n\n" + format_table(rows, COLUMNS),
        f"## Equal learning rate ({cfg.ref_lr:g})\n\n" + format_table(equal, COLUMNS),
        "## Tuned learning rate (best mean p(best) over the run)\n\n" + format_table(tuned, COLUMNS),
    ])
    print(text)
    with open(os.path.join(cfg.out, "bandit.md"), "w") as f:
        f.write(text + "\n")
    if cfg.tensorboard:
        write_tensorboard(cfg, hps, metrics)
    if cfg.plot:
        plot(cfg, hps, metrics, rows, os.path.join(cfg.out, "bandit.png"))
    print(f"wrote {cfg.out}/bandit.md" + (f", {cfg.out}/bandit.png" if cfg.plot else "")
          + (f", {cfg.out}/tb/" if cfg.tensorboard else ""))
    return dict(config=cfg, rows=rows, equal=equal, tuned=tuned, metrics=metrics, hparams=hps)


if __name__ == "__main__":
    main()
