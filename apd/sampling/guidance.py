"""Classifier-free guidance and input guidance (paper Eq. 6-8), as one batched network call.

Input guidance contrasts the prediction from the actual (cleaner) context with one from a noisier
context: the known tokens (update False) are noised further to a context level c, the tokens being
generated are left as they are, and on those tokens

    pred = (1 + w_i) * pred(z; t) - w_i * pred(z_noisier; t_noisier).

Classifier-free guidance, pred = (1 + w_c) * pred(label) - w_c * pred(null label), is applied
first at each of the two contexts. With both there are four branches; all branches of a step are
concatenated along the batch axis and go through the network as ONE call.

Which branches exist is static (part of the compiled program); the scales are traced values. A
branch is left out only when its scale is the Python number 0, so sweeping scales (including a
traced 0) never recompiles, and an unguided run does not pay for unused branches.

The context level c: 'match' (default) is, per image, the mean current level of the tokens being
generated; a number in [0, 1] is a fixed level. Context tokens already at or above c are unchanged.
"""

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from apd.sampling import ddim
from apd.schedules import Schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Branches:
    """The static branch structure of a guided step."""

    cfg: bool = False
    input: bool = False

    @property
    def count(self) -> int:
        """Network evaluations per step, all in one batched call."""
        return (2 if self.cfg else 1) * (2 if self.input else 1)


def is_off(scale) -> bool:
    """True when a guidance scale is the Python (or NumPy) number 0: its branch is left out."""
    return isinstance(scale, numbers.Real) and not isinstance(scale, bool) and scale == 0


def context_level(t: Array, update: Array, level: Array | None) -> Array:
    """The level of the noisier context, [B, 1, ..., 1].

    Args:
      t: [B, *tokens] current levels; update: [B, *tokens] bool.
      level: None for 'match' (mean level of each image's updated tokens), else a scalar in [0, 1].
    """
    axes = tuple(range(1, t.ndim))
    if level is None:
        weight = update.astype(t.dtype)
        total = jnp.sum(weight, axis=axes, keepdims=True)
        return jnp.sum(weight * t, axis=axes, keepdims=True) / jnp.maximum(total, 1.0)
    return jnp.broadcast_to(jnp.asarray(level, t.dtype), (t.shape[0],) + (1,) * len(axes))


def noisier_context(
    z: Array, t: Array, update: Array, level: Array, key: Array, schedule: Schedule
) -> tuple[Array, Array]:
    """Noises the known tokens (update False) up to `level`; the updated tokens are unchanged.

    Args:
      z: [B, *tokens, C] float32 at levels t [B, *tokens].
      update: [B, *tokens] bool.
      level: broadcastable to t, the context level.
      key: PRNG key for the added noise.
    Returns:
      (z_noisier, t_noisier), shaped like (z, t).
    """
    t_noisier = jnp.where(update, t, jnp.maximum(t, level))
    noise = jax.random.normal(key, z.shape, z.dtype)
    return ddim.forward_step(z, t, t_noisier, noise, schedule), t_noisier


def guided_prediction(
    denoise,
    z: Array,
    t: Array,
    update: Array,
    labels: Array | None,
    key: Array,
    *,
    branches: Branches,
    num_classes: int,
    cfg_scale: Array,
    input_scale: Array,
    level: Array | None,
    schedule: Schedule,
) -> Array:
    """The network's (guided) prediction at state z, levels t, from one batched call.

    Args:
      denoise: (z [N, *tokens, C], levels [N, *tokens], labels [N] or None) -> prediction like z.
      z: [B, *tokens, C] float32; t: [B, *tokens] float32; update: [B, *tokens] bool.
      labels: [B] int32 or None; num_classes is the null label.
      key: PRNG key for the noisier context.
      branches: which branches run; cfg_scale, input_scale: traced scalars.
      level: the context level (see `context_level`).
    Returns:
      The prediction, like z.
    """
    contexts = [(z, t)]
    if branches.input:
        contexts.append(
            noisier_context(z, t, update, context_level(t, update, level), key, schedule)
        )
    label_sets = [labels]
    if branches.cfg:
        label_sets.append(jnp.full_like(labels, num_classes))

    z_all = jnp.concatenate([zc for zc, _ in contexts for _ in label_sets])
    t_all = jnp.concatenate([tc for _, tc in contexts for _ in label_sets])
    labels_all = None if labels is None else jnp.concatenate(label_sets * len(contexts))
    pred = denoise(z_all, t_all, labels_all)
    if pred.shape != z_all.shape:
        raise ValueError(
            f"denoise must return a prediction shaped like its input {z_all.shape}; got "
            f"{pred.shape}."
        )
    pred = pred.astype(jnp.float32).reshape(len(contexts), len(label_sets), *z.shape)
    if branches.cfg:
        per_context = (1.0 + cfg_scale) * pred[:, 0] - cfg_scale * pred[:, 1]
    else:
        per_context = pred[:, 0]
    if branches.input:
        return (1.0 + input_scale) * per_context[0] - input_scale * per_context[1]
    return per_context[0]
