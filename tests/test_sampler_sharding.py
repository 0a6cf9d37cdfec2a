"""The sampler under the update's (data, fsdp, tensor) mesh (rlsoft.rollout.make_sampler with the params'
shardings; models/qwen2_decode.py's cache constraints).

Each test runs in a subprocess on 8 forced host devices (as tests/test_mesh_sharding.py) and compares
against the plain single-device sampler of the same params in that process.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, devices: int = 8) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_COMMON = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from flax import nnx
from models import qwen2, qwen2_decode, qwen2_sharding
from rlsoft import mesh as mesh_lib, rollout

# initializer_range 0.1: peaky next-token distributions (as tests/test_rollout.py), so a greedy
# token is not decided by float rounding.
mcfg = qwen2.Qwen2Config.preset("tiny", initializer_range=0.1)
graphdef, params = nnx.split(qwen2.Qwen2(mcfg, rngs=nnx.Rngs(0)))
# 3 segments for 20 new tokens; the 8 prompts prefilled in 2 parts of 4 rows, one row per device each
fns = qwen2_decode.decode_fns(graphdef, chunk=8, prefill_rows=1)
mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
shardings = mesh_lib.param_shardings(params, mesh, qwen2_sharding.logical_axes, qwen2_sharding.axis_units(mcfg))
q, p, g = 8, 12, 4
rng = np.random.default_rng(0)
prompts = rng.integers(1, mcfg.vocab_size, (q, p)).astype(np.int32)
pmask = np.ones((q, p), bool)
pmask[:, :4] = rng.random((q, 4)) < 0.5  # left padding of 0..4 tokens
key = jax.random.key(0)
"""

_PARITY = _COMMON + """
# A group of 4: row 0 greedy, rows 1..3 sampled at temperature 1 (the eval's call); stop id 5.
config = rollout.SamplingConfig(max_new_tokens=20, temperature=1.0, stop_ids=(5,), pad_id=0)
one = jax.device_get(rollout.make_sampler(fns, config, g, greedy_rows=1)(params, prompts, pmask, key))
sharded_params = jax.device_put(params, shardings)
sampler = rollout.make_sampler(fns, config, g, greedy_rows=1, params_sharding=shardings)
out = sampler(sharded_params, *mesh_lib.shard_rows((prompts, pmask), mesh), key)
eight = jax.device_get(out)
# Collectives of the compiled sampler (4 loops: the prefill's parts and 3 decode segments).
import re
hlo = sampler.lower(sharded_params, *mesh_lib.shard_rows((prompts, pmask), mesh), key).compile().as_text()

# The cache the sampler carries: prefill and one decode step under the mesh, as the sampler traces them.
with jax.set_mesh(mesh):
    positions = rollout.prompt_positions(pmask)
    _, cache = jax.jit(fns.prefill, static_argnums=(4, 5))(sharded_params, prompts, positions, pmask, g, 20)
    tokens, step_pos = np.zeros(q * g, np.int32), np.full(q * g, p, np.int32)
    _, stepped = jax.jit(fns.step, static_argnums=4)(sharded_params, cache, tokens, step_pos, 0)
def spec(x):  # one entry per dimension (a PartitionSpec may drop trailing Nones)
    s = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    return s + [None] * (x.ndim - len(s))
print(json.dumps({
    "tokens_one": one.tokens.tolist(), "tokens_eight": eight.tokens.tolist(),
    "mask_equal": bool(np.array_equal(one.mask, eight.mask)),
    "logprob_diff": float(np.abs(one.logprobs - eight.logprobs).max()),
    "slogprob_diff": float(np.abs(one.sampling_logprobs - eight.sampling_logprobs).max()),
    "lengths": eight.lengths.tolist(), "stopped": int(eight.stopped.sum()),
    "out_spec": spec(out.tokens),
    "prefix_k": spec(cache.prefix_k[0]), "prefix_v": spec(cache.prefix_v[1]), "valid": spec(cache.prefix_valid),
    "k": spec(cache.k[1][2]), "v": spec(cache.v[0][0]),
    "k_shard": list(cache.k[1][2].addressable_shards[0].data.shape),
    "stepped_k": spec(stepped.k[0][0]), "stepped_v": spec(stepped.v[1][0]),
    "all_gathers": len(re.findall(r" all-gather(?:-start)?\\(", hlo)), "param_leaves": len(jax.tree.leaves(params)),
}))
"""


@pytest.mark.slow  # a subprocess compiling the sampler twice (1 and 8 devices): ~30 s on 2 cores
def test_sampler_on_a_2x2x2_mesh_samples_what_one_device_samples():
    out = _run(_PARITY)
    one, eight = np.asarray(out["tokens_one"]), np.asarray(out["tokens_eight"])
    # Greedy rows (0 of each group) and sampled rows: the same tokens. A sampled token could only
    # differ where a uniform falls within float rounding of a cdf boundary; none does with this key.
    np.testing.assert_array_equal(eight[::4], one[::4])
    np.testing.assert_array_equal(eight, one)
    assert out["mask_equal"] and 0 < out["stopped"] < 32 and len(set(out["lengths"])) > 1
    # The 8-device forward sums its matmuls in another order (fsdp and tensor partial sums): float32
    # rounding of log-probs of magnitude <= ~10.
    assert out["logprob_diff"] <= 1e-5 and out["slogprob_diff"] <= 1e-5, out
    rows = ["data", "fsdp"]
    assert out["out_spec"] == [rows, None]
    # The decode cache: rows over data x fsdp, the tiny model's 2 KV heads over tensor=2, held so
    # across a step (32 rows x 2 heads -> 8 x 1 per device). 19 decode steps in chunks of 8, 8 and 3
    # slots (rollout.segment_ends: the last chunk holds only the steps left).
    for name in ("prefix_k", "prefix_v", "k", "v", "stepped_k", "stepped_v"):
        assert out[name] == [rows, "tensor", None, None], (name, out[name])
    assert out["valid"] == [rows, None] and out["k_shard"] == [8, 1, 32, 3]
    # The weights' fsdp split is gathered once per call, not once per loop: left to XLA each of the 4
    # loops hoisted its own gathers (and held its own gathered copy), ~4 per fsdp-split weight.
    assert out["all_gathers"] <= out["param_leaves"], out["all_gathers"]


_STEPS = _COMMON + """
from conftest import _compiles
from experiments.countdown import qwen2_policy
from rlsoft import trainer
from rlsoft.config import build_config
from rlsoft.train_loop import TrainConfig

policy = qwen2_policy(graphdef, mcfg)
cfg = build_config(TrainConfig, ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2", "--kl_coef=0.05",
                                 "--policy.learning_rate=1e-2", "--policy.warmup_steps=0"])
abstract = jax.eval_shape(lambda p: trainer.init_state(p, cfg), params)
shard = lambda tree: mesh_lib.param_shardings(tree, mesh, policy.param_axes, policy.axis_units)
state_sh = mesh_lib.train_state_shardings(abstract, shard, {"policy": trainer.make_optimizer(cfg)}, mesh)
state = jax.device_put(trainer.init_state(jax.device_put(params, shard(params)), cfg), state_sh)
update, _ = trainer.make_update(policy.forward, cfg, policy.response_logits, state_sh)
config = rollout.SamplingConfig(max_new_tokens=12, temperature=1.0, stop_ids=(5,), pad_id=0)
sampler = rollout.make_sampler(policy.decode, config, g, params_sharding=state_sh.roles["policy"].params)

def step(state, t):
    out = sampler(state.params("policy"), *mesh_lib.shard_rows((prompts, pmask), mesh), jax.random.fold_in(key, t))
    tokens, mask = jax.device_get((out.tokens, out.mask))  # explicit: the rewards are host work
    rewards = (tokens == 7).sum(1).reshape(q, g).astype(np.float32)
    batch = trainer.Batch(prompts=np.repeat(prompts, g, 0), prompt_mask=np.repeat(pmask, g, 0), responses=tokens,
                          response_mask=mask, rewards=rewards, tau=np.float32(0.5), sl_responses=tokens[::g],
                          sl_prompts=prompts, sl_prompt_mask=pmask, sl_mask=np.zeros_like(mask[::g]))
    batch = jax.device_put(batch, jax.tree.map(lambda x: jax.sharding.NamedSharding(
        mesh, mesh_lib.rows_spec(x.shape[0], mesh) if x.ndim else jax.sharding.PartitionSpec()), batch))
    return update(state, batch)[0], tokens

compiled, samples = [], []
first = jax.device_get(state.params("policy"))
for t in range(4):
    with _compiles() as seen:
        state, tokens = step(state, t)
        jax.block_until_ready(state)
    compiled.append(len(seen))
    samples.append(tokens.tolist())
    # The params the sampler reads are the update's output as it left them: device arrays with the
    # state's shardings (the sampler's in_shardings; a host copy would come back uncommitted).
    same = jax.tree.map(lambda x, s: isinstance(x, jax.Array) and x.committed and x.sharding == s,
                        state.params("policy"), state_sh.roles["policy"].params)
    assert all(jax.tree.leaves(same)), t
moved = max(float(np.abs(a - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(first),
                                                                  jax.tree.leaves(jax.device_get(state.params("policy")))))
print(json.dumps({"compiled": compiled, "moved": moved, "step": int(state.step),
                  "distinct_samples": len({json.dumps(s) for s in samples})}))
"""


@pytest.mark.slow  # a subprocess compiling the sharded sampler and update: ~40 s on 2 cores
def test_sampler_and_update_alternate_on_the_mesh_without_recompiles():
    out = _run(_STEPS)
    assert out["step"] == 4 and out["moved"] > 1e-3
    assert out["compiled"][0] > 0, out  # the counter counts: the first step compiles sampler and update
    assert out["compiled"][1:] == [0, 0, 0], out
    assert out["distinct_samples"] == 4  # each step sampled anew (its own key, updated params)
