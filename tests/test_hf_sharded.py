"""A Hugging Face checkpoint read straight into sharded arrays and exported back (models/hf.py with `mesh=`).

The checkpoint is a tiny random Qwen2ForCausalLM written by transformers. Loading and saving on the
(data, fsdp, tensor) = (2, 2, 2) mesh run in a subprocess on 8 forced host devices (as
tests/test_mesh_sharding.py); the files they write are compared here with the original.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")
from safetensors import safe_open  # noqa: E402
from test_countdown_hf import write_tokenizer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tensors(path: str) -> dict:
    """Every tensor of a checkpoint directory (single file or index), by name."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    out = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="np") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Untied (an lm_head to shard too), 4 heads / 2 KV heads over tensor=2, d=64 over fsdp=2."""
    path = str(tmp_path_factory.mktemp("hf") / "tiny-qwen2")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=256,
        use_sliding_window=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: randomise so every value is checked
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    write_tokenizer(path, vocab_size=300)  # <= 320 tokens; for experiments.countdown's --model
    return path


_LOAD = """
import json, sys
import jax, numpy as np
from flax import nnx
from models import hf, qwen2_sharding
from rlsoft import mesh as mesh_lib

path, out_single, out_split = sys.argv[1:4]
mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2))
plain = nnx.state(hf.load_model(path))  # one device, whole tensors (the reference)
model = hf.load_model(path, mesh=mesh)
state = nnx.state(model)
# The rule's shardings, as the testbed computes them for its params (rlsoft.mesh.param_shardings).
rule = mesh_lib.param_shardings(plain, mesh, qwen2_sharding.logical_axes, qwen2_sharding.axis_units(model.cfg))
flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
got, want, ref = flat(state), flat(rule), flat(plain)
report = {}
for k, x in got.items():
    report[k] = {"same_sharding": x.sharding == want[k], "spec": [a if not isinstance(a, tuple) else list(a)
                                                                   for a in x.sharding.spec],
                 "devices": len(x.sharding.device_set), "shard": list(x.addressable_shards[0].data.shape),
                 "equal": bool(np.array_equal(np.asarray(x), np.asarray(ref[k]))),
                 "dtype": str(x.dtype)}
hf.save_model(model, out_single)
hf.save_model(model, out_split, max_shard_size=100_000)  # ~0.4 MB of float32: 4 or more files
# The split export read back sharded: the index path of the loader.
again = flat(nnx.state(hf.load_model(out_split, mesh=mesh)))
# experiments.countdown's build with --model on the mesh of its flags: the params come out so.
from experiments import countdown
cfg = countdown.parse_flags(countdown.CountdownConfig, [f"--model={path}", "--preset=qwen", "--num_train=40",
                            "--eval_questions=4", "--mesh.data=2", "--mesh.fsdp=2", "--mesh.tensor=2"], presets=countdown.PRESETS)
_, params, _ = countdown.build(cfg)
built = flat(params)
print(json.dumps({"built_as_rule": sorted(built) == sorted(want) and all(built[k].sharding == want[k] for k in want),
                  "params": report, "reloaded_equal": all(bool(np.array_equal(np.asarray(again[k]), np.asarray(ref[k])))
                                                          and again[k].sharding == want[k] for k in ref)}))
"""


@pytest.mark.slow  # a subprocess with 8 forced devices loading and saving three times: ~20 s on 2 cores
def test_checkpoint_loads_sharded_by_the_rules_and_exports_bit_for_bit(ckpt, tmp_path):
    single, split = str(tmp_path / "single"), str(tmp_path / "split")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _LOAD, ckpt, single, split], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    params = out["params"]
    assert len(params) == 2 * 12 + 3  # per layer 12, embedding, final norm, untied lm_head
    for k, p in params.items():
        assert p["same_sharding"] and p["equal"] and p["devices"] == 8 and p["dtype"] == "float32", (k, p)
    # Spot checks of the rules on this model (embed 64 over fsdp=2; vocab, heads, KV heads, mlp over tensor=2).
    spec = lambda k: params[k + ".value"]["spec"]  # noqa: E731
    shard = lambda k: params[k + ".value"]["shard"]  # noqa: E731
    emb, lm, k_proj = "['embed_tokens']['embedding']", "['lm_head']['kernel']", "['layers'][1]['self_attn']['k_proj']['kernel']"
    assert spec(emb) == ["tensor", "fsdp"] and shard(emb) == [160, 32]  # [vocab 320, embed 64]
    assert spec(lm) == ["fsdp", "tensor"] and shard(lm) == [32, 160]
    assert spec(k_proj) == ["fsdp", "tensor"] and shard(k_proj) == [32, 16]  # [64, 2 KV heads x 16]
    assert spec("['norm']['weight']") in ([None], []) and shard("['norm']['weight']") == [64]
    assert out["reloaded_equal"] and out["built_as_rule"]

    # The exports hold the original tensors bit for bit: the single file is byte-identical to
    # transformers' own (same tensors, same metadata), the split one has them over several files.
    original = _tensors(ckpt)
    for path in (single, split):
        exported = _tensors(path)
        assert sorted(exported) == sorted(original), path
        for name, value in original.items():
            assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), (path, name)
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as a, open(os.path.join(single, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    index = json.load(open(os.path.join(split, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not os.path.exists(os.path.join(split, "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in original.values())
    # transformers reads the split export (its index) as the same model.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(split).eval()
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[name], err_msg=name)
