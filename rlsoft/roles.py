"""Named roles: the training state of every testbed is a step counter plus a dict of roles.

A role is a set of parameters with its own optimizer state (`policy`, `thinker`, `answerer`) or
a frozen one without (`reference` for a KL term, `lagged` for a PPO-style trust region).
Single-policy testbeds use `policy`, plus `reference` or `lagged` when a term needs them; the
thinking-token testbed uses `thinker` and `answerer`, each trained by its own optax chain from
`rlsoft.optim.make_optimizer`.

    state = TrainState.create({"policy": trainable(params, tx)}, extra=monitor_state)
    params = state.params("policy")
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class Role(NamedTuple):
    params: Any
    opt_state: Optional[optax.OptState] = None  # None: a frozen role

    @property
    def trainable(self) -> bool:
        return self.opt_state is not None


def _own_buffers(tree: Any) -> Any:
    # Every leaf its own buffer: steps donate the state, and a buffer shared by two leaves
    # (a reference = the policy, zeros reused by an optimizer init) cannot be donated twice.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def trainable(params: Any, tx: optax.GradientTransformation) -> Role:
    return Role(_own_buffers(params), _own_buffers(tx.init(params)))


def frozen(params: Any) -> Role:
    return Role(_own_buffers(params), None)


class TrainState(NamedTuple):
    """`step`: updates taken (int32 scalar); `roles`: name -> Role; `extra`: testbed-owned state
    (e.g. health monitors), any pytree."""

    step: jax.Array
    roles: dict[str, Role]
    extra: Any = None

    @classmethod
    def create(cls, roles: Mapping[str, Role], extra: Any = None) -> "TrainState":
        return _own_buffers(cls(jnp.zeros((), jnp.int32), dict(roles), extra))

    def params(self, name: str) -> Any:
        return self.roles[name].params

    def replace_role(self, name: str, role: Role) -> "TrainState":
        return self._replace(roles={**self.roles, name: role})


def apply_updates(role: Role, grads: Any, tx: optax.GradientTransformation) -> Role:
    """One optimizer step of a trainable role (a non-finite gradient is skipped by apply_if_finite)."""
    updates, opt_state = tx.update(grads, role.opt_state, role.params)
    return Role(optax.apply_updates(role.params, updates), opt_state)


def stack_members(states: list) -> Any:
    """P member states (or any pytrees of one structure) -> one population pytree with a leading axis of P."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_member(state: Any, i: int) -> Any:
    """Member i of a population pytree (`stack_members`' inverse for one member)."""
    return jax.tree.map(lambda x: x[i], state)
