"""Exhaustive exploration throughput: one forward pass per context against one per candidate.

    python -m benchmarks.char                          # cpu preset, 64 contexts x 64 chars, 65 actions
    python -m benchmarks.char --steps=10 --candidates_per_pass=1   # quicker

The same update everywhere (rlsoft.exhaustive): rewards for all V = 65 next characters (exact match
with the data + the bigram probability of the character, seed 002's hard + soft signal), weights over
the 65 ("linear" = GRPO by default), loss -sum_c sg(pi(c)) w(c) log pi(c), AdamW with clipping;
contexts/s counts forward + backward + optimizer step, jitted, after compilation and a warm-up call.
  exhaustive      `exhaustive_update`: ONE forward pass per context; the 65 candidates are the 65
                  entries of the softmax at the context's last position. Timed two ways: one step per
                  jitted call, and `steps_per_call` steps as one lax.scan per call (a compiled
                  training loop, as rlsoft.bandit_sweep runs its sweeps).
  per_candidate   `per_candidate_value_and_grad`: seed 002's way, 65 passes per context, each on
                  [context, c] scored at the position that predicts c; a lax.scan over 65 / k steps of
                  k candidates x B contexts (k = candidates_per_pass; each k is timed, the fastest is
                  the baseline of the ratios). One step per call (its scan already spans 65 passes).
The model is the char_gpt preset with block_size = context + 1, so that [context, c] fits. Before
timing, both gradients are computed on the same batch and compared (grad_rel_diff).

Memory note: XLA CPU takes a fresh ~200 MB temp buffer for every call of the cpu-preset step; on this
VM that is ~56k minor page faults (~0.15 s of system time) per call, which the scanned timing pays once
per 10 steps. GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc, glibc >= 2.35)
removes ~99% of those faults; on the shared 2-core VM its wall-time effect was within run-to-run noise,
so it is only reported (glibc_tunables, page_faults_per_step), not set.
Prints one JSON line of figures, then a table.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from envs import chartext, ngram
from models import char_gpt
from rlsoft import exhaustive, weighting
from rlsoft.config import check, check_finite, parse_flags
from rlsoft.logger import format_table

SHARED_TEXT = "/work/shared/data/tinyshakespeare.txt"


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    preset: str = "cpu"
    dtype: str = "float32"
    batch: int = 64
    context: int = 64
    scheme: str = "linear"
    tau: float = 0.5  # used only by the schemes that need a temperature
    mixing: str = "pi"
    learning_rate: float = 3e-4
    steps: int = 20  # timed exhaustive steps (each way)
    steps_per_call: int = 10  # exhaustive steps per jitted call in the scanned timing; must divide steps
    candidate_steps: int = 1  # timed per-candidate steps for each k (each is ~65x slower)
    candidates_per_pass: tuple[int, ...] = (1, 5, 13)  # must divide 65
    text_file: str = SHARED_TEXT  # empty: random tokens (throughput does not depend on the text)
    seed: int = 0

    def __post_init__(self):
        check(self.preset in char_gpt.PRESETS,
              f"preset={self.preset} is invalid; allowed: {', '.join(char_gpt.PRESETS)}")
        check(self.dtype in char_gpt.DTYPES, f"dtype={self.dtype} is invalid; allowed: {', '.join(char_gpt.DTYPES)}")
        for name in ("batch", "context", "steps", "candidate_steps", "steps_per_call"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.steps % self.steps_per_call == 0,
              f"steps_per_call={self.steps_per_call} is invalid; must divide steps={self.steps}")
        weighting.validate_scheme(self.scheme)
        weighting.validate_tau(self.tau)
        exhaustive.validate_mixing(self.mixing)
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        check(not self.text_file or os.path.isfile(self.text_file),
              f"text_file={self.text_file} is invalid; no such file (--text_file= times random tokens)")
        check(len(self.candidates_per_pass) > 0 and all(k >= 1 for k in self.candidates_per_pass),
              f"candidates_per_pass={self.candidates_per_pass} is invalid; need divisors of the vocabulary")

    @property
    def tau_arg(self):
        return self.tau if self.scheme in weighting.NEEDS_TAU else None


def load_ids(cfg: BenchConfig) -> tuple[np.ndarray, int]:
    """Training ids and vocabulary size: tinyshakespeare from `text_file`, or random tokens."""
    if not cfg.text_file:
        rng = np.random.default_rng(cfg.seed)
        return rng.integers(0, chartext.TINY_SHAKESPEARE_VOCAB, size=200_000).astype(np.int32), \
            chartext.TINY_SHAKESPEARE_VOCAB
    data = chartext.load_char_data(cfg.text_file)
    return data.train, data.vocab.size


def make_steps(cfg: BenchConfig, graphdef, table: ngram.NGramTable, tx: optax.GradientTransformation, vocab: int):
    """The two jittable steps (params, opt_state, contexts[B,C], targets[B]) -> (params, opt_state, metrics)."""

    def rewards_of(contexts, targets):
        """r(c) = 1[c == target] + p_bigram(c | last char): every one of the V actions, [B,V]."""
        bigram = jnp.exp(ngram.ngram_log_probs(table, contexts[:, -1:]))
        return jax.nn.one_hot(targets, vocab) + bigram

    def exhaustive_step(params, opt_state, contexts, targets):
        return exhaustive.exhaustive_update(
            params, opt_state, contexts, rewards_of(contexts, targets), logits_fn=char_gpt.logits_fn(graphdef),
            tx=tx, scheme=cfg.scheme, tau=cfg.tau_arg, mixing=cfg.mixing)

    def per_candidate_grads(params, contexts, targets, k):
        return exhaustive.per_candidate_value_and_grad(
            params, contexts, rewards_of(contexts, targets), char_gpt.sequence_logits_fn(graphdef), cfg.scheme,
            cfg.tau_arg, mixing=cfg.mixing, candidates_per_pass=k)

    def per_candidate_step(params, opt_state, contexts, targets, k):
        loss, grads = per_candidate_grads(params, contexts, targets, k)
        params, opt_state, grad_norm = exhaustive.apply_gradients(params, opt_state, grads, tx)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm}

    def exhaustive_grads(params, contexts, targets):
        fn = lambda p: exhaustive.exhaustive_loss(p, contexts, rewards_of(contexts, targets),
                                                  char_gpt.logits_fn(graphdef), cfg.scheme, cfg.tau_arg,
                                                  mixing=cfg.mixing)[0]
        return jax.value_and_grad(fn)(params)

    return exhaustive_step, per_candidate_step, exhaustive_grads, per_candidate_grads


def scan_steps(step):
    """Several steps as one call: (params, opt_state, contexts[S,B,C], targets[S,B]) -> last metrics."""
    def run(params, opt_state, contexts, targets):
        def body(carry, batch):
            params, opt_state, metrics = step(*carry, *batch)
            return (params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(body, (params, opt_state), (contexts, targets))
        return params, opt_state, jax.tree.map(lambda v: v[-1], metrics)
    return run


def time_calls(fn, params, opt_state, calls: list, steps_per_call: int = 1) -> dict:
    """Compile `fn`, run calls[0] once to warm up, then time every call of `calls` ((contexts, targets)
    pairs). Returns compile_s, s_per_step, minor page faults per step and the last metrics."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(params, opt_state, *calls[0]).compile()
    compile_s = time.perf_counter() - start
    params, opt_state, metrics = jax.block_until_ready(compiled(params, opt_state, *calls[0]))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for args in calls:
        params, opt_state, metrics = compiled(params, opt_state, *args)
    jax.block_until_ready((params, metrics))
    steps = len(calls) * steps_per_call
    return {"compile_s": compile_s, "s_per_step": (time.perf_counter() - start) / steps,
            "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps,
            "metrics": {k: float(v) for k, v in metrics.items()}}


def _rel_diff(a, b) -> float:
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return num / max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.char")
    try:
        ids, vocab = load_ids(cfg)
    except chartext.DataUnavailableError as e:
        print(f"python -m benchmarks.char: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    bad = [k for k in cfg.candidates_per_pass if vocab % k]
    if bad:
        print(f"python -m benchmarks.char: error: --candidates_per_pass={bad[0]} is invalid; "
              f"need a divisor of V={vocab}", file=sys.stderr)
        raise SystemExit(2)
    model_cfg = char_gpt.CharGPTConfig.preset(cfg.preset, vocab_size=vocab, block_size=cfg.context + 1,
                                              dtype=cfg.dtype)
    graphdef, params = char_gpt.init_model(model_cfg, cfg.seed)
    table = ngram.NGramModel(2).fit(ids, vocab).table()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(cfg.learning_rate))
    opt_state = tx.init(params)
    ex_step, pc_step, ex_grads, pc_grads = make_steps(cfg, graphdef, table, tx, vocab)

    n = max(cfg.steps, cfg.candidate_steps)
    rng = np.random.default_rng(cfg.seed + 1)
    windows = [chartext.sample_windows(rng, ids, cfg.batch, cfg.context) for _ in range(n)]
    contexts = jnp.asarray(np.stack([w[0] for w in windows]))  # [n, B, C]
    targets = jnp.asarray(np.stack([w[1] for w in windows]))  # [n, B]

    # Same gradient from both (k = the first candidates_per_pass), on the first batch.
    k0 = cfg.candidates_per_pass[0]
    ex_loss, g_ex = jax.jit(ex_grads)(params, contexts[0], targets[0])
    pc_loss, g_pc = jax.jit(functools.partial(pc_grads, k=k0))(params, contexts[0], targets[0])
    grad_rel_diff = _rel_diff(g_pc, g_ex)

    spc = cfg.steps_per_call
    runs = {
        "exhaustive": time_calls(ex_step, params, opt_state,
                                 [(contexts[i], targets[i]) for i in range(cfg.steps)]),
        f"exhaustive_scan{spc}": time_calls(
            scan_steps(ex_step), params, opt_state,
            [(contexts[i:i + spc], targets[i:i + spc]) for i in range(0, cfg.steps, spc)], spc),
    }
    for k in cfg.candidates_per_pass:
        runs[f"per_candidate_k{k}"] = time_calls(functools.partial(pc_step, k=k), params, opt_state,
                                                 [(contexts[i], targets[i]) for i in range(cfg.candidate_steps)])
    rate = {name: cfg.batch / r["s_per_step"] for name, r in runs.items()}
    baseline = max((name for name in runs if name.startswith("per_candidate")), key=rate.get)
    ex_metrics = runs["exhaustive"]["metrics"]
    figures = {
        "workload": dict(preset=cfg.preset, params=char_gpt.param_count(params), dtype=cfg.dtype,
                         batch=cfg.batch, context=cfg.context, vocab=vocab, scheme=cfg.scheme,
                         mixing=cfg.mixing, steps=cfg.steps, steps_per_call=spc, candidate_steps=cfg.candidate_steps),
        "contexts_per_s": {name: round(v, 2) for name, v in rate.items()},
        "seconds_per_step": {name: round(r["s_per_step"], 4) for name, r in runs.items()},
        "compile_s": {name: round(r["compile_s"], 2) for name, r in runs.items()},
        "page_faults_per_step": {name: round(r["faults_per_step"]) for name, r in runs.items()},
        "baseline": baseline,
        "speedup_vs_baseline": {name: round(rate[name] / rate[baseline], 1)
                                for name in runs if name.startswith("exhaustive")},
        "check": {"loss_exhaustive": float(ex_loss), "loss_per_candidate": float(pc_loss),
                  "grad_rel_diff": grad_rel_diff, "k": k0},
        "final_metrics_exhaustive": {k: round(ex_metrics[k], 4) for k in
                                     ("loss", "entropy", "expected_reward", "p_best", "grad_norm")},
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(figures))
    labels = {"exhaustive": "exhaustive, 1 step / call", f"exhaustive_scan{spc}": f"exhaustive, {spc} steps / call"}
    rows = []
    for name, r in runs.items():
        per_candidate = name.startswith("per_candidate")
        label = f"per-candidate, {name.split('_k')[1]} candidates / pass" if per_candidate else labels[name]
        rows.append(dict(impl=label, passes_per_context=vocab if per_candidate else 1,
                         contexts_per_s=rate[name], s_per_step=r["s_per_step"],
                         faults_per_step=round(r["faults_per_step"]), vs_baseline=rate[name] / rate[baseline]))
    print(format_table(rows))
    return figures


if __name__ == "__main__":
    main()
