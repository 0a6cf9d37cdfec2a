"""jax.sharding: the multi-device paths run in subprocesses on 8 forced host devices (every run, on
any machine), the single-device ones in process; the same bandit sweep on 1 and 8 devices gives
the same metrics."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlsoft.sharding import make_mesh, replicate, shard_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SWEEP = """
import json, sys
import jax, numpy as np
from experiments import bandit
sharded_inputs, sharded_outputs = [], []
_shard, _sweep = bandit.shard_batch, bandit.bandit_sweep.sweep

def shard_batch(tree, mesh):  # record the devices the seeds were split over
    out = _shard(tree, mesh)
    sharded_inputs.append(sorted({len(x.sharding.device_set) for x in jax.tree.leaves(out)}))
    return out

def sweep(*args, **kwargs):  # ... and the devices the compiled sweep's outputs live on
    out = _sweep(*args, **kwargs)
    sharded_outputs.append(sorted({len(x.sharding.device_set) for x in jax.tree.leaves(out)}))
    return out

bandit.shard_batch, bandit.bandit_sweep.sweep = shard_batch, sweep
cfg = bandit.BanditConfig(seeds=8, arms=40, steps=25, lrs=(1.0, 3.0), ref_lr=1.0,
                          schemes=("linear", "softmax", "rank"), taus=(0.5,), noise_std=0.1)
hps, metrics = bandit.run_sweep(cfg)
print(json.dumps({"devices": jax.device_count(), "inputs": sharded_inputs, "outputs": sharded_outputs,
                  "group_size": cfg.group_size,
                  "metrics": {k: np.asarray(v).tolist() for k, v in metrics.items()}}))
"""

_SHARD = """
import json
import jax, jax.numpy as jnp, numpy as np
from rlsoft.sharding import make_mesh, replicate, shard_batch
mesh = make_mesh()
x = jnp.arange(48.0).reshape(24, 2)
s = shard_batch({"x": x, "y": jnp.arange(8)}, mesh)
shards = sorted(s["x"].addressable_shards, key=lambda sh: sh.index[0].start)
out = {"devices": jax.device_count(), "mesh": mesh.size,
       "x_rows": [np.asarray(sh.data)[:, 0].tolist() for sh in shards],
       "x_devices": len({sh.device for sh in shards}),
       "y_rows": sorted(np.asarray(sh.data).tolist() for sh in s["y"].addressable_shards),
       "x_equal": bool((np.asarray(s["x"]) == np.asarray(x)).all()),
       "doubled_sum": float(jax.jit(lambda t: (2 * t["x"]).sum())(s))}
errors = {}
for name, tree in (("9 rows", jnp.zeros((9, 2))), ("scalar", jnp.zeros(())),
                   ("one leaf of 12 rows", {"a": jnp.zeros((8,)), "b": jnp.zeros((12, 3))})):
    try:
        shard_batch(tree, mesh)
        errors[name] = None
    except ValueError as e:
        errors[name] = str(e)
out["errors"] = errors
out["replicated_rows"] = sorted(int(sh.data.shape[0]) for sh in replicate(x, mesh).addressable_shards)
print(json.dumps(out))
"""


def _run(code: str, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bandit_sweep_is_the_same_on_1_and_8_devices():
    one, eight = _run(_SWEEP, 1), _run(_SWEEP, 8)
    assert one["devices"] == 1 and eight["devices"] == 8
    # On 8 devices the seeds really are split, and the compiled sweep's outputs live on all 8.
    assert one["inputs"] == [[1]] and eight["inputs"] == [[8]]
    assert one["outputs"] == [[1]] and eight["outputs"] == [[8]]
    m1 = {k: np.array(v, np.float64) for k, v in one["metrics"].items()}
    m8 = {k: np.array(v, np.float64) for k, v in eight["metrics"].items()}
    assert set(m8) == set(m1) and "eval/p_best" in m1 and m1["eval/p_best"].shape == (6, 8, 25)
    # weight_sum is a sum of G weights that cancels to ~0 for the centred schemes: its float32
    # rounding (which the partitioned program's summation order changes) scales with the summands,
    # sum_i |w_i| <= G max|w|, not with the result. Same relative tolerance, on that scale.
    ws = "train/weights/weight_sum"
    summands = one["group_size"] * np.maximum(np.abs(m1["train/weights/max_weight"]),
                                              np.abs(m1["train/weights/min_weight"]))
    assert np.all(np.abs(m8[ws] - m1[ws]) <= 1e-5 * summands + 1e-6)
    for name in sorted(set(m1) - {ws}):  # every other metric of every (config, seed, step)
        np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_shard_batch_on_8_devices():
    out = _run(_SHARD, 8)
    assert out["devices"] == 8 and out["mesh"] == 8
    # 24 rows over 8 devices: 3 consecutive rows each (column 0 holds 2 * row), one shard a device.
    assert out["x_rows"] == [[6.0 * k, 6.0 * k + 2, 6.0 * k + 4] for k in range(8)]
    assert out["x_devices"] == 8 and out["x_equal"]
    assert out["y_rows"] == [[k] for k in range(8)]
    assert out["doubled_sum"] == 2 * sum(range(48))
    for name, msg in out["errors"].items():
        assert msg is not None and "does not divide across 8 devices" in msg, (name, msg)
    assert "multiple of 8" in out["errors"]["9 rows"] and "(12, 3)" in out["errors"]["one leaf of 12 rows"]
    assert out["replicated_rows"] == [24] * 8


def test_shard_batch_on_one_device():
    mesh = make_mesh(jax.devices()[:1])
    assert mesh.size == 1
    x = jnp.arange(6.0).reshape(3, 2)
    s = shard_batch(x, mesh)  # any batch size divides by 1
    np.testing.assert_array_equal(s, x)
    assert s.sharding.mesh.shape == {"data": 1}
    np.testing.assert_array_equal(replicate(x, mesh), x)
    with pytest.raises(ValueError, match="does not divide across 1 devices"):
        shard_batch(jnp.zeros(()), mesh)
    with pytest.raises(ValueError, match="devices is empty"):
        make_mesh([])
