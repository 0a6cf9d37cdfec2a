"""A named (data, fsdp, tensor) device mesh, logical-axis rules, and the shardings of a training state.

    cfg = MeshConfig(data=2, fsdp=2, tensor=2)          # flags: --mesh.data=2 --mesh.fsdp=2 --mesh.tensor=2
    mesh = make_mesh(cfg)                               # -1 on one axis: the rest of the devices
    shard = param_shardings(params, mesh, axes_fn, units)   # axes_fn: param path -> logical axes
    state_sh = train_state_shardings(abstract_state, shard, {"policy": tx}, mesh)
    batch = shard_rows(batch, mesh)                     # leading (row) axis over data x fsdp

A model names each parameter dimension with a logical axis (models/qwen2_sharding.py for Qwen2:
embed, vocab, heads, kv_heads, mlp, norm); RULES map logical axes to mesh axes, as maxtext's
logical_axis_rules and tunix's Qwen2 ShardingConfig do: the embedding dimension over `fsdp` (each
device holds a slice of every weight and the update all-gathers it), vocab / heads / mlp over
`tensor` (Megatron-style column and row splits), rows of a batch over `data` x `fsdp`.

A rule applies to a dimension only where it splits evenly: the mesh axes' size must divide the
dimension and its number of units (`units`: a flat q_proj output of H heads x head_dim has H units,
so a shard always holds whole heads). Otherwise that dimension is replicated: Qwen2.5-3B's 2 KV
heads on tensor=4 keep k_proj / v_proj whole along their heads. A mesh axis serves at most one
dimension of a parameter (the first that can use it).

The optimizer state is sharded like its parameters: the leaves of optax's state that mirror the
params (Adam's mu and nu; found with optax.tree_map_params) take the param's sharding, the rest
(counts, apply_if_finite's flags) are replicated. A frozen role (the KL reference) is sharded like
the params too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlsoft.config import check
from rlsoft.roles import Role, TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # rows of a batch split over both: FSDP is data parallel too

MeshAxes = Union[None, str, tuple[str, ...]]
# logical axis -> mesh axis (or axes, or None: replicated). Every logical name a model uses must be here.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)

AxesFn = Callable[[tuple], tuple]  # param path (str / int keys) -> one logical axis name (or None) per dim


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 (on at most one axis) takes the devices the others leave. The product must
    equal the device count (checked by `make_mesh`, where the devices are known)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            v = getattr(self, name)
            check(isinstance(v, int) and (v == -1 or v >= 1),
                  f"{name}={v} is invalid; need a size >= 1, or -1 for the rest of the devices")
        rest = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(rest) > 1:
            raise ValueError(f"{rest[-1]}=-1 is invalid; only one mesh axis may be -1 (here: {', '.join(rest)})")

    def describe(self) -> str:
        return " ".join(f"--mesh.{n}={getattr(self, n)}" for n in MESH_AXES)

    def sizes(self, devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) for `devices` devices; ValueError (one line) when they do not fit."""
        fixed = math.prod(getattr(self, n) for n in MESH_AXES if getattr(self, n) != -1)
        if any(getattr(self, n) == -1 for n in MESH_AXES):
            if devices % fixed:
                raise ValueError(f"mesh {self.describe()} is invalid; the fixed axes ({fixed} devices) do not "
                                 f"divide the {devices} devices")
            return tuple(devices // fixed if getattr(self, n) == -1 else getattr(self, n) for n in MESH_AXES)
        if fixed != devices:
            raise ValueError(f"mesh {self.describe()} is invalid; it needs {fixed} devices and there are {devices} "
                             f"(set one axis to -1 for the rest)")
        return tuple(getattr(self, n) for n in MESH_AXES)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all); axis types Auto (XLA's partitioner
    propagates the shardings placed on inputs)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; need at least one device")
    shape = cfg.sizes(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def logical_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, MeshAxes]] = RULES, units: Mapping[str, int] | None = None) -> PartitionSpec:
    """The PartitionSpec of an array whose dims carry `logical` axis names (None: unsharded).

    A dimension takes its rule's mesh axes when their size divides both the dimension and its number
    of units (`units[name]`, default the dimension); a tuple of mesh axes (batch) falls back to its
    longest prefix that divides; otherwise the dimension is replicated. Unknown names are an error.
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table, units, used, out = dict(rules), dict(units or {}), set(), []
    for name, dim in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover: {', '.join(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        n = units.get(name, dim)
        while axes and (dim % _axes_size(mesh, axes) or n % _axes_size(mesh, axes)):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def path_keys(path: tuple) -> tuple:
    """A jax key path -> plain keys: dict keys and attribute names as str, sequence indices as int;
    the `.value` of an NNX variable dropped."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            keys.append(k.name)
        else:
            keys.append(str(k))
    return tuple(keys[:-1]) if keys and keys[-1] == "value" else tuple(keys)


def param_shardings(params: Any, mesh: Mesh, axes_fn: Optional[AxesFn] = None,
                    units: Mapping[str, int] | None = None, rules=RULES) -> Any:
    """A NamedSharding per leaf of `params` (concrete or abstract): `axes_fn(path)` names its dims,
    `logical_spec` maps them. Without `axes_fn` every leaf is replicated."""

    def one(path, leaf):
        if axes_fn is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_spec(axes_fn(path_keys(path)), leaf.shape, mesh, rules, units))

    return jax.tree_util.tree_map_with_path(one, params)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Leaves of `opt_state` that mirror the params get the param's sharding; the rest are replicated."""
    return optax.tree_map_params(tx, lambda _, sh: sh, opt_state, params_sharding,
                                 transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def train_state_shardings(state: TrainState, shard_params: Callable[[Any], Any],
                          txs: Mapping[str, optax.GradientTransformation], mesh: Mesh) -> TrainState:
    """The sharding tree of a `TrainState` (concrete or from jax.eval_shape): each role's params by
    `shard_params`, its optimizer state like its params (`txs[name]`: the role's optax chain),
    the step and `extra` replicated."""
    rep = NamedSharding(mesh, PartitionSpec())
    roles = {}
    for name, role in state.roles.items():
        psh = shard_params(role.params)
        osh = None if role.opt_state is None else opt_state_shardings(txs[name], role.opt_state, psh, mesh)
        roles[name] = Role(psh, osh)
    return TrainState(rep, roles, jax.tree.map(lambda _: rep, state.extra))


def rows_spec(rows: int, mesh: Mesh) -> PartitionSpec:
    """Rows over data x fsdp (or the longest prefix of them that divides `rows`; else replicated)."""
    return logical_spec(("batch",), (rows,), mesh)


def shard_rows(tree: Any, mesh: Mesh) -> Any:
    """Put every array leaf of `tree` on `mesh`: its leading axis by `rows_spec`, scalars replicated.

    On a mesh over several processes (rlsoft.distributed) every process holds the same host data and
    puts only the shards of its own devices (jax.make_array_from_callback), so no data crosses hosts."""

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        spec = rows_spec(x.shape[0], mesh) if x.ndim else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        if sharding.is_fully_addressable or isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def constrain(x: jax.Array, logical: Sequence[Optional[str]], rules=RULES,
              units: Mapping[str, int] | None = None) -> jax.Array:
    """`jax.lax.with_sharding_constraint` by logical axes, on the mesh of the trace (`jax.set_mesh`,
    which `rlsoft.trainer.make_update` enters when given shardings); without one, `x` unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(logical, x.shape, mesh, rules, units))


def without_axis(sharding: NamedSharding, axis: str) -> NamedSharding:
    """`sharding` with mesh axis `axis` dropped from its spec: that split gathered, the others kept."""
    def drop(axes):
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a != axis)
        return kept[0] if len(kept) == 1 else kept or None

    return sharding.update(spec=PartitionSpec(*map(drop, sharding.spec)))


def under_mesh(jitted: Callable, mesh: Mesh) -> Callable:
    """Calls (and `.lower`) of `jitted` traced under `jax.set_mesh(mesh)`, so `constrain` sees the mesh;
    every call enters it (a trace in another context would compile again)."""

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh):
            return jitted.lower(*args)

    call.lower = lower
    return call


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{n}={mesh.shape[n]}" for n in mesh.axis_names)
