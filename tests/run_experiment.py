"""Subprocess harness for the run-level tests: run an experiment's driver, optionally SIGKILL it
right after the checkpoint of step K, and save the final policy parameters.

    python tests/run_experiment.py <experiment> <flags json> <full|kill> <out.npz> [K]
"""
import importlib
import json
import os
import signal
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlsoft.config import parse_flags  # noqa: E402

name, flags, mode, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
exp = importlib.import_module(f"experiments.{name}")
config_cls = {"countdown": "CountdownConfig", "char": "CharConfig"}[name]
cfg = parse_flags(getattr(exp, config_cls), flags, presets=exp.PRESETS)
made = exp.make_driver(cfg)
driver = made[0] if isinstance(made, tuple) else made
if mode == "kill":
    driver.run(until=int(sys.argv[5]))
    os.kill(os.getpid(), signal.SIGKILL)  # a hard stop right after a checkpoint
driver.run()
driver.close()
np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(driver.state.params("policy"))], step=driver.step)
print(json.dumps({"devices": jax.device_count(), "run_dir": driver.run_dir.path}))
