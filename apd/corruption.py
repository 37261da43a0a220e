"""The forward process per token, and conversions between prediction parameterisations.

Shapes: data x, noise eps and z are [B, *tokens, C]; levels are [B, *tokens] float32 in [0, 1]
(one level per token, shared by its channels; size-1 token axes broadcast, so a per-sample level
is [B, 1, 1] for images).

Prediction types (what the network outputs):
  'x'    the clean data,
  'eps'  the noise,
  'v'    the flow velocity eps - x (dz/dt of rectified flow; the paper's choice).
Each converts into the others elementwise given (z, alpha, sigma).
"""

import jax
import jax.numpy as jnp

from apd import checks
from apd.schedules import Schedule

Array = jax.Array

PREDICTIONS = ("x", "eps", "v")


def expand_levels(levels: Array, x: Array) -> Array:
    """levels [B, *tokens] -> [B, *tokens, 1], ready to broadcast against x [B, *tokens, C]."""
    checks.check_level_shape(jnp.shape(levels), jnp.shape(x))
    return jnp.asarray(levels, jnp.float32)[..., None]


def corrupt(x: Array, eps: Array, levels: Array, schedule: Schedule) -> Array:
    """z = alpha(t_i) x_i + sigma(t_i) eps_i per token i.

    Args:
      x: [B, *tokens, C] clean data.
      eps: like x, standard normal noise.
      levels: [B, *tokens] float32 in [0, 1] (size-1 axes broadcast).
      schedule: the noise schedule.
    Returns:
      z, like x. Tokens at level 0 are exactly x.
    """
    checks.check_levels(levels)
    alpha, sigma = schedule.alpha_sigma(expand_levels(levels, x))
    return alpha * x + sigma * eps


def target(x: Array, eps: Array, prediction: str) -> Array:
    """The regression target of a prediction type."""
    checks.check_choice("prediction type", prediction, PREDICTIONS)
    return {"x": x, "eps": eps, "v": eps - x}[prediction]


def to_x_eps(
    pred: Array, z: Array, levels: Array, schedule: Schedule, prediction: str
) -> tuple[Array, Array]:
    """(x_hat, eps_hat) implied by a network output of the given prediction type.

    'x' is undefined for eps at t = 0 and 'eps' for x at t = 1 (division by zero); 'v' is defined
    everywhere since alpha + sigma > 0.
    """
    checks.check_choice("prediction type", prediction, PREDICTIONS)
    alpha, sigma = schedule.alpha_sigma(expand_levels(levels, z))
    if prediction == "x":
        return pred, (z - alpha * pred) / sigma
    if prediction == "eps":
        return (z - sigma * pred) / alpha, pred
    total = alpha + sigma
    return (z - sigma * pred) / total, (z + alpha * pred) / total


def convert(
    pred: Array, z: Array, levels: Array, schedule: Schedule, source: str, dest: str
) -> Array:
    """Converts a prediction from type `source` to type `dest` ('x', 'eps' or 'v')."""
    checks.check_choice("prediction type", dest, PREDICTIONS)
    if source == dest:
        return pred
    x_hat, eps_hat = to_x_eps(pred, z, levels, schedule, source)
    return target(x_hat, eps_hat, dest)
