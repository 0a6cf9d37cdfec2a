"""Start-up time: an experiment's whole run in a fresh process with an empty compilation cache (cold)
against a second process that finds the cache (warm).

    python -m benchmarks.startup                                  # countdown --preset=smoke, 3 rounds
    python -m benchmarks.startup --experiment=char --flags="--preset=smoke" --rounds=5

Each round runs cold one by one (`--compile_ahead=false`: each program compiled at its first call;
an empty cache directory), cold (the default: the driver compiles the run's programs at once,
rlsoft.compile_cache.compile_ahead; another empty directory), then warm (the directory the cold
run filled), one process each, so load from other jobs hits all alike; the ratios are medians over
rounds of the wall times. Wall time is the whole process: interpreter, imports, build, compile (or
cache loads), the run. The counts are JAX's persistent-cache events (rlsoft.compile_cache).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.timing import write_json
from rlsoft.config import check, parse_flags
from rlsoft.logger import format_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_RATIO = 3.0  # issue 14: a warm smoke run at least 3x faster than a cold one
_RUNNER = """
import json, sys
from rlsoft.compile_cache import CompileCounter
counter = CompileCounter()
from experiments import {experiment}
{experiment}.main(json.loads(sys.argv[1]))
print("COUNTS " + json.dumps(dict(hits=counter.hits, misses=counter.misses)))
"""


def run_counted(experiment: str, flags: list[str], timeout: float = 900) -> dict:
    """Run `python -m experiments.<experiment> <flags>` in a fresh process (CPU, no forced devices):
    {"hits", "misses", "seconds"} (seconds: the process's wall time)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RUNNER.format(experiment=experiment), json.dumps(flags)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{experiment} {' '.join(flags)} exited {out.returncode}: {out.stderr[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("COUNTS ")][-1]
    return dict(json.loads(line[len("COUNTS "):]), seconds=seconds)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    experiment: str = "countdown"
    flags: str = "--preset=smoke"
    rounds: int = 3
    out: str = ""  # write the JSON here too

    def __post_init__(self):
        check(self.experiment in ("countdown", "char", "think"),
              f"experiment={self.experiment} is invalid; expected countdown, char or think")
        check(self.rounds >= 1, f"rounds={self.rounds} is invalid; need >= 1")
        for flag in ("--compile_cache", "--compile_ahead"):
            check(flag not in self.flags, f"flags must not set {flag} (the benchmark sets it)")


def main(argv=None) -> dict:
    cfg = parse_flags(BenchConfig, argv, prog="python -m benchmarks.startup")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(cfg.rounds):
            flags = cfg.flags.split()
            if cfg.experiment == "countdown":
                flags.append(f"--cache_dir={os.path.join(tmp, 'spm')}")  # the tokenizer is trained once
            serial = run_counted(cfg.experiment, flags + [f"--compile_cache={os.path.join(tmp, f'serial{r}')}",
                                                          "--compile_ahead=false"])
            flags.append(f"--compile_cache={os.path.join(tmp, f'jax{r}')}")
            cold = run_counted(cfg.experiment, flags)
            warm = run_counted(cfg.experiment, flags)
            runs.append(dict(cold_one_by_one=serial, cold=cold, warm=warm))

    def median(f):
        return float(np.median([f(r) for r in runs]))

    out = dict(experiment=cfg.experiment, flags=cfg.flags, rounds=runs,
               cold_one_by_one_s=median(lambda r: r["cold_one_by_one"]["seconds"]),
               cold_s=median(lambda r: r["cold"]["seconds"]), warm_s=median(lambda r: r["warm"]["seconds"]),
               ratio_one_by_one_over_cold=median(lambda r: r["cold_one_by_one"]["seconds"] / r["cold"]["seconds"]),
               ratio_cold_over_warm=median(lambda r: r["cold"]["seconds"] / r["warm"]["seconds"]),
               target_ratio=TARGET_RATIO, cpu_count=os.cpu_count(), load_average=os.getloadavg()[0])
    print(json.dumps(out))
    print(format_table([dict(round=i, one_by_one_s=r["cold_one_by_one"]["seconds"], cold_s=r["cold"]["seconds"],
                             cold_compiles=r["cold"]["misses"], warm_s=r["warm"]["seconds"],
                             warm_loads=r["warm"]["hits"], warm_compiles=r["warm"]["misses"])
                        for i, r in enumerate(runs)]))
    print(f"cold one by one / cold (compiled ahead, {out['cpu_count']} CPUs) = "
          f"{out['ratio_one_by_one_over_cold']:.2f}; cold / warm = {out['ratio_cold_over_warm']:.2f} "
          f"(target >= {TARGET_RATIO:g}); load average {out['load_average']:.1f}")
    write_json(out, cfg.out)
    return out


if __name__ == "__main__":
    main()
