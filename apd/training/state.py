"""The train state: one pytree holding everything a resumed run needs besides the data iterator."""

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params, ema_params: float32 pytrees; opt_state: optax state;
    rng: uint32 key data of the run's base key (per-step keys are fold_in(rng, step))."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
    """EMA decay with the usual warm start: min(decay, (1 + step) / (10 + step))."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
