"""The (data, fsdp, tensor) mesh and logical-axis sharding (rlsoft.mesh, models.qwen2_sharding).

Flags and specs are checked in process (specs on an AbstractMesh, no devices needed); the update
runs in a subprocess on 8 forced host devices (as tests/test_sharding.py), against the plain
single-device update of the same model and batch.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from experiments import countdown
from models import qwen2, qwen2_sharding
from rlsoft import mesh as mesh_lib
from rlsoft.config import build_config, parse_flags
from rlsoft.train_loop import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), mesh_lib.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ---- (a) the mesh from flags ------------------------------------------------------------------
def test_mesh_sizes_from_flags_and_the_rest_rule():
    cfg = build_config(TrainConfig, ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"])
    assert cfg.mesh == mesh_lib.MeshConfig(2, 2, 2) and cfg.mesh.sizes(8) == (2, 2, 2)
    assert TrainConfig().mesh.sizes(8) == (8, 1, 1)  # the default: a data-parallel mesh, as before
    rest = build_config(TrainConfig, ["--mesh.data=1", "--mesh.fsdp=-1", "--mesh.tensor=2"]).mesh
    assert rest.sizes(8) == (1, 4, 2) and rest.sizes(2) == (1, 1, 2)
    assert mesh_lib.MeshConfig(data=-1, fsdp=2, tensor=2).sizes(8) == (2, 2, 2)
    assert mesh_lib.make_mesh(mesh_lib.MeshConfig()).shape == {"data": 1, "fsdp": 1, "tensor": 1}
    for sizes, devices, says in (((2, 2, 2), 4, "needs 8 devices and there are 4"),
                                 ((-1, 3, 1), 8, "(3 devices) do not divide the 8 devices")):
        with pytest.raises(ValueError, match=r"^mesh --mesh.data=.* is invalid; ") as e:
            mesh_lib.MeshConfig(*sizes).sizes(devices)
        assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, says", [
    (["--mesh.fsdp=-1"], "mesh.fsdp=-1 is invalid; only one mesh axis may be -1"),  # data is -1 by default
    (["--mesh.tensor=0"], "mesh.tensor=0 is invalid; need a size >= 1"),
    (["--mesh.data=-2"], "mesh.data=-2 is invalid"),
    (["--mesh.fsdp=two"], "--mesh.fsdp=two is invalid; expected an integer"),
    (["--mesh=2"], "--mesh is a section"),
])
def test_bad_mesh_flags_exit_2_with_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(TrainConfig, flags, prog="prog")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prog: error: ") and says in err[0], err


def test_mesh_larger_than_the_devices_exits_2_before_building(tmp_path, capsys):
    # This process has one device: 2 x 2 x 2 does not fit; the run stops before the model or the
    # run directory exists.
    logdir = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        countdown.main(["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", f"--logdir={logdir}",
                        "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m experiments.countdown: error: mesh --mesh.data=2 --mesh.fsdp=2 --mesh.tensor=2 "
                   "is invalid; it needs 8 devices and there are 1 (set one axis to -1 for the rest)"]
    assert not logdir.exists()


# ---- (b) logical axes and the PartitionSpecs of the rules -----------------------------------------
def _specs(cfg, mesh):
    params = nnx.state(nnx.eval_shape(lambda: qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))))
    sh = mesh_lib.param_shardings(params, mesh, qwen2_sharding.logical_axes, qwen2_sharding.axis_units(cfg))
    return {"/".join(map(str, mesh_lib.path_keys(p))): s.spec for p, s in jax.tree_util.tree_flatten_with_path(sh)[0]}


def test_logical_axes_cover_every_qwen2_parameter():
    rules = dict(mesh_lib.RULES)
    for tie in (True, False):  # an untied config has an lm_head
        cfg = qwen2.Qwen2Config.preset("tiny", tie_word_embeddings=tie)
        params = nnx.state(nnx.eval_shape(lambda: qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))))
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        assert len(leaves) == 2 * 12 + 2 + (0 if tie else 1)  # 12 per layer, embedding, final norm
        for path, leaf in leaves:
            axes = qwen2_sharding.logical_axes(mesh_lib.path_keys(path))
            assert len(axes) == leaf.ndim and all(a in rules for a in axes), (path, axes)
    with pytest.raises(ValueError, match="layers/0/mlp/extra/kernel has no logical axes"):
        qwen2_sharding.logical_axes(("layers", 0, "mlp", "extra", "kernel"))


def test_tiny_preset_specs_on_2x2x2_follow_the_rules():
    specs = _specs(qwen2.Qwen2Config.preset("tiny"), _abstract_mesh(2, 2, 2))
    layer = "layers/1/"
    expected = {  # hand-checked: embed -> fsdp, vocab / heads / kv_heads / mlp -> tensor, norm unsharded
        "embed_tokens/embedding": P("tensor", "fsdp"),  # [vocab 1024, embed 128]
        layer + "self_attn/q_proj/kernel": P("fsdp", "tensor"),  # [embed, 4 heads x 32]
        layer + "self_attn/q_proj/bias": P("tensor"),
        layer + "self_attn/k_proj/kernel": P("fsdp", "tensor"),  # 2 KV heads over tensor=2
        layer + "self_attn/v_proj/bias": P("tensor"),
        layer + "self_attn/o_proj/kernel": P("tensor", "fsdp"),
        layer + "mlp/gate_proj/kernel": P("fsdp", "tensor"),
        layer + "mlp/down_proj/kernel": P("tensor", "fsdp"),
        layer + "input_layernorm/weight": P(None),
        "norm/weight": P(None),
    }
    assert {k: specs[k] for k in expected} == expected
    assert len(specs) == 26


def test_rules_that_do_not_divide_replicate_that_dimension():
    # Qwen2.5-3B: 2 KV heads on tensor=4 (their flat 2 x 128 = 256 columns would divide by 4, but a
    # shard must hold whole heads); 16 query heads, 11008 mlp and 151936 vocab do divide.
    # (Two layers of each: the specs do not depend on the depth, the abstract init does.)
    specs = _specs(qwen2.Qwen2Config.preset("qwen2.5-3b", num_hidden_layers=2), _abstract_mesh(1, 2, 4))
    assert specs["layers/1/self_attn/k_proj/kernel"] == P("fsdp", None)
    assert specs["layers/1/self_attn/v_proj/bias"] == P(None)
    assert specs["layers/1/self_attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert specs["layers/1/mlp/up_proj/kernel"] == P("fsdp", "tensor")
    assert specs["embed_tokens/embedding"] == P("tensor", "fsdp")
    # Qwen2.5-0.5B: 14 query heads (896 = 14 x 64 columns) on tensor=4; the tiny model's d=128 on fsdp=3.
    specs = _specs(qwen2.Qwen2Config.preset("qwen2.5-0.5b", num_hidden_layers=2), _abstract_mesh(1, 2, 4))
    assert specs["layers/0/self_attn/q_proj/kernel"] == P("fsdp", None)
    assert specs["layers/0/self_attn/o_proj/kernel"] == P(None, "fsdp")
    specs = _specs(qwen2.Qwen2Config.preset("tiny"), _abstract_mesh(1, 3, 2))
    assert specs["embed_tokens/embedding"] == P("tensor", None)
    assert specs["layers/0/mlp/down_proj/kernel"] == P("tensor", None)


def test_logical_spec_edge_cases():
    mesh = _abstract_mesh(2, 2, 2)
    assert mesh_lib.rows_spec(8, mesh) == P(("data", "fsdp"))
    assert mesh_lib.rows_spec(2, mesh) == P("data")  # the longest prefix of data x fsdp that divides
    assert mesh_lib.rows_spec(3, mesh) == P(None)
    assert mesh_lib.logical_spec(("mlp", "heads"), (8, 8), mesh) == P("tensor", None)  # a mesh axis once
    with pytest.raises(ValueError, match="logical axis 'hidden' has no rule"):
        mesh_lib.logical_spec(("hidden",), (8,), mesh)
    with pytest.raises(ValueError, match="do not match shape"):
        mesh_lib.logical_spec(("embed",), (8, 8), mesh)


# ---- (c, d) the update on 8 devices: same parameters as 1 device, sharded, compiled once ------------
_UPDATE = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np
from flax import nnx
from conftest import _compiles
from experiments.countdown import qwen2_policy
from models import qwen2, qwen2_sharding
from rlsoft import mesh as mesh_lib, optim, trainer
from rlsoft.config import build_config
from rlsoft.train_loop import TrainConfig

STEPS = 3
mcfg = qwen2.Qwen2Config.preset("tiny")
graphdef, params = nnx.split(qwen2.Qwen2(mcfg, rngs=nnx.Rngs(0)))
policy = qwen2_policy(graphdef, mcfg)
cfg = build_config(TrainConfig, ["--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2", "--kl_coef=0.05",
                                 "--micro_batches=2", "--policy.learning_rate=3e-3", "--policy.warmup_steps=0",
                                 "--policy.eps=1e-4"])
q, g, p, n = 4, 4, 8, 8
rng = np.random.default_rng(0)
pmask = np.ones((q, p), bool); pmask[:, :2] = rng.random((q, 2)) < 0.5
prompts = rng.integers(1, mcfg.vocab_size, (q, p)).astype(np.int32)
resp = rng.integers(1, mcfg.vocab_size, (q * g, n)).astype(np.int32)
rmask = np.arange(n)[None] < rng.integers(3, n + 1, (q * g, 1))
batch = trainer.Batch(prompts=np.repeat(prompts, g, 0), prompt_mask=np.repeat(pmask, g, 0), responses=resp,
                      response_mask=rmask, rewards=rng.random((q, g)).astype(np.float32), tau=np.float32(0.5),
                      sl_responses=resp[::g], sl_prompts=prompts, sl_prompt_mask=pmask,
                      sl_mask=np.zeros((q, n), bool))

# 1 device: the plain update (no shardings), as before this change.
update, _ = trainer.make_update(policy.forward, cfg, policy.response_logits)
state, one_metrics = trainer.init_state(params, cfg), []
for _ in range(STEPS):
    state, m = update(state, batch)
    one_metrics.append({k: float(m[k]) for k in ("train/loss", "train/grad_norm", "train/kl")})
one = jax.device_get(state)

# 8 devices, mesh from the flags: params, optimizer state and reference by the logical axes.
mesh = mesh_lib.make_mesh(cfg.mesh)
shard = lambda tree: mesh_lib.param_shardings(tree, mesh, policy.param_axes, policy.axis_units)
abstract = jax.eval_shape(lambda p: trainer.init_state(p, cfg), params)
state_sh = mesh_lib.train_state_shardings(abstract, shard, {"policy": trainer.make_optimizer(cfg)}, mesh)
state = jax.device_put(trainer.init_state(jax.device_put(params, shard(params)), cfg), state_sh)
update, _ = trainer.make_update(policy.forward, cfg, policy.response_logits, state_sharding=state_sh)
state, m = update(state, mesh_lib.shard_rows(batch, mesh))
eight_metrics = [{k: float(m[k]) for k in one_metrics[0]}]
with _compiles() as compiled:
    for _ in range(STEPS - 1):
        state, m = update(state, mesh_lib.shard_rows(batch, mesh))
        eight_metrics.append({k: float(m[k]) for k in one_metrics[0]})
    jax.block_until_ready(state)

def leaves(st):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(st)[0]}

a, b = leaves(one), leaves(state)
diff = {k: float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)), initial=0.0))
        for k in a}
moved = max(float(np.max(np.abs(np.asarray(a[".roles['policy'].params" + k]) - np.asarray(v))))
            for k, v in leaves(params).items())
print(json.dumps({
    "mesh": dict(mesh.shape), "compiled": compiled, "one": one_metrics, "eight": eight_metrics,
    "keys_equal": sorted(a) == sorted(b), "diff": diff, "moved": moved, "step": int(state.step),
    "specs": {k: list(v.sharding.spec) for k, v in b.items()},
    "devices": {k: len(v.sharding.device_set) for k, v in b.items()},
    "shard_shapes": {k: list(v.addressable_shards[0].data.shape) for k, v in b.items()},
}))
"""


def _run(code: str, devices: int, args=()) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_update_on_a_2x2x2_mesh_equals_one_device_sharded_and_compiled_once():
    out = _run(_UPDATE, 8)
    assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and out["step"] == 3
    # (d) steps 2 and 3 reuse the first step's program: the state comes back as it went in.
    assert out["compiled"] == []
    # (c) Same parameters, optimizer state and reference. The 8-device program sums gradients in
    # another order; float32 rounding of the summands (~1e-7 relative) then stays at the params'
    # own ulp scale (|p| <= ~1, ulp(1) = 1.2e-7) through 3 AdamW steps: atol 1e-6, a few ulps, while
    # the params moved ~1e-2. Adam's eps is 1e-4 here: with 1e-8, an entry whose gradient is near eps
    # has its step g / (|g| + eps) change by up to lr / (4 eps) per unit of gradient rounding, which
    # made one-step parameter differences up to 5e-5 (0.02% of entries above 1e-6) on this batch.
    assert out["keys_equal"] and out["moved"] > 5e-3
    worst = max(out["diff"], key=out["diff"].get)
    assert out["diff"][worst] <= 1e-6, (worst, out["diff"][worst])
    for one, eight in zip(out["one"], out["eight"], strict=True):  # the loss, KL and gradient norm of each step
        for k in one:
            assert eight[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), (k, one, eight)
    # Really sharded: params, Adam's moments and the reference by the rules; scalars replicated.
    specs, shapes, devs = out["specs"], out["shard_shapes"], out["devices"]
    emb, k_proj = "['embed_tokens']['embedding'].value", "['layers'][0]['self_attn']['k_proj']['kernel'].value"
    mu = ".roles['policy'].opt_state.inner_state[1][0].mu"
    nu = ".roles['policy'].opt_state.inner_state[1][0].nu"
    for root in (".roles['policy'].params", mu, nu, ".roles['reference'].params"):
        assert specs[root + emb] == ["tensor", "fsdp"], root
        assert shapes[root + emb] == [512, 64] and devs[root + emb] == 8
        assert specs[root + k_proj] == ["fsdp", "tensor"] and shapes[root + k_proj] == [64, 32]
        assert specs[root + "['norm']['weight'].value"] == [None]
    for scalar in (".step", ".roles['policy'].opt_state.inner_state[1][0].count",
                   ".roles['policy'].opt_state.total_notfinite"):
        assert specs[scalar] == [] and devs[scalar] == 8


_TESTBED = """
import json, sys
sys.path.insert(0, "tests")
import jax
from conftest import _compiles
from experiments import countdown

cfg = countdown.parse_flags(countdown.CountdownConfig, sys.argv[1:], presets=countdown.PRESETS)
driver = countdown.make_driver(cfg)
bed, state, compiled = driver.testbed, driver.state, []
for step in range(4):  # 2 warm-start steps, then 2 RL steps (sampler + update); the first of each compiles
    with _compiles() as seen:
        state, metrics = bed.train(state, step, 1, driver.keys)
        jax.block_until_ready(state)
    compiled.append(len(seen))
specs = {jax.tree_util.keystr(k): list(v.sharding.spec) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}
print(json.dumps({"mesh": dict(bed.mesh.shape), "compiled": compiled, "specs": specs,
                  "loss": float(metrics["train/loss"]), "step": int(state.step)}))
"""


@pytest.mark.slow  # the countdown testbed (sampler, warm start, RL update) compiled on 8 devices: minutes
def test_countdown_testbed_on_a_2x2x2_mesh_is_sharded_and_compiles_once(tmp_path):
    flags = ["--preset=smoke", f"--cache_dir={tmp_path / 'cache'}", "--kl_coef=0.01", "--questions_per_step=4",
             "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"]
    out = _run(_TESTBED, 8, flags)
    assert out["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and out["step"] == 4
    assert out["compiled"][1] == 0 and out["compiled"][3] == 0, out["compiled"]
    assert out["compiled"][0] > 0 and out["compiled"][2] > 0  # the counter does count
    assert np.isfinite(out["loss"])
    q = "['layers'][1]['self_attn']['q_proj']['kernel'].value"
    for root in (".roles['policy'].params", ".roles['policy'].opt_state.inner_state[1][0].mu",
                 ".roles['reference'].params"):
        assert out["specs"][root + q] == ["fsdp", "tensor"], root
