"""rlsoft against the libraries a researcher would otherwise use: google-tunix's sampler and TRL's GRPOTrainer.

    python -m benchmarks.peers --out=results/benchmarks/peers.json   # in the venv with .[dev,peers]

Both sides run one random Qwen2 (benchmarks.rollout.build_models: transformers builds the tiny
preset and writes it, models/hf.py loads it, tunix and TRL load the same directory), float32.
  sampler     rlsoft's sampler (rlsoft.rollout over models/qwen2_decode, as benchmarks.rollout's `jax`)
              against tunix's vanilla `Sampler` (benchmarks.peers_tunix), in this process, interleaved
              (benchmarks.timing): 64 left-padded prompts of 113..128 ids, 256 new tokens, temperature 1,
              no top-k / top-p, no stop; tokens/s of the medians and the median per-round ratio.
              rlsoft's call also returns each token's log-prob; tunix's (return_logprobs off, its
              default) turns the ids to text and back, as its API does (benchmarks.peers_tunix).
  parity      greedy tokens of both samplers identical, and the logits the first token is chosen
              from within PARITY_ATOL (rlsoft: its decode functions' prefill; tunix: its sampler's
              return_logits).
  rl_step     one RL step, rollout + reward + update, 8 questions x 8 samples, 256 new tokens:
              rlsoft's `LanguageTestbed.train` (benchmarks.train_step's workload and RandomTask, GRPO
              whitening) against `trl.GRPOTrainer` (benchmarks.peers_trl: the same settings where TRL
              has them; torch with `trl_threads` threads, OMP_WAIT_POLICY=PASSIVE), as adjacent
              processes: rlsoft cold, TRL, rlsoft warm per round. Per-step time: the median of a
              process's steps after the first.
  first_call  first calls in fresh processes, cold (a new empty JAX compilation cache,
              rlsoft.compile_cache) then warm (the directory the cold one filled): rlsoft's sampler
              and tunix's (one process, their order alternating by round), rlsoft's first RL step
              (from the rl_step processes; its programs compiled concurrently before it, as the
              driver's --compile_ahead does; --compile_ahead=false: call by call) and TRL's first
              step. Targets (issue 14): rlsoft's cold
              first calls no slower than tunix's first call and TRL's first step.
  phases      what rlsoft's (and tunix's) first calls spent tracing, lowering and compiling or reading
              the cache (benchmarks.compile_log: JAX's compile log), medians over rounds.
A peer that is not installed is named in one line and its parts are skipped.
Prints one JSON line of figures, then a table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.compile_log import CompileLog
from benchmarks.timing import first_calls, interleaved, paired, write_json
from rlsoft.config import check, check_finite, parse_flags
from rlsoft.logger import format_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_ATOL = 1e-6  # issue 14: first-token logits of rlsoft and tunix within this
WORKERS = ("", "sampler_first", "rl_rlsoft", "rl_trl")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    sampler: bool = True  # sampler throughput and parity against tunix
    rl_step: bool = True  # RL steps against TRL (and rlsoft's first RL step, cold and warm)
    first_call: bool = True  # the samplers' first calls in fresh processes, cold and warm
    repeats: int = 5  # timed sampler calls per side
    rounds: int = 2  # fresh-process rounds (first calls; RL-step processes)
    steps: int = 5  # RL steps per process
    batch: int = 64
    prompt_len: int = 128
    new_tokens: int = 256
    parity_tokens: int = 256  # greedy tokens compared
    questions: int = 8
    group_size: int = 8
    micro_batches: int = 4
    learning_rate: float = 1e-5
    compile_ahead: bool = True  # rlsoft's first RL step as the driver runs it (--compile_ahead, its default)
    trl_threads: int = 2
    seed: int = 0
    out: str = ""  # write the JSON here too
    # A worker process's part (the benchmark starts them; not for the command line).
    worker: str = ""
    model_dir: str = ""
    compile_cache: str = ""  # "" : off
    tunix_first: bool = False

    def __post_init__(self):
        for name in ("repeats", "rounds", "batch", "parity_tokens", "questions", "micro_batches", "trl_threads"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.steps >= 2, f"steps={self.steps} is invalid; need >= 2 (the first step compiles)")
        check(self.group_size >= 2, f"group_size={self.group_size} is invalid; need >= 2")
        check(self.prompt_len >= 16, f"prompt_len={self.prompt_len} is invalid; need >= 16")
        check(self.new_tokens >= 2, f"new_tokens={self.new_tokens} is invalid; need >= 2")
        check(self.parity_tokens <= self.new_tokens,
              f"parity_tokens={self.parity_tokens} is invalid; need <= new_tokens={self.new_tokens}")
        check(self.questions % self.micro_batches == 0,
              f"micro_batches={self.micro_batches} is invalid; must divide questions={self.questions}")
        check_finite(self.learning_rate > 0, "learning_rate", self.learning_rate, "a finite value > 0")
        check(0 <= self.seed < 2**31, f"seed={self.seed} is invalid; need 0 <= seed < 2**31")
        check(self.worker in WORKERS, f"worker={self.worker} is invalid; expected one of {WORKERS[1:]}")
        check(not self.worker or self.model_dir, "worker needs model_dir")


# --------------------------------------------------------------------------------------------
# In this process: sampler throughput and parity.


def greedy(fns, state, tokens: np.ndarray, mask: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """rlsoft's greedy tokens [B, new_tokens] (its sampler at temperature 0) and the logits the first
    token is chosen from [B, V] (the decode functions' prefill, which the sampler starts with)."""
    import jax

    from rlsoft import rollout

    sampler = rollout.make_sampler(fns, rollout.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0), 1)
    out = np.asarray(sampler(state, tokens, mask, jax.random.key(0)).tokens)
    prefill = jax.jit(lambda p, t, pos, m: fns.prefill(p, t, pos, m, 1, new_tokens)[0])
    return out, np.asarray(prefill(state, tokens, rollout.prompt_positions(mask), mask))


def sampler_part(cfg: BenchConfig, model_dir: str, ours) -> dict:
    from flax import nnx

    from benchmarks import peers_tunix
    from benchmarks.rollout import jax_sample_fn, make_prompts
    from models.qwen2_decode import decode_fns

    graphdef, state = nnx.split(ours)
    fns = decode_fns(graphdef)
    tokens, mask = make_prompts(cfg, cfg.batch, ours.cfg.vocab_size, cfg.seed)
    tunix_sampler = peers_tunix.make_sampler(peers_tunix.load_model(model_dir), cfg.prompt_len, cfg.new_tokens)
    runs = {"rlsoft": jax_sample_fn(fns, state, tokens, mask, cfg.new_tokens, 1),
            "tunix": peers_tunix.sample_fn(tunix_sampler, tokens, mask, cfg.new_tokens)}
    _, first = first_calls(runs)  # in this process, compilation cache off
    times = interleaved(runs, cfg.repeats)
    sec = {k: float(np.median(v)) for k, v in times.items()}
    generated = cfg.batch * cfg.new_tokens

    # Parity: greedy over parity_tokens, and the logits of the first token.
    n = cfg.parity_tokens
    ours_tokens, ours_logits = greedy(fns, state, tokens, mask, n)
    tunix_tokens, tunix_logits = peers_tunix.greedy(tunix_sampler, tokens, mask, n)
    same = (ours_tokens == tunix_tokens).all(1)
    diff = np.abs(ours_logits - tunix_logits)
    return {
        "seconds_per_call": {k: round(v, 4) for k, v in sec.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(generated / v) for k, v in sec.items()},
        "ratio_rlsoft_over_tunix_paired": round(paired(times, "rlsoft", "tunix"), 2),
        "first_call_in_process_s": {k: round(v, 2) for k, v in first.items()},
        "parity": {"greedy_tokens": n, "rows_identical": int(same.sum()), "rows": int(same.size),
                   "first_mismatch": None if same.all() else [int(np.argmin(same)), int(np.argmax(
                       ours_tokens[np.argmin(same)] != tunix_tokens[np.argmin(same)]))],
                   "first_token_logits_max_abs_diff": float(diff.max()),
                   "first_token_logits_max_abs": float(np.abs(ours_logits).max()),
                   "atol": PARITY_ATOL, "ok": bool(same.all() and diff.max() <= PARITY_ATOL)},
    }


# --------------------------------------------------------------------------------------------
# Workers: one fresh process each.


def worker_sampler_first(cfg: BenchConfig) -> dict:
    """First call of each sampler in this fresh process (cache cfg.compile_cache), in the given order."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import peers_tunix
    from benchmarks.rollout import jax_sample_fn, make_prompts
    from models import hf
    from models.qwen2_decode import decode_fns
    from rlsoft import compile_cache

    compile_cache.enable(cfg.compile_cache)
    counter = compile_cache.CompileCounter()
    jax.jit(lambda x: x + 1)(jnp.zeros(1)).block_until_ready()  # the backend up before either side
    ours = hf.load_model(cfg.model_dir)
    graphdef, state = nnx.split(ours)
    tokens, mask = make_prompts(cfg, cfg.batch, ours.cfg.vocab_size, cfg.seed)
    tunix_sampler = peers_tunix.make_sampler(peers_tunix.load_model(cfg.model_dir), cfg.prompt_len, cfg.new_tokens)
    runs = {"rlsoft": jax_sample_fn(decode_fns(graphdef), state, tokens, mask, cfg.new_tokens, 1),
            "tunix": peers_tunix.sample_fn(tunix_sampler, tokens, mask, cfg.new_tokens)}
    order = ["tunix", "rlsoft"] if cfg.tunix_first else ["rlsoft", "tunix"]
    logs = {k: CompileLog() for k in order}
    _, first = first_calls({k: logs[k].around(runs[k]) for k in order})
    return dict(first, order=order, cache_hits=counter.hits, cache_misses=counter.misses,
                compile_log={k: log.summary() for k, log in logs.items()})


def worker_rl_rlsoft(cfg: BenchConfig) -> dict:
    """cfg.steps RL steps of rlsoft's testbed (benchmarks.train_step's workload), GRPO whitening."""
    start = time.perf_counter()
    import jax
    from flax import nnx

    from benchmarks.train_step import RandomTask, train_config
    from experiments.countdown import qwen2_policy
    from models import hf
    from rlsoft import compile_cache
    from rlsoft.train_loop import LanguageTestbed

    compile_cache.enable(cfg.compile_cache)
    counter = compile_cache.CompileCounter()
    ours = hf.load_model(cfg.model_dir)
    graphdef, params = nnx.split(ours)
    tcfg = dataclasses.replace(train_config(cfg, cfg.micro_batches), scheme="linear")  # tau: unused
    testbed = LanguageTestbed(tcfg, qwen2_policy(graphdef), params, RandomTask(cfg, ours.cfg.vocab_size, cfg.seed))
    keys = {s: jax.random.fold_in(jax.random.key(cfg.seed), i) for i, s in enumerate(testbed.streams)}
    state = testbed.init_state()
    setup = time.perf_counter() - start
    seconds, rewards, log = [], [], CompileLog()
    for i in range(cfg.steps):
        t = time.perf_counter()
        with log if i == 0 else contextlib.nullcontext():
            if i == 0 and cfg.compile_ahead:  # the step's programs compiled concurrently first, as the driver does
                compile_cache.compile_ahead(testbed.lower(state, tcfg.sft_steps, 1, keys))
            state, metrics = testbed.train(state, tcfg.sft_steps + i, 1, keys)
            jax.block_until_ready(state)
        seconds.append(time.perf_counter() - t)
        rewards.append(float(np.asarray(metrics["train/reward"]).mean()))
    return {"step_seconds": seconds, "setup_seconds": setup, "reward": rewards, "cache_hits": counter.hits,
            "cache_misses": counter.misses, "compile_log": log.summary()}


def worker_rl_trl(cfg: BenchConfig) -> dict:
    from benchmarks import peers_trl
    from benchmarks.train_step import RandomTask

    with open(os.path.join(cfg.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return peers_trl.run_steps(cfg.model_dir, RandomTask(cfg, vocab, cfg.seed), cfg.questions, cfg.group_size,
                               cfg.new_tokens, cfg.micro_batches, cfg.learning_rate, cfg.steps, cfg.trl_threads,
                               cfg.seed)


def run_worker(cfg: BenchConfig, worker: str, model_dir: str, compile_cache: str = "", **flags) -> dict:
    """`worker` in a fresh process (CPU, no forced devices, OMP_WAIT_POLICY=PASSIVE): its result and
    the process's wall time."""
    workload = {k: getattr(cfg, k) for k in ("batch", "prompt_len", "new_tokens", "parity_tokens", "questions",
                                              "group_size", "micro_batches", "learning_rate", "compile_ahead",
                                              "steps", "trl_threads", "seed")}
    argv = [f"--{k}={v}" for k, v in {**workload, **flags, "worker": worker, "model_dir": model_dir,
                                      "compile_cache": compile_cache}.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.peers", *argv], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"worker {worker} exited {out.returncode}: {out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]), process_seconds=wall)


# --------------------------------------------------------------------------------------------


def first_call_part(cfg: BenchConfig, model_dir: str, tmp: str) -> dict:
    rounds = []
    for r in range(cfg.rounds):
        cache = os.path.join(tmp, f"sampler_cache{r}")
        cold = run_worker(cfg, "sampler_first", model_dir, cache, tunix_first=bool(r % 2))
        warm = run_worker(cfg, "sampler_first", model_dir, cache, tunix_first=bool(r % 2))
        rounds.append(dict(cold=cold, warm=warm))
    med = lambda kind, side: round(float(np.median([r[kind][side] for r in rounds])), 2)  # noqa: E731
    return {"rounds": rounds, "rlsoft_cold_s": med("cold", "rlsoft"), "tunix_cold_s": med("cold", "tunix"),
            "rlsoft_warm_s": med("warm", "rlsoft"), "tunix_warm_s": med("warm", "tunix"),
            "phases_s": {f"{side}_{kind}": phases([r[kind]["compile_log"][side] for r in rounds])
                         for kind in ("cold", "warm") for side in ("rlsoft", "tunix")}}


def phases(logs: list[dict]) -> dict:
    """Medians over rounds of a first call's seconds by phase (benchmarks.compile_log)."""
    return {k: round(float(np.median([x[k] for x in logs])), 2) for k in ("trace_s", "lower_s", "compile_s",
                                                                           "cache_read_s")}


def rl_step_part(cfg: BenchConfig, model_dir: str, tmp: str, with_trl: bool) -> dict:
    rounds = []
    for r in range(cfg.rounds):
        cache = os.path.join(tmp, f"rl_cache{r}")
        row = {"rlsoft_cold": run_worker(cfg, "rl_rlsoft", model_dir, cache)}
        if with_trl:
            row["trl"] = run_worker(cfg, "rl_trl", model_dir)
        row["rlsoft_warm"] = run_worker(cfg, "rl_rlsoft", model_dir, cache)
        rounds.append(row)

    def steady(name):  # the median over processes of each process's median step after the first
        return round(float(np.median([np.median(r[name]["step_seconds"][1:]) for r in rounds])), 3)

    def first(name):
        return round(float(np.median([r[name]["step_seconds"][0] for r in rounds])), 2)

    out = {"rounds": rounds, "rlsoft_step_s": steady("rlsoft_warm"), "rlsoft_step_cold_process_s": steady("rlsoft_cold"),
           "rlsoft_first_step_cold_s": first("rlsoft_cold"), "rlsoft_first_step_warm_s": first("rlsoft_warm"),
           "rlsoft_first_step_phases_s": {k: phases([r[f"rlsoft_{k}"]["compile_log"] for r in rounds])
                                          for k in ("cold", "warm")}}
    if with_trl:
        out.update(trl_step_s=steady("trl"), trl_first_step_s=first("trl"),
                   ratio_trl_over_rlsoft=round(steady("trl") / steady("rlsoft_warm"), 2),
                   trl_versions=rounds[0]["trl"]["versions"])
    return out


def run_worker_here(cfg: BenchConfig) -> None:
    result = {"sampler_first": worker_sampler_first, "rl_rlsoft": worker_rl_rlsoft, "rl_trl": worker_rl_trl}[
        cfg.worker](cfg)
    print("RESULT " + json.dumps(result))


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.peers")
    # torch's OpenMP workers spin while they wait (benchmarks.rollout); before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if cfg.worker:
        run_worker_here(cfg)
        return {}
    from benchmarks import peers_tunix

    have = {peer: importlib.util.find_spec(peer) is not None for peer in ("tunix", "trl")}
    skipped = []
    for peer, parts in (("tunix", "sampler throughput, parity and first calls"), ("trl", "GRPOTrainer steps")):
        if not have[peer]:
            line = f"{peer} is not installed: {parts} skipped ({peers_tunix.INSTALL_HINT})"
            print(line)
            skipped.append(line)
    import jax

    from benchmarks.rollout import build_models
    from rlsoft import compile_cache

    compile_cache.enable("")  # this process's first calls compile (both sides alike)
    versions = {"jax": jax.__version__, "rlsoft_commit": subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    versions.update({peer: importlib.metadata.version({"tunix": "google-tunix", "trl": "trl"}[peer])
                     for peer in have if have[peer]})
    figures = {"workload": {k: getattr(cfg, k) for k in ("batch", "prompt_len", "new_tokens", "questions",
                                                         "group_size", "micro_batches", "learning_rate", "steps",
                                                         "repeats", "rounds", "trl_threads")},
               "model": "tiny random Qwen2 (hidden 128, 2 layers, 4/2 heads, FFN 384, vocab 1024), float32",
               "cpu_count": os.cpu_count(), "versions": versions, "skipped": skipped,
               "load_avg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "hf")
        _, ours = build_models("tiny", model_dir, cfg.seed)
        if have["tunix"] and cfg.sampler:
            figures["sampler"] = sampler_part(cfg, model_dir, ours)
        if have["tunix"] and cfg.first_call:
            figures["sampler_first_call"] = first_call_part(cfg, model_dir, tmp)
        if cfg.rl_step:
            figures["rl_step"] = rl_step_part(cfg, model_dir, tmp, have["trl"])
    figures["load_avg_end"] = os.getloadavg()
    figures["targets_met"] = targets(figures)
    print(json.dumps(figures))
    print(format_table(table_rows(figures), ["what", "rlsoft", "peer", "peer_over_rlsoft"]))
    write_json(figures, cfg.out)
    return figures


def targets(f: dict) -> dict:
    """Issue 14's start-up targets: rlsoft's cold first calls no slower than the peer's first call."""
    out = {}
    if "sampler_first_call" in f:
        s = f["sampler_first_call"]
        out["sampler_cold_first_call_le_tunix"] = s["rlsoft_cold_s"] <= s["tunix_cold_s"]
    if "trl_first_step_s" in f.get("rl_step", {}):
        r = f["rl_step"]
        out["rl_step_cold_first_le_trl_first"] = r["rlsoft_first_step_cold_s"] <= r["trl_first_step_s"]
    return out


def table_rows(f: dict) -> list[dict]:
    rows = []

    def row(what, ours, peer):
        rows.append(dict(what=what, rlsoft=float(ours), peer=float(peer) if peer is not None else np.nan,
                         peer_over_rlsoft=float(peer) / float(ours) if peer is not None else np.nan))
    if "sampler" in f:
        s = f["sampler"]
        row("sampler tokens/s (peer: tunix)", s["tokens_per_s"]["rlsoft"], s["tokens_per_s"]["tunix"])
        row("sampler s/call", s["seconds_per_call"]["rlsoft"], s["seconds_per_call"]["tunix"])
    if "sampler_first_call" in f:
        s = f["sampler_first_call"]
        row("sampler first call, cold (s)", s["rlsoft_cold_s"], s["tunix_cold_s"])
        row("sampler first call, warm cache (s)", s["rlsoft_warm_s"], s["tunix_warm_s"])
    if "rl_step" in f:
        r = f["rl_step"]
        row("RL step s (peer: TRL)", r["rlsoft_step_s"], r.get("trl_step_s"))
        row("first RL step, cold (s)", r["rlsoft_first_step_cold_s"], r.get("trl_first_step_s"))
        row("first RL step, warm cache (s)", r["rlsoft_first_step_warm_s"], r.get("trl_first_step_s"))
    return rows


if __name__ == "__main__":
    main()
