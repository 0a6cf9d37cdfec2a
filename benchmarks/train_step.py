"""RL-step throughput: the Countdown testbed's update and full RL step against a PyTorch update.

    python -m benchmarks.train_step                       # tiny and mid presets
    python -m benchmarks.train_step --config=tiny --repeats=7

Workload (GRPO-Zero's shape): 8 questions x G=8 = 64 sequences; prompts of prompt_len - 15 ..
prompt_len random ids, left padded to prompt_len = 128; 256 response tokens, no stop id (every row
runs to the end). The step is the experiments' own: a `rlsoft.train_loop.LanguageTestbed` over the
Qwen2 view experiments.countdown uses (`qwen2_policy`), with a random-prompt task in place of
Countdown. Both sides use the same random Qwen2 (models/qwen2.py builds it, models/hf.py
`save_model` writes it, transformers loads it).
  update      `testbed.update`, the jitted update the testbed's RL step calls (rlsoft.trainer
              make_update over qwen2_train's train_forward and response_logits: each question's
              prompt run once for its G rows, blocked causal attention, LM head at the predicting
              positions only), on the batch the testbed's first RL step built; softmax weights
              (tau 0.5), token_mean, PPO clip 0.2, 1 epoch (old log-probs = the loss's own, no
              separate forward), AdamW (clip 1.0), `micro_batches` gradient accumulation, float32
  update_mN   the same with N micro-batches (tiny only, `sweep`)
  per_row     the same update with every row's prompt + response through train_forward (blocked)
  per_row_full_attn  the same through Qwen2.__call__ (the full T x T masked attention)
  old_fwd     the old-logp forward that ppo_epochs > 1 adds (jitted trainer.response_log_probs)
  torch       transformers Qwen2ForCausalLM (sdpa attention), float32, all cores
              (torch.set_num_threads(os.cpu_count())): forward + backward
              of the same token-mean weighted log-likelihood (the PPO gradient at ratio 1; GRPO-Zero's
              loss) with the same micro-batches, clip_grad_norm_ 1.0 and torch.optim.AdamW. It runs
              no old-logp forward.
  torch_1thread  the same with torch.set_num_threads(1): on a shared machine OpenMP's barriers
              stall whenever one of its threads is descheduled, so one thread can be the faster
  rollout     the testbed's jitted sampler (rlsoft.rollout over qwen2_decode's decode functions),
              8 prompts x G=8 with a shared prompt cache, 256 new tokens, to host arrays
  rl_step     `testbed.train(state, step, 1, keys)` at an RL step: questions, rollout, the host
              reward (the fraction of response ids below vocab / 2, in numpy), batch, update, metrics
Token counts: the update processes B x (P + N) tokens; rl_step is credited with the generated
B x N tokens plus the B x (P + N) the update processes (`rl_step`), and with the generated tokens
only (`rl_step_generated`).

FLOPs (useful, float32): a forward is 2 x non-embedding params per token through the layers, 2 x
hidden x vocab per LM-head position, and 4 x layers x heads x head_dim per (query, key) pair of the
causal attention (plus the shared prompt for the group-shared forward); forward + backward is 3
forwards. The group-shared update does fewer FLOPs than per_row and torch for the same tokens. As
fractions of this machine's f32 matmul FLOP/s measured in the
same run (jitted jnp.dot of 1024 x 1024, and [B x T / micro_batches, hidden] x [hidden, ffn]).
Implementations are timed interleaved (the machine may be shared); figures are medians of the repeats
(seconds_min: the fastest), and `*_paired` ratios are medians over rounds of the per-round ratio.
Prints one JSON line of figures, then a table.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import first_calls, interleaved
from benchmarks.timing import paired as timing_paired
from experiments.countdown import qwen2_policy
from models import hf, qwen2
from rlsoft import optim, rollout, trainer, weighting
from rlsoft.config import check, check_finite, parse_flags
from rlsoft.logger import format_table
from rlsoft.train_loop import LanguageTestbed, TrainConfig

TARGETS = {"update_tokens_per_s": 16600, "ratio_update_over_torch": 2.0}  # 2x GRPO-Zero's ~8,300 (tiny)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = "both"  # tiny | mid | both
    repeats: int = 5  # timed calls per implementation, tiny preset
    mid_repeats: int = 2  # the same for the mid preset (an update takes tens of seconds)
    questions: int = 8
    group_size: int = 8
    prompt_len: int = 128
    new_tokens: int = 256
    micro_batches: int = 4  # tiny (m = 1 fits too; 4 is faster, see `sweep`)
    mid_micro_batches: int = 8
    sweep: tuple[int, ...] = (1,)  # tiny only: also time trainer.update with these micro_batches
    learning_rate: float = 1e-5
    torch: bool = True
    torch_1thread: bool = True  # also time the torch update with torch.set_num_threads(1)
    rl_step: bool = True  # time rollout and rollout + reward + update
    variants: bool = True  # time reuse_logp and old_fwd
    seed: int = 0

    def __post_init__(self):
        check(self.config in ("tiny", "mid", "both"), f"config={self.config} is invalid; expected tiny, mid or both")
        for name in ("repeats", "mid_repeats", "questions", "prompt_len", "new_tokens", "micro_batches",
                     "mid_micro_batches"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.prompt_len >= 16, f"prompt_len={self.prompt_len} is invalid; need >= 16")
        check(self.new_tokens >= 2, f"new_tokens={self.new_tokens} is invalid; need >= 2")
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        # The update runs each question's prompt once, so a micro-batch holds whole questions.
        for name in ("micro_batches",) + (("mid_micro_batches",) if self.config != "tiny" else ()):
            check(self.questions % getattr(self, name) == 0,
                  f"{name}={getattr(self, name)} is invalid; must divide questions = {self.questions}")
        for m in self.sweep:
            check(m >= 1 and self.questions % m == 0,
                  f"sweep={self.sweep} is invalid; each must divide questions = {self.questions}")


# --------------------------------------------------------------------------------------------
# Machine figures.


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_flops(shapes: dict, repeats: int = 5) -> dict:
    """f32 matmul FLOP/s of a jitted jnp.dot for each name -> (m, k, n)."""
    dot = jax.jit(jnp.dot)
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        out[name] = 2 * m * k * n / _median_time(lambda: dot(a, b).block_until_ready(), repeats)
    return out


# --------------------------------------------------------------------------------------------
# Workload.


class RandomTask:
    """The workload as a `rlsoft.train_loop.TextTask`: `questions` fixed random prompts of
    prompt_len - 15 .. prompt_len ids in 1..vocab-1 (0 is the pad), no stop id, and a trivial numpy
    verifier: the reward is the fraction of response ids below vocab / 2."""

    pad_id, stop_ids, num_eval = 0, (), 0

    def __init__(self, cfg: BenchConfig, vocab: int, seed: int):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(cfg.prompt_len - 15, cfg.prompt_len + 1, cfg.questions)
        self.prompts = [rng.integers(1, vocab, k).tolist() for k in lengths]
        self.num_train, self.max_prompt_length, self.vocab = cfg.questions, cfg.prompt_len, vocab

    def prompt_tokens(self, indices, split):
        return [self.prompts[i] for i in indices]

    def reference_tokens(self, indices, split):  # no supervised term here (sl_weight = 0)
        return [[1] for _ in indices]

    def score(self, indices, split, responses):
        reward = np.array([np.mean(np.asarray(r) < self.vocab // 2) if len(r) else 0.0 for r in responses],
                          np.float32)
        return {"reward": reward, "success": (reward > 0.5).astype(np.float32)}

    def decode(self, tokens):
        return " ".join(map(str, tokens))


def train_config(cfg: BenchConfig, micro_batches: int) -> TrainConfig:
    return TrainConfig(scheme="softmax", tau=0.5, policy=optim.OptimizerConfig(learning_rate=cfg.learning_rate),
                       micro_batches=micro_batches, ppo_epochs=1, aggregation="token_mean", clip_eps=0.2,
                       steps=10**6, questions_per_step=cfg.questions, group_size=cfg.group_size,
                       sampling=rollout.SamplingConfig(max_new_tokens=cfg.new_tokens), samples_to_log=0,
                       progress=False)


def first_rl_batch(testbed: LanguageTestbed, keys) -> trainer.Batch:
    """One RL step of the testbed (compiling its sampler and update); the batch its update received."""
    seen, update = [], testbed.update
    testbed.update = lambda state, batch: seen.append(batch) or update(state, batch)
    try:
        testbed.train(testbed.init_state(), testbed.cfg.sft_steps, 1, keys)
    finally:
        testbed.update = update
    return jax.tree.map(np.asarray, seen[0])


# --------------------------------------------------------------------------------------------
# FLOPs.


def forward_flops(mcfg: qwen2.Qwen2Config, non_embedding: int, rows: int, seq_len: int, prefix: int = 0,
                  head_positions: Optional[int] = None) -> float:
    """Useful FLOPs of one forward over rows x seq_len tokens: the layers at every position, causal
    attention plus `prefix` shared positions every query reads, the LM head at `head_positions`
    (default: every position)."""
    tokens = rows * seq_len
    context = rows * (seq_len * (seq_len + 1) / 2 + seq_len * prefix)  # keys read, summed over queries
    attn = 4 * mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim * context
    head = tokens if head_positions is None else head_positions
    return tokens * 2 * non_embedding + head * 2 * mcfg.hidden_size * mcfg.vocab_size + attn


def update_forward_flops(mcfg, non_embedding: int, q: int, g: int, p: int, n: int) -> dict:
    """FLOPs of one forward of each update variant: per row (prompt + response through the layers and
    the LM head) and group-shared (each prompt once, the LM head at the N predicting positions)."""
    return {"per_row": forward_flops(mcfg, non_embedding, q * g, p + n),
            "shared": forward_flops(mcfg, non_embedding, q, p, head_positions=q)
            + forward_flops(mcfg, non_embedding, q * g, n - 1, prefix=p, head_positions=q * g * (n - 1))}


# --------------------------------------------------------------------------------------------


def bench_preset(preset: str, cfg: BenchConfig, repeats: int) -> dict:
    mcfg = qwen2.Qwen2Config.preset(preset)
    model = qwen2.Qwen2(mcfg, rngs=nnx.Rngs(cfg.seed))
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    non_embedding = n_params - mcfg.vocab_size * mcfg.hidden_size * (1 if mcfg.tie_word_embeddings else 2)
    q, g, p, n = cfg.questions, cfg.group_size, cfg.prompt_len, cfg.new_tokens
    b, t = q * g, cfg.prompt_len + cfg.new_tokens
    m = cfg.micro_batches if preset == "tiny" else cfg.mid_micro_batches
    tcfg = train_config(cfg, m)
    policy = qwen2_policy(graphdef)
    task = RandomTask(cfg, mcfg.vocab_size, cfg.seed)
    testbed = LanguageTestbed(tcfg, policy, params, task)
    keys = {s: jax.random.fold_in(jax.random.key(cfg.seed), i) for i, s in enumerate(testbed.streams)}
    batch = first_rl_batch(testbed, keys)
    assert batch.response_mask.all(), "no stop id: every row runs to max_new_tokens"
    dev_batch = jax.device_put(batch)

    runs = {}

    def stepper(update, state):
        box = [state]

        def run():
            box[0], metrics = update(box[0], dev_batch)
            return jax.device_get(metrics)
        return run

    runs["update"] = stepper(testbed.update, testbed.init_state())
    if preset == "tiny":
        for mm in cfg.sweep:
            if mm != m:
                c = dataclasses.replace(tcfg, micro_batches=mm)
                runs[f"update_m{mm}"] = stepper(trainer.make_update(policy.forward, c, policy.response_logits)[0],
                                                trainer.init_state(params, c))
    if cfg.variants:
        full_attention = lambda prm, *a: nnx.merge(graphdef, prm)(*a)  # noqa: E731  (qwen2's T x T attention)
        for name, fwd in (("per_row", policy.forward), ("per_row_full_attn", full_attention)):
            runs[name] = stepper(trainer.make_update(fwd, tcfg)[0], trainer.init_state(params, tcfg))
        seq = (dev_batch.prompts, dev_batch.prompt_mask, dev_batch.responses, dev_batch.response_mask)
        per_row_logits = trainer.response_logits_from_forward(policy.forward)
        old = jax.jit(lambda prm, *s: trainer.response_log_probs(per_row_logits, prm, *s)[0])
        runs["old_fwd"] = lambda: old(params, *seq).block_until_ready()
    weights = np.asarray(weighting.compute_weights(batch.rewards, "softmax", tau=0.5)).reshape(-1)
    attn_impl = None
    if cfg.torch:
        from benchmarks.torch_update import torch_update_fn, with_threads

        with tempfile.TemporaryDirectory() as tmp:
            hf.save_model(model, tmp)
            runs["torch"], attn_impl = torch_update_fn(tmp, batch, weights, m, cfg.learning_rate)
            if cfg.torch_1thread:
                runs["torch_1thread"] = with_threads(torch_update_fn(tmp, batch, weights, m, cfg.learning_rate)[0], 1)
    if cfg.rl_step:
        prompts, pmask = rollout.left_pad(task.prompt_tokens(range(q), "train"), pad_id=0, length=p)
        counter = itertools.count(1)

        def run_rollout():
            o = testbed.sample(testbed.initial_params, *testbed._shard((prompts, pmask)),  # placed as the step does
                               jax.random.fold_in(keys["rollout"], next(counter)))
            return np.asarray(o.tokens), np.asarray(o.mask)
        runs["rollout"] = run_rollout
        rl_box, rl_steps = [testbed.init_state()], itertools.count(tcfg.sft_steps + 1)

        def run_rl_step():  # the testbed's own RL step: questions, sample, score, update
            rl_box[0], metrics = testbed.train(rl_box[0], next(rl_steps), 1, keys)
            return metrics
        runs["rl_step"] = run_rl_step

    first_out, first = first_calls(runs)  # from the initial params
    # Again: the testbed's update compiles a second time once the state it returns (committed to the
    # device mesh, unlike a fresh state's scalars) comes back in, as at the experiment's second step.
    first_calls(runs)
    times = interleaved(runs, repeats)
    sec = {name: float(np.median(v)) for name, v in times.items()}
    best = {name: float(np.min(v)) for name, v in times.items()}
    paired = functools.partial(timing_paired, times)

    processed, generated = b * t, b * n
    tok = {}
    for name, s in sec.items():
        if name == "rl_step":
            tok["rl_step"] = (generated + processed) / s
            tok["rl_step_generated"] = generated / s
        elif name == "rollout":
            tok["rollout"] = generated / s
        else:
            tok[name] = processed / s
    fwd = update_forward_flops(mcfg, non_embedding, q, g, p, n)
    # An update is forward + backward = 3 forwards; per_row* and torch run every row's prompt.
    flops = {name: 3 * fwd["shared" if name.startswith("update") else "per_row"] for name in sec
             if name.startswith(("update", "per_row")) or name in ("torch", "torch_1thread")}
    if "old_fwd" in sec:
        flops["old_fwd"] = fwd["per_row"]
    machine = matmul_flops({"matmul_1024": (1024, 1024, 1024),
                            "matmul_model": (b * t // m, mcfg.hidden_size, mcfg.intermediate_size)})
    out = {
        "model": dict(preset=preset, params=int(n_params), non_embedding=int(non_embedding), hidden=mcfg.hidden_size,
                      layers=mcfg.num_hidden_layers, heads=mcfg.num_attention_heads,
                      kv_heads=mcfg.num_key_value_heads, ffn=mcfg.intermediate_size, vocab=mcfg.vocab_size),
        "micro_batches": m,
        "tokens": {"update_processed": processed, "generated": generated, "rl_step": generated + processed},
        "tokens_per_s": {k: round(v) for k, v in tok.items()},
        "seconds": {k: round(v, 3) for k, v in sec.items()},
        "seconds_min": {k: round(v, 3) for k, v in best.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "first_call_seconds": {k: round(v, 2) for k, v in first.items()},
        "machine_flops": {k: round(v / 1e9, 1) for k, v in machine.items()},  # GFLOP/s, after this preset
        "gflop_per_s": {k: round(f / sec[k] / 1e9, 1) for k, f in flops.items()},
        "frac_matmul_1024": {k: round(f / sec[k] / machine["matmul_1024"], 3) for k, f in flops.items()},
        "frac_matmul_model": {k: round(f / sec[k] / machine["matmul_model"], 3) for k, f in flops.items()},
        "flops_per_update": {"group_shared": 3 * fwd["shared"], "per_row": 3 * fwd["per_row"]},
    }
    if cfg.torch:
        out["torch_attn_implementation"] = attn_impl
        # Same weights, batch and loss gradient: the pre-clip gradient norms of the first step agree.
        out["grad_norm_first_step"] = {"jax": float(first_out["update"]["train/grad_norm"]),
                                       "torch": first_out["torch"]}
        out["ratio_update_over_torch"] = round(tok["update"] / tok["torch"], 2)  # of the medians
        out["ratio_update_over_torch_paired"] = round(paired("update", "torch"), 2)
        if "torch_1thread" in tok:
            out["ratio_update_over_torch_1thread_paired"] = round(paired("update", "torch_1thread"), 2)
    if "per_row" in sec:
        out["ratio_update_over_per_row_paired"] = round(paired("update", "per_row"), 2)
        out["ratio_per_row_over_full_attn_paired"] = round(paired("per_row", "per_row_full_attn"), 2)
        out["old_fwd_share_of_per_row_paired"] = round(paired("per_row", "old_fwd"), 3)
    if "rl_step" in sec:
        out["rollout_share_of_rl_step_paired"] = round(paired("rl_step", "rollout"), 3)
    out["update_tokens_per_s_at_min_time"] = round(processed / best["update"])
    out["targets_met"] = {}
    if preset == "tiny":  # GRPO-Zero's ~8,300 tokens/s reference is for the tiny config only
        out["targets_met"]["update_tokens_per_s"] = tok["update"] >= TARGETS["update_tokens_per_s"]
    if cfg.torch:
        out["targets_met"]["ratio_update_over_torch"] = out["ratio_update_over_torch_paired"] >= TARGETS[
            "ratio_update_over_torch"]
    return out


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.train_step")
    machine = matmul_flops({"matmul_1024": (1024, 1024, 1024)})
    presets = ["tiny", "mid"] if cfg.config == "both" else [cfg.config]
    results = {p: bench_preset(p, cfg, cfg.repeats if p == "tiny" else cfg.mid_repeats) for p in presets}
    figures = {
        "workload": dict(questions=cfg.questions, group_size=cfg.group_size, batch=cfg.questions * cfg.group_size,
                         prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens, repeats=cfg.repeats,
                         mid_repeats=cfg.mid_repeats, scheme="softmax", tau=0.5, aggregation="token_mean",
                         clip_eps=0.2, ppo_epochs=1, dtype="float32"),
        "matmul_1024_gflop_per_s_at_start": round(machine["matmul_1024"] / 1e9, 1),
        "cpu_count": os.cpu_count(),
        "jax_devices": jax.device_count(),
        "load_avg": os.getloadavg(),
        **results,
        "targets": TARGETS,
    }
    print(json.dumps(figures))
    rows = []
    for p, r in results.items():
        base = r["tokens_per_s"].get("torch")
        for name, v in r["tokens_per_s"].items():
            key = "rl_step" if name.startswith("rl_step") else name
            row = dict(preset=p, impl=name, micro_batches=r["micro_batches"] if not name.startswith("update_m")
                       else int(name[len("update_m"):]), tokens_per_s=float(v),
                       seconds=r["seconds"].get(key, math.nan),
                       vs_torch=v / base if base and name != "old_fwd" and name in r["gflop_per_s"] else math.nan,
                       gflop_per_s=r["gflop_per_s"].get(name, math.nan),
                       frac_matmul_1024=r["frac_matmul_1024"].get(name, math.nan),
                       frac_matmul_model=r["frac_matmul_model"].get(name, math.nan))
            rows.append(row)
    print(format_table(rows, ["preset", "impl", "micro_batches", "tokens_per_s", "seconds", "vs_torch", "gflop_per_s",
                              "frac_matmul_1024", "frac_matmul_model"]))
    return figures


if __name__ == "__main__":
    main()
