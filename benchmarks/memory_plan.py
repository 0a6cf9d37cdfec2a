"""Per-device memory of an RL run of a real Qwen2.5 size on N accelerators, planned on a CPU.

    python -m benchmarks.memory_plan --model=qwen2.5-3b --devices=8 --device_memory=80GB \\
        --episodes=256 --max_new_tokens=1024 [--remat=full] [--micro_batches=8] [--mesh.fsdp=8] [--json=PATH]

It compiles the run's own programs over abstract inputs (jax.ShapeDtypeStruct with shardings; nothing
is allocated, the model is built with nnx.eval_shape) on a mesh of N forced host devices: the RL update
(rlsoft.trainer.make_update with the state shardings of rlsoft.mesh, as rlsoft.train_loop builds it)
and the sampler (rlsoft.rollout.make_sampler over models.qwen2_decode). XLA's compiled memory analysis
gives each program's per-device argument, output, aliased (donated) and temporary bytes. Beside them,
a hand count of the parts from the shapes and shardings: parameters, gradients (float32, like the
master weights), AdamW moments, the KL reference, the sampler's KV cache, the logits of a
micro-batch. Activations are XLA's update temp less the gradient buffers (the accumulator and one
micro-batch's gradient).

Peaks: update = arguments + outputs - aliased + temp; sampling = the resident training state +
the sampler's arguments other than the params (which are the state's) + outputs + temp. The run fits
when the larger peak is within `device_memory * (1 - reserve)` (the reserve: the runtime's own
buffers, fragmentation). Caveat: XLA:CPU schedules and fuses differently from a GPU/TPU backend, so
temp sizes are this compiler's; the argument and output sizes are exact.

What the plan showed, read from XLA's buffer assignment (--xla_dump_to: *live-range.txt lists the
buffers live at the peak) and fixed in the programs themselves: (1) XLA hoisted the FSDP all-gathers
of the weights out of the micro-batch loop (loop-invariant code motion) and kept every layer's gathered
weights live through the loop (float32 on XLA:CPU, which computes bf16 products in f32);
rlsoft.trainer._varying ties the weights to each micro-batch (Qwen2.5-7B, remat=full, KL reference:
update temp 63.9 -> 26.7 GB; per layer 1.22 -> 0.12 GB). (2) For the backward of a tied LM head the
SPMD partitioner kept the table's fsdp split and all-gathered the micro-batch's dlogits [rows, N, V]
onto every device; models.qwen2_train._head gathers the table instead (Qwen2.5-0.5B, 1 layer, 64 x 512
tokens: 23.2 -> 7.7 GB). What it still cannot show: remat's saving. The jaxpr saves only each block's
input under remat=full (jax.ad_checkpoint.print_saved_residuals), but XLA:CPU schedules the
backward's recomputation early: buffers of `checkpoint/rematted_computation` are live at the loss's
peak beside its V-wide log-softmax, and 7B without a reference grows 3.6 GB a layer with remat=none
and 3.4 with full (a GPU compile may order it otherwise; not checked, no accelerator was lent). With
the KL reference XLA schedules the loop otherwise: 0.12 GB a layer, and the same temp with none and
full (7B: 26.66 GB, of which the
reference's whole-batch f32 logits alone are 19.9 GB). Running the reference one micro-batch at a
time (lax.map, or inside the loop) made XLA's plan larger both times (7B inside the loop: 2.6 GB a
layer), so it stays whole.

`--compile_layers=k` (default 1; 0: all layers) compiles the model with k and 2k layers and
extrapolates every figure linearly to the real depth: the layers are a Python loop, so XLA compiles
each one (Qwen2.5-3B at 256 x 1024 tokens: ~70-100 s per compile of the update with 1-4 layers on
the 2-core VM, about +8 s a layer, and the sampler +10-20 s a layer, so ~10 minutes each for 36
layers). Parameters, moments and cache are exactly linear in the layers; so was XLA's temp, measured:
Qwen2.5-3B's figures extrapolated from 1 and 2 layers to 4 were within 16 KB (update temp, 28.3 GB)
and 512 bytes (sampler temp) of a 4-layer compile, arguments and outputs exact
(tests/test_memory_plan.py checks it on a smaller run).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Optional, Sequence

from rlsoft.config import check, parse_flags
from rlsoft.mesh import MeshConfig
from rlsoft.train_loop import PRECISIONS, REMAT_POLICIES

PROG = "python -m benchmarks.memory_plan"
MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b")
GB = 1e9


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '512MB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*", text)
    if not m:
        raise ValueError(f"device_memory={text!r} is invalid; expected a size such as 80GB or 141GiB")
    scale = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    model: str = "qwen2.5-3b"  # a models.qwen2 preset (MODELS)
    devices: int = 8
    device_memory: str = "80GB"
    reserve: float = 0.1  # fraction of device memory kept free for the runtime
    episodes: int = 256  # sampled responses per RL step = questions x group_size
    group_size: int = 8
    prompt_length: int = 256
    max_new_tokens: int = 1024
    micro_batches: int = 8
    remat: str = "none"
    precision: str = "bf16"
    kl_coef: float = 0.04  # > 0: a frozen KL reference is part of the state
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)
    compile_layers: int = 1  # k: compile k and 2k layers and extrapolate to the model's depth; 0: all layers
    json: str = ""

    def __post_init__(self):
        check(self.model in MODELS, f"model={self.model!r} is invalid; allowed: {', '.join(MODELS)}")
        check(self.devices >= 1, f"devices={self.devices} is invalid; need >= 1")
        check(parse_bytes(self.device_memory) > 0, f"device_memory={self.device_memory!r} is invalid; need > 0")
        check(0 <= self.reserve < 1, f"reserve={self.reserve} is invalid; need 0 <= reserve < 1")
        for name in ("episodes", "group_size", "prompt_length", "max_new_tokens", "micro_batches"):
            check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} is invalid; need >= 1")
        check(self.episodes % self.group_size == 0,
              f"episodes={self.episodes} is invalid; need a multiple of group_size={self.group_size}")
        check(self.questions % self.micro_batches == 0, f"micro_batches={self.micro_batches} is invalid; it "
              f"must divide the questions (episodes / group_size = {self.questions})")
        check(self.remat in REMAT_POLICIES, f"remat={self.remat!r} is invalid; allowed: {', '.join(REMAT_POLICIES)}")
        check(self.precision in PRECISIONS, f"precision={self.precision!r} is invalid; allowed: {', '.join(PRECISIONS)}")
        check(self.kl_coef >= 0, f"kl_coef={self.kl_coef} is invalid; need >= 0")
        check(self.compile_layers >= 0, f"compile_layers={self.compile_layers} is invalid; need >= 0")
        self.mesh.sizes(self.devices)  # ValueError (one line) when the mesh does not fit the devices

    @property
    def questions(self) -> int:
        return self.episodes // self.group_size


def _programs(cfg: PlanConfig, layers: int) -> dict:
    """Compile the update and the sampler of `cfg` with the model cut to `layers` layers: memory
    analyses, hand counts and compile seconds (per device)."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from experiments.countdown import qwen2_policy
    from models import qwen2
    from rlsoft import mesh as mesh_lib
    from rlsoft import rollout, trainer

    mcfg = qwen2.Qwen2Config.preset(cfg.model, num_hidden_layers=layers, dtype=PRECISIONS[cfg.precision],
                                    param_dtype="float32")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: qwen2.Qwen2(mcfg, rngs=nnx.Rngs(0))))
    policy = qwen2_policy(graphdef, mcfg, remat=cfg.remat)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[: cfg.devices])
    ucfg = trainer.UpdateConfig(kl_coef=cfg.kl_coef, micro_batches=cfg.micro_batches)
    shard_params = lambda tree: mesh_lib.param_shardings(tree, mesh, policy.param_axes, policy.axis_units)
    abstract = jax.eval_shape(lambda p: trainer.init_state(p, ucfg), params)
    state_sh = mesh_lib.train_state_shardings(abstract, shard_params, {"policy": trainer.make_optimizer(ucfg)}, mesh)
    struct = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    state = jax.tree.map(struct, abstract, state_sh)

    def rows(shape, dtype):  # a batch array, rows over data x fsdp as rlsoft.mesh.shard_rows puts them
        spec = mesh_lib.rows_spec(shape[0], mesh) if shape else PartitionSpec()
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    b, q, p, n = cfg.episodes, cfg.questions, cfg.prompt_length, cfg.max_new_tokens
    i32, f32 = np.int32, np.float32
    batch = trainer.Batch(rows((b, p), i32), rows((b, p), bool), rows((b, n), i32), rows((b, n), bool),
                          rows((q, cfg.group_size), f32), rows((), f32), rows((q, n), i32), rows((q, p), i32),
                          rows((q, p), bool), rows((q, n), bool))
    update, _ = trainer.make_update(policy.forward, ucfg, policy.response_logits, state_sh)
    start = time.perf_counter()
    update_mem = update.lower(state, batch).compile().memory_analysis()
    update_s = time.perf_counter() - start

    sampling = rollout.SamplingConfig(max_new_tokens=n, stop_ids=(0,), pad_id=0)
    sampler = rollout.make_sampler(policy.decode, sampling, cfg.group_size)
    key = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    sample_mem = sampler.lower(state.roles["policy"].params, rows((q, p), i32), rows((q, p), bool),
                               key).compile().memory_analysis()
    sample_s = time.perf_counter() - start

    def per_device(tree):  # bytes of one device's shards
        return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    policy_role = state.roles["policy"]
    float_leaves = lambda t: [x for x in jax.tree.leaves(t) if np.issubdtype(x.dtype, np.floating)]
    grads = per_device(policy_role.params)
    rows_per_device = mesh.shape["data"] * mesh.shape["fsdp"]
    kv_bytes = np.dtype(mcfg.jnp_dtype).itemsize
    chunk = 64  # models.qwen2_decode's default private-cache chunk
    private = -(-(n - 1) // chunk) * chunk
    kv_per_token = 2 * layers * mcfg.num_key_value_heads * mcfg.head_dim * kv_bytes
    return dict(
        layers=layers,
        compile_s=dict(update=update_s, sampler=sample_s),
        xla=dict(update={k: getattr(update_mem, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")},
                 sampler={k: getattr(sample_mem, f"{k}_size_in_bytes") for k in ("argument", "output", "alias", "temp")}),
        hand=dict(
            parameters=per_device(policy_role.params),
            gradients=2 * grads,  # the micro-batch accumulator and one micro-batch's gradient
            optimizer_state=per_device(float_leaves(policy_role.opt_state)),
            reference=per_device(state.roles["reference"].params) if "reference" in state.roles else 0,
            state=per_device(state),
            # prompt K/V once per question + max_new private slots per row, rows over data x fsdp
            kv_cache=kv_per_token * (q * p + b * private) // rows_per_device,
            logits=4 * b * n * mcfg.vocab_size // (cfg.micro_batches * rows_per_device),  # f32, one micro-batch
            sampler_inputs=per_device([rows((q, p), i32), rows((q, p), bool)]),
        ),
        mesh=dict(mesh.shape),
    )


def _extrapolate(small: dict, large: dict, layers: int) -> dict:
    """Every number of the two compiles, linear in the layers, at `layers`."""
    a, b = small["layers"], large["layers"]

    def line(x, y):
        if isinstance(x, dict):
            return {k: line(x[k], y[k]) for k in x}
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return type(x)(x + (y - x) * (layers - a) / (b - a))
        return x

    out = {k: line(small[k], large[k]) for k in ("xla", "hand")}
    return dict(out, layers=layers, mesh=large["mesh"], compile_s=dict(
        small=small["compile_s"], large=large["compile_s"]), extrapolated_from=[a, b])


def plan(cfg: PlanConfig) -> dict:
    """The memory plan of `cfg` (JSON-ready): per-device figures, peaks, fit and advice."""
    from models import qwen2

    layers = qwen2.PRESETS[cfg.model]["num_hidden_layers"]
    k = cfg.compile_layers
    if k == 0 or 2 * k >= layers:
        figures = _programs(cfg, layers)
    else:
        figures = _extrapolate(_programs(cfg, k), _programs(cfg, 2 * k), layers)
    xu, xs, hand = figures["xla"]["update"], figures["xla"]["sampler"], figures["hand"]
    update_peak = xu["argument"] + xu["output"] - xu["alias"] + xu["temp"]
    sample_peak = hand["state"] + hand["sampler_inputs"] + xs["output"] + xs["temp"]
    activations = max(xu["temp"] - hand["gradients"], 0)
    memory = parse_bytes(cfg.device_memory)
    usable = int(memory * (1 - cfg.reserve))
    peak = max(update_peak, sample_peak)
    out = dict(config=dataclasses.asdict(cfg), **figures, activations=activations, update_peak=update_peak,
               sample_peak=sample_peak, peak=peak, device_memory=memory, usable=usable, fits=peak <= usable)
    out["advice"] = [] if out["fits"] else advice(cfg, out)
    return out


def advice(cfg: PlanConfig, p: dict) -> list[str]:
    """Settings that lower the larger peak, each with its estimated effect (activations scale with
    1 / micro_batches; the state with 1 / fsdp)."""
    tips, hand, usable = [], p["hand"], p["usable"]
    if p["update_peak"] > usable:
        act = p["activations"]
        for m in (2 * cfg.micro_batches, 4 * cfg.micro_batches):
            if cfg.questions % m == 0:
                est = p["update_peak"] - act * (1 - cfg.micro_batches / m)
                tips.append(f"--micro_batches={m}: at best ~{est / GB:.1f} GB (if all the activations were the "
                            f"loss's, which shrink with the micro-batch)")
                break
        if cfg.remat != "full":
            tips.append(f"--remat={'dots' if cfg.remat == 'none' else 'full'}: keeps less of each block for the backward")
        fsdp, data = p["mesh"]["fsdp"], p["mesh"]["data"]
        if data > 1:
            tips.append(f"--mesh.fsdp={fsdp * data} --mesh.data=1: the state ({hand['state'] / GB:.1f} GB) "
                        f"/ {data}")
        if hand["optimizer_state"] + hand["reference"] > 0.25 * usable:
            tips.append(f"offload the AdamW moments and the reference to host memory "
                        f"({(hand['optimizer_state'] + hand['reference']) / GB:.1f} GB; not in rlsoft yet)")
    if p["sample_peak"] > usable:
        tips.append(f"sample fewer episodes per sampler call or fewer --max_new_tokens: the sampler's temp is "
                    f"{p['xla']['sampler']['temp'] / GB:.1f} GB (KV cache by hand {hand['kv_cache'] / GB:.1f} GB)")
    return tips


def report(p: dict) -> str:
    c, h, xu, xs = p["config"], p["hand"], p["xla"]["update"], p["xla"]["sampler"]
    g = lambda x: f"{x / GB:8.2f} GB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
    how = (f"compiled with {p['extrapolated_from'][0]} and {p['extrapolated_from'][1]} layers, extrapolated to "
           f"{p['layers']}" if "extrapolated_from" in p else f"compiled with all {p['layers']} layers")
    lines = [
        f"{c['model']} on {c['devices']} devices ({mesh}), {c['device_memory']} each; {c['episodes']} episodes "
        f"(G={c['group_size']}) of {c['prompt_length']} + {c['max_new_tokens']} tokens, micro_batches="
        f"{c['micro_batches']}, remat={c['remat']}, precision={c['precision']}, kl_coef={c['kl_coef']} ({how})",
        "per device, hand count:",
        f"  parameters (f32)       {g(h['parameters'])}", f"  gradients (f32, x2)    {g(h['gradients'])}",
        f"  optimizer state        {g(h['optimizer_state'])}", f"  reference              {g(h['reference'])}",
        f"  logits (1 micro-batch) {g(h['logits'])}", f"  KV cache (sampler)     {g(h['kv_cache'])}",
        "per device, XLA memory analysis:",
        f"  update:  arguments {g(xu['argument'])}  outputs {g(xu['output'])}  aliased {g(xu['alias'])}  "
        f"temp {g(xu['temp'])}",
        f"  sampler: arguments {g(xs['argument'])}  outputs {g(xs['output'])}  temp {g(xs['temp'])}",
        f"  activations (update temp - gradients) {g(p['activations'])}",
        f"peak: update {g(p['update_peak'])}, sampling {g(p['sample_peak'])}; usable {g(p['usable'])} "
        f"({1 - c['reserve']:.0%} of {c['device_memory']})",
        ("FITS" if p["fits"] else "DOES NOT FIT") + f": peak {p['peak'] / GB:.2f} GB of {p['usable'] / GB:.2f} GB",
    ]
    lines += [f"  try {t}" for t in p["advice"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = parse_flags(PlanConfig, sys.argv[1:] if argv is None else list(argv), prog=PROG)
    import jax

    if len(jax.devices()) < cfg.devices:
        print(f"{PROG}: error: devices={cfg.devices} is invalid; this process has {len(jax.devices())} "
              f"(run it as a module: it forces the host devices before JAX starts)", file=sys.stderr)
        raise SystemExit(2)
    p = plan(cfg)
    print(report(p), flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(p, f, indent=1)
    return p


def _force_host_devices(argv: Sequence[str]) -> None:
    """Before JAX starts: N host devices (--devices, default 8) on the CPU backend."""
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
    if n.isdigit():
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")
        os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _force_host_devices(sys.argv[1:])
    try:
        fits = main()["fits"]
    except ValueError as e:  # a config that the flags' checks cannot see
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(0 if fits else 1)  # 1: the plan was made and the run does not fit
