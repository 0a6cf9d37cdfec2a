"""jax.sharding: the same sweep on 1 device and on 8 forced host devices gives the same metrics."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rlsoft.sharding import make_mesh, shard_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SNIPPET = """
import json, sys
import jax, numpy as np
from experiments import bandit
cfg = bandit.BanditConfig(seeds=8, arms=40, steps=25, lrs=(1.0, 3.0), ref_lr=1.0,
                          schemes=("linear", "softmax", "rank"), taus=(0.5,), noise_std=0.1)
hps, metrics = bandit.run_sweep(cfg)
print(json.dumps({"devices": jax.device_count(),
                  "p_best": np.asarray(metrics["p_best"]).tolist(),
                  "effective_n": np.asarray(metrics["effective_n"]).tolist()}))
"""


def _run(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bandit_sweep_is_the_same_on_1_and_8_devices():
    one, eight = _run(1), _run(8)
    assert one["devices"] == 1 and eight["devices"] == 8
    for name in ("p_best", "effective_n"):
        np.testing.assert_allclose(np.array(eight[name]), np.array(one[name]), rtol=1e-5, atol=1e-6)


def test_shard_batch_rejects_an_indivisible_batch():
    import jax.numpy as jnp

    mesh = make_mesh()
    shard_batch(jnp.zeros((mesh.size * 3, 2)), mesh)  # divisible: fine
    if mesh.size > 1:
        with pytest.raises(ValueError, match="does not divide"):
            shard_batch(jnp.zeros((mesh.size + 1, 2)), mesh)
    with pytest.raises(ValueError, match="does not divide"):
        shard_batch(jnp.zeros(()), mesh)
