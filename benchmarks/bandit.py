"""Sparse-bandit throughput: the compiled JAX sweep against two straightforward NumPy versions.

    python -m benchmarks.bandit                      # 1,000 seeds x K=1,000 arms x 1,000 steps, G=16
    python -m benchmarks.bandit --seeds=100 --steps=200   # quicker

The same algorithm everywhere: uniform start, inverse-CDF sampling of G arms, linear (GRPO)
weights, SGD on the weighted log-likelihood, and the same per-step metrics (p(best), expected and
sampled reward, loss, grad norm, max weight, weight entropy, effective N).
  jax       one jitted call: lax.scan over steps, vmap over seeds (rlsoft.bandit_sweep.sweep)
  numpy_a   NumPy vectorised over seeds, one Python iteration per step
  numpy_b   NumPy with a Python loop over seeds (timed on a subset: its cost is linear in
            seeds x steps, so seed-steps/s extrapolates)
Prints one JSON line of figures, then a table. Throughput is seed-steps per second.
"""
from __future__ import annotations

import os

# One host device per core, so the seed axis can be split across the cores (set before JAX starts;
# an explicit XLA_FLAGS wins).
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={os.cpu_count() or 1}")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np

from envs import bandit as bandit_env
from rlsoft import bandit_sweep
from rlsoft.config import check, check_finite, parse_flags
from rlsoft.logger import format_table
from rlsoft.sharding import make_mesh, shard_batch


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    seeds: int = 1000
    arms: int = 1000
    steps: int = 1000
    group_size: int = 16
    lr: float = 3.0
    loop_seeds: int = 50  # numpy_b subset
    loop_steps: int = 400
    seed: int = 0

    def __post_init__(self):
        for name in ("seeds", "arms", "steps", "group_size", "loop_seeds", "loop_steps"):
            check(getattr(self, name) >= 2, f"{name}={getattr(self, name)} is invalid; need >= 2")
        check_finite(self.lr > 0, "lr", self.lr, "a finite value > 0")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")


def _paying_arms(cfg: BenchConfig) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    return rng.integers(0, cfg.arms, size=cfg.seeds)


def _linear_weights(r: np.ndarray) -> np.ndarray:
    c = r - r.mean(axis=-1, keepdims=True)
    return c / (r.std(axis=-1, keepdims=True) + 1e-4)


def _stats(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.abs(w)
    p = a / np.maximum(a.sum(-1, keepdims=True), 1e-30)
    ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    return w.max(-1), ent, 1.0 / np.maximum((p * p).sum(-1), 1e-30)


def numpy_vectorised(cfg: BenchConfig, steps: int) -> dict[str, np.ndarray]:
    """(a) All seeds as one [S, K] array; one Python iteration per step."""
    s, k, g = cfg.seeds, cfg.arms, cfg.group_size
    rng = np.random.default_rng(cfg.seed + 1)
    best = _paying_arms(cfg)
    payouts = np.zeros((s, k), np.float32)
    payouts[np.arange(s), best] = 1.0
    logits = np.zeros((s, k), np.float32)
    rows = np.arange(s)[:, None]
    offsets = np.arange(s, dtype=np.float64)[:, None]
    p_best = np.empty((steps, s), np.float32)
    for t in range(steps):
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        cdf = np.cumsum(probs, 1)
        u = rng.random((s, g)) * cdf[:, -1:]
        # One searchsorted over all rows: shift row i's CDF and draws by i (float64 keeps precision).
        flat = np.searchsorted((cdf + offsets).ravel(), (u + offsets).ravel(), side="right")
        actions = np.minimum(flat.reshape(s, g) - rows * k, k - 1)
        r = payouts[rows, actions]
        w = _linear_weights(r)
        logp = np.log(probs[rows, actions])
        loss = -(w * logp).mean(1)
        counts = np.bincount((actions + rows * k).ravel(), weights=w.ravel(), minlength=s * k).reshape(s, k)
        grad = -(counts - w.sum(1, keepdims=True) * probs) / g
        logits -= (cfg.lr * grad).astype(np.float32)
        p_best[t] = probs[np.arange(s), best]
        _ = (payouts * probs).sum(1), r.mean(1), (actions == best[:, None]).sum(1), loss
        _ = np.sqrt((grad * grad).sum(1)), _stats(w)
    return dict(p_best=p_best.T)


def numpy_loop(cfg: BenchConfig, seeds: int, steps: int) -> dict[str, np.ndarray]:
    """(b) A Python loop over seeds, each a plain 1-D NumPy REINFORCE loop."""
    k, g = cfg.arms, cfg.group_size
    rng = np.random.default_rng(cfg.seed + 2)
    best = _paying_arms(cfg)[:seeds]
    p_best = np.empty((seeds, steps), np.float32)
    for i in range(seeds):
        payouts = np.zeros(k, np.float32)
        payouts[best[i]] = 1.0
        logits = np.zeros(k, np.float32)
        for t in range(steps):
            z = np.exp(logits - logits.max())
            probs = z / z.sum()
            cdf = np.cumsum(probs)
            actions = np.minimum(np.searchsorted(cdf, rng.random(g) * cdf[-1], side="right"), k - 1)
            r = payouts[actions]
            w = _linear_weights(r)
            loss = -(w * np.log(probs[actions])).mean()
            grad = -(np.bincount(actions, weights=w, minlength=k) - w.sum() * probs) / g
            logits -= (cfg.lr * grad).astype(np.float32)
            p_best[i, t] = probs[best[i]]
            _ = payouts @ probs, r.mean(), (actions == best[i]).sum(), loss, np.sqrt(grad @ grad), _stats(w)
    return dict(p_best=p_best)


def jax_sweep(cfg: BenchConfig) -> tuple[dict[str, np.ndarray], float, float]:
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
    best = jax.numpy.asarray(_paying_arms(cfg))
    payouts = jax.nn.one_hot(best, cfg.arms, dtype=jax.numpy.float32)
    envs = bandit_env.Bandit(payouts, jax.numpy.zeros((cfg.seeds,), jax.numpy.float32))
    mesh = make_mesh()
    if cfg.seeds % mesh.size == 0:  # independent seeds: one shard per host device (core)
        envs, keys = shard_batch((envs, keys), mesh)
    hps = bandit_sweep.make_hparams(["linear"], (), (cfg.lr,))
    kw = dict(num_actions=cfg.arms, num_steps=cfg.steps, reward_fn=bandit_env.pull_noiseless,
              values_fn=bandit_env.arm_values, group_size=cfg.group_size, optimizer="sgd")
    start = time.perf_counter()
    compiled = bandit_sweep.sweep.lower(hps, envs, keys, **kw).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = jax.block_until_ready(compiled(hps, envs, keys))
    run_s = time.perf_counter() - start
    return {k: np.asarray(v)[0] for k, v in metrics.items()}, compile_s, run_s


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.bandit")
    seed_steps = cfg.seeds * cfg.steps
    jm, compile_s, jax_s = jax_sweep(cfg)
    start = time.perf_counter()
    am = numpy_vectorised(cfg, cfg.steps)
    a_s = time.perf_counter() - start
    loop_seeds, loop_steps = min(cfg.loop_seeds, cfg.seeds), min(cfg.loop_steps, cfg.steps)
    start = time.perf_counter()
    bm = numpy_loop(cfg, loop_seeds, loop_steps)
    b_s = time.perf_counter() - start
    rate = {"jax": seed_steps / jax_s, "numpy_a": seed_steps / a_s, "numpy_b": loop_seeds * loop_steps / b_s}
    figures = {
        "workload": dict(seeds=cfg.seeds, arms=cfg.arms, steps=cfg.steps, group_size=cfg.group_size),
        "seed_steps_per_s": {k: round(v) for k, v in rate.items()},
        "seconds": {"jax_compile": round(compile_s, 2), "jax": round(jax_s, 2), "numpy_a": round(a_s, 2),
                    "numpy_b_subset": round(b_s, 2), "numpy_b_subset_size": [loop_seeds, loop_steps]},
        "ratio_jax_over_numpy_a": round(rate["jax"] / rate["numpy_a"], 2),
        "ratio_jax_over_numpy_b": round(rate["jax"] / rate["numpy_b"], 1),
        # Same algorithm, different random streams: the learning curves agree in distribution.
        "final_p_best_mean": {"jax": float(jm["eval/p_best"][:, -1].mean()),
                              "numpy_a": float(am["p_best"][:, -1].mean())},
        "p_best_at_loop_steps": {"jax": float(jm["eval/p_best"][:, loop_steps - 1].mean()),
                                 "numpy_a": float(am["p_best"][:, loop_steps - 1].mean()),
                                 "numpy_b": float(bm["p_best"][:, -1].mean())},
        "jax_devices": jax.device_count(),
    }
    print(json.dumps(figures))
    print(format_table([
        dict(impl="jax (scan + vmap, one call, seeds split over host devices)", seed_steps_per_s=rate["jax"], vs_jax=1.0),
        dict(impl="numpy (a) vectorised over seeds", seed_steps_per_s=rate["numpy_a"], vs_jax=rate["numpy_a"] / rate["jax"]),
        dict(impl="numpy (b) loop over seeds", seed_steps_per_s=rate["numpy_b"], vs_jax=rate["numpy_b"] / rate["jax"]),
    ]))
    return figures


if __name__ == "__main__":
    main()
