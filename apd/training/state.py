"""The train state: one pytree holding everything a resumed run needs besides the data iterator."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


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


_norm = jax.jit(optax.tree.norm)


def is_finite(tree: Any) -> bool:
    """Whether a parameter tree's global L2 norm is finite.

    False for any NaN or Inf, and for values so large that their squares overflow float32 (about
    1e19): the training step reports the same norms (`param_norm`, `ema_norm`), and the loop saves
    no state, and resumes from none, that fails this test.
    """
    return bool(jnp.isfinite(_norm(tree)))
