"""Thinking-token testbed throughput: the compiled population against the original's PyTorch loop.

    python -m benchmarks.think                        # P = 8, 10 steps / call, 3 rounds: ~5 min on 2 busy cores
    python -m benchmarks.think --rounds=1 --chunk=2 --torch_steps=2 --member=false      # quicker

  jax_population  the step experiments.think runs: rlsoft.think_testbed.ThinkTestbed over
                  experiments.think.build(cfg) with --population=P, i.e. rlsoft.think_loop's
                  make_train_chunk: `chunk` steps of all P members as one jitted, vmapped lax.scan
                  (sample G thoughts per question token by token, reward = the blind answerer's
                  log p(correct) on the device, per-group whitening ("linear"), PPO surrogate +
                  entropy bonus for the thinker, cross-entropy on the hand-made "super" thoughts for
                  the answerer, AdamW with the experiment's default global-norm clip 1, the metrics).
                  Timed per call (`ThinkTestbed.train`, until the state and metrics are ready).
  jax_member      the same with P = 1 (--member=false skips it).
  torch           benchmarks.think_torch.TorchThinkStep: the original's style, a Python loop per
                  step (and per thought position), no KV cache, `.item()` on both losses every
                  step; `torch_steps` steps per round.
The workload is the one of both sides: modulus M, k operands, V thought classes, T fixed-length
thoughts, blind answerer, super, B questions x G sampled thoughts, two GPTs of d_model / n_layer /
n_head, AdamW (lr, weight decay), entropy coefficient.

Implementations are timed interleaved (benchmarks.timing), one call of each per round, each
round followed by the matmul probes (same load). Rates are per median round. A "seed-step" is one
member's training step: the population does P per step. `speedup_population_vs_torch` is the
median over rounds of (population seed-steps/s) / (torch steps/s) within the round.

FLOPs of one member's step (multiply-adds x 2, matmuls and attention only: embeddings,
LayerNorms, softmaxes, GELU and the optimizer are left out), with the JAX model's shapes:

    fwd(rows, n, h) = rows * (n * L * (24 d^2 + 4 n d) + h * 2 d W)
        n tokens per row, L layers (qkv 6 d^2, proj 2 d^2, MLP 16 d^2 per token and layer;
        QK^T and AV 4 n d), the LM head (d -> W = M + V + 2) on h positions
    thinker     n = k + T - 1 (question + all thoughts but the last), h = T
    answerer    n = T + 1 (blind: thoughts + ASK), h = 1 (the last position)
    torch step = T * fwd_th(B G)    sampling: one teacher-forced pass per thought position
         + 3 * fwd_th(B G)          the thinker's forward + backward (backward = 2 x forward)
         + fwd_ans(B G)             the reward: the answerer on every sampled sequence
         + 3 * fwd_ans(B)           the answerer's forward + backward on the hand-made thoughts
    JAX step: the same, but the first thought is sampled from one pass per question,
         fwd_th(B) + (T - 1) fwd_th(B G), and the blind answerer's reward is one pass over the
         V^T possible sequences, fwd_ans(V^T), when 2 V^T <= B G (rlsoft.think_loop)

(torch's shapes differ slightly: it grows the sequence during sampling and unembeds every
position), so achieved GFLOP/s = each side's FLOPs x its seed-steps/s. They
are compared with the f32 matmul rate measured in the same run, after every round: a jitted
[n x n] @ [n x n] (`matmul_n`) and the model's own MLP matmul [B G (k+T-1), d] @ [d, 4d].

Prints one JSON line of figures, then a table; --out=FILE.json also writes the figures there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

# torch's OpenMP workers spin while they wait, which on a shared machine slows torch badly
# (benchmarks/rollout.py); passive waiting must be set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import first_calls, interleaved, write_json
from experiments import think as think_exp
from rlsoft.config import check, check_finite, parse_flags
from rlsoft.driver import stream_keys
from rlsoft.logger import format_table
from rlsoft.optim import OptimizerConfig
from rlsoft.think_testbed import ThinkTestbed

PROG = "python -m benchmarks.think"
PROBE_CALLS = 5  # matmul probe calls after each round (the median of all is reported)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    # The workload, both sides (benchmarks.think_torch.TorchThinkConfig's defaults).
    modulus: int = 100
    num_operands: int = 2
    thought_vocab: int = 10
    max_thoughts: int = 2
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    batch_size: int = 64
    group_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    entropy_coef: float = 0.01
    # The timing.
    population: int = 8  # P members in one compiled program
    chunk: int = 10  # steps per compiled call (~0.3 s a member-step on 2 busy CPU cores: 10 is plenty)
    member: bool = True  # also time one member (P = 1)
    torch_steps: int = 5  # torch steps per round
    rounds: int = 3  # interleaved rounds: one call of each implementation, then the matmul probes
    threads: int = 0  # torch.set_num_threads; 0: all cores (XLA:CPU uses all cores)
    matmul_n: int = 1024
    seed: int = 0
    out: str = ""  # also write the figures to this JSON file

    def __post_init__(self):
        check(self.population >= 1, f"population={self.population} is invalid; need >= 1")
        for name in ("chunk", "torch_steps", "rounds", "matmul_n"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.threads >= 0, f"threads={self.threads} is invalid; need >= 0 (0: all cores)")
        check(0 <= self.seed < 2**31 - self.population,
              f"seed={self.seed} is invalid; need 0 <= seed < 2**31 - population")
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        # Both sides' own checks: sizes, digits of the hand-made thoughts, weight decay, entropy.
        self.jax_config(self.population)
        self.torch_config()

    def jax_config(self, population: int) -> think_exp.ThinkExperimentConfig:
        opt = OptimizerConfig(learning_rate=self.learning_rate, weight_decay=self.weight_decay)
        return think_exp.ThinkExperimentConfig(
            modulus=self.modulus, num_operands=self.num_operands, thought_vocab=self.thought_vocab,
            max_thoughts=self.max_thoughts, fixed_length=True, blind=True, super=True, scheme="linear",
            search="sample", batch_size=self.batch_size, group_size=self.group_size, entropy_coef=self.entropy_coef,
            d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head, thinker=opt, answerer=opt,
            population=population, chunk=self.chunk, steps=self.chunk, seed=self.seed, progress=False,
            test_questions=16, train_questions=16)  # eval sets: not timed

    def torch_config(self):
        from benchmarks.think_torch import TorchThinkConfig  # imports torch (after OMP_WAIT_POLICY is set)

        return TorchThinkConfig(
            modulus=self.modulus, n_operands=self.num_operands, n_thoughts=self.thought_vocab,
            think_len=self.max_thoughts, d_model=self.d_model, n_layers=self.n_layer, n_heads=self.n_head,
            batch_size=self.batch_size, group_size=self.group_size, lr=self.learning_rate,
            weight_decay=self.weight_decay, entropy_coef=self.entropy_coef, threads=self.threads)


def flops_per_step(cfg: BenchConfig, impl: str = "torch") -> dict[str, int]:
    """One member's step, by part, of `impl` "torch" or "jax" (module docstring)."""
    d, layers, k, t = cfg.d_model, cfg.n_layer, cfg.num_operands, cfg.max_thoughts
    width = cfg.modulus + cfg.thought_vocab + 2
    rows = cfg.batch_size * cfg.group_size

    def fwd(r, n, h):
        return r * (n * layers * (24 * d * d + 4 * n * d) + h * 2 * d * width)

    sample = t * fwd(rows, k + t - 1, t)
    reward_rows = rows
    if impl == "jax":
        sample = fwd(cfg.batch_size, k + t - 1, t) + (t - 1) * fwd(rows, k + t - 1, t)
        if 2 * cfg.thought_vocab ** t <= rows:
            reward_rows = cfg.thought_vocab ** t
    parts = {"sample": sample, "thinker_fwd_bwd": 3 * fwd(rows, k + t - 1, t),
             "reward": fwd(reward_rows, t + 1, 1), "answerer_fwd_bwd": 3 * fwd(cfg.batch_size, t + 1, 1)}
    parts["total"] = sum(parts.values())
    return parts


def matmul_probes(cfg: BenchConfig) -> dict[str, tuple]:
    """name -> (run, flops): jitted f32 matmuls, the square one and the model's MLP matmul."""
    dot = jax.jit(jnp.dot)
    rows = cfg.batch_size * cfg.group_size * (cfg.num_operands + cfg.max_thoughts - 1)
    shapes = {"square": (cfg.matmul_n, cfg.matmul_n, cfg.matmul_n), "model": (rows, cfg.d_model, 4 * cfg.d_model)}
    probes = {}
    for name, (m, k, n) in shapes.items():
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        probes[name] = (lambda a=a, b=b: dot(a, b).block_until_ready(), 2 * m * k * n)
    return probes


class JaxRun:
    """run() -> the last step's losses: one `ThinkTestbed.train` call of `chunk` steps on the running state."""

    def __init__(self, cfg: BenchConfig, population: int):
        self.cfg = cfg.jax_config(population)
        fns, init_member, test_set, train_set = think_exp.build(self.cfg)  # as experiments.think.make_driver
        self.testbed = ThinkTestbed(self.cfg, fns, init_member, test_set, total_steps=self.cfg.steps,
                                    train_set=train_set)
        self.state = self.testbed.init_state()
        self.keys = stream_keys(self.cfg.seed, self.testbed.streams)
        self.step = 0
        self.last = None  # the last step's (thinker loss, answerer loss)

    def __call__(self) -> tuple[float, float]:
        self.state, metrics = self.testbed.train(self.state, self.step, self.cfg.chunk, self.keys)
        metrics = jax.device_get(metrics)  # waits for the chunk (the state comes from the same program)
        jax.block_until_ready(self.state)
        self.step += self.cfg.chunk
        self.last = float(metrics["train/thinker_loss"][-1]), float(metrics["train/answerer_loss"][-1])
        return self.last


class TorchRun:
    """run() -> the last step's losses: `torch_steps` original-style steps."""

    def __init__(self, cfg: BenchConfig):
        from benchmarks.think_torch import TorchThinkStep

        self.step_fn, self.n = TorchThinkStep(cfg.torch_config(), cfg.seed), cfg.torch_steps
        self.last = None

    def __call__(self) -> tuple[float, float]:
        for _ in range(self.n):
            self.last = self.step_fn()
        return self.last


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog=PROG)
    import torch

    load_start = os.getloadavg()
    runs, seed_steps = {"jax_population": JaxRun(cfg, cfg.population)}, {"jax_population": cfg.population * cfg.chunk}
    if cfg.member:
        runs["jax_member"], seed_steps["jax_member"] = JaxRun(cfg, 1), cfg.chunk
    runs["torch"], seed_steps["torch"] = TorchRun(cfg), cfg.torch_steps
    probes = matmul_probes(cfg)
    first_calls({name: run for name, (run, _) in probes.items()})
    probe_s = {name: [] for name in probes}

    def after_round():
        for name, (run, _) in probes.items():
            for _ in range(PROBE_CALLS):
                start = time.perf_counter()
                run()
                probe_s[name].append(time.perf_counter() - start)

    first_out, first_s = first_calls(runs)  # compiles the JAX chunks, warms torch up
    start = time.perf_counter()
    times = interleaved(runs, cfg.rounds, after_round)
    timed_s = time.perf_counter() - start

    rate = {name: seed_steps[name] / np.asarray(t) for name, t in times.items()}  # seed-steps/s per round
    med = {name: float(np.median(r)) for name, r in rate.items()}
    per_round_vs_torch = {name: rate[name] / rate["torch"] for name in runs}
    flops = {impl: flops_per_step(cfg, impl) for impl in ("jax", "torch")}
    matmul = {name: float(np.median(flops_ / np.asarray(probe_s[name]))) for name, (_, flops_) in probes.items()}
    gflops = {name: flops["torch" if name == "torch" else "jax"]["total"] * r / 1e9 for name, r in med.items()}
    steps_per_call = {name: seed_steps[name] // (cfg.population if name == "jax_population" else 1) for name in runs}
    figures = {
        "workload": dict(M=cfg.modulus, k=cfg.num_operands, V=cfg.thought_vocab, T=cfg.max_thoughts,
                         d_model=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, B=cfg.batch_size,
                         G=cfg.group_size, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         entropy_coef=cfg.entropy_coef, population=cfg.population, chunk=cfg.chunk,
                         torch_steps=cfg.torch_steps, rounds=cfg.rounds, scheme="linear", blind=True, super=True,
                         jax_grad_clip=runs["jax_population"].cfg.thinker.grad_clip),
        "seed_steps_per_s": {name: round(v, 3) for name, v in med.items()},
        "steps_per_s": {name: round(v / (cfg.population if name == "jax_population" else 1), 3)
                        for name, v in med.items()},
        "seed_steps_per_s_all": {name: [round(float(x), 3) for x in r] for name, r in rate.items()},
        "speedup_population_vs_torch": round(float(np.median(per_round_vs_torch["jax_population"])), 2),
        "speedup_population_vs_torch_all": [round(float(x), 2) for x in per_round_vs_torch["jax_population"]],
        "speedup_member_vs_torch": (round(float(np.median(per_round_vs_torch["jax_member"])), 2)
                                    if cfg.member else None),
        "speedup_population_vs_member": (round(float(np.median(rate["jax_population"] / rate["jax_member"])), 2)
                                         if cfg.member else None),
        "first_call_seconds": {name: round(v, 2) for name, v in first_s.items()},
        "steps_per_call": steps_per_call,
        "flops_per_seed_step": flops,
        "gflop_per_s": {name: round(v, 3) for name, v in gflops.items()},
        "matmul_gflop_per_s": {name: round(v / 1e9, 3) for name, v in matmul.items()},
        "frac_matmul_square": {name: round(v * 1e9 / matmul["square"], 4) for name, v in gflops.items()},
        "frac_matmul_model": {name: round(v * 1e9 / matmul["model"], 4) for name, v in gflops.items()},
        "losses": {name: {"first_call": [round(x, 4) for x in first_out[name]],
                          "after_rounds": [round(x, 4) for x in runs[name].last]} for name in runs},
        "timed_seconds": round(timed_s, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    print(json.dumps(figures))
    labels = {"jax_population": f"JAX population, P={cfg.population} ({cfg.chunk} steps / call)",
              "jax_member": f"JAX one member, P=1 ({cfg.chunk} steps / call)",
              "torch": "PyTorch, original style (Python loop per step)"}
    rows = [dict(impl=labels[name], seed_steps_per_s=med[name],
                 ms_per_step=1e3 * (cfg.population if name == "jax_population" else 1) / med[name],
                 vs_torch=float(np.median(per_round_vs_torch[name])), gflop_per_s=gflops[name],
                 frac_matmul_square=gflops[name] * 1e9 / matmul["square"],
                 frac_matmul_model=gflops[name] * 1e9 / matmul["model"]) for name in runs]
    print(format_table(rows))
    write_json(figures, cfg.out)
    return figures


if __name__ == "__main__":
    main()
