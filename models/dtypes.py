"""The dtype fields shared by the model configs: names in the config, jnp dtypes for the modules."""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DtypeFields:
    """Mixin for a frozen config dataclass with `param_dtype` (storage) and `dtype` (compute) names."""

    param_dtype: str
    dtype: str

    def check_dtypes(self) -> None:
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {', '.join(DTYPES)}")

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]
