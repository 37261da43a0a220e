"""RePaint (Lugmayr et al. 2022): inpainting with a synchronously trained model, the baseline.

The model only ever sees all tokens at one level t. Every step down (t -> s):

    unknown tokens: a DDIM step from t to s (eta = 1: RePaint's ancestral step),
    known tokens:   replaced by the data noised forward to s, alpha(s) x + sigma(s) noise,

and resampling harmonises the two: after every `jump_length` steps down the whole image is
re-noised `jump_length` steps back up with the forward process, and those steps are redone,
`resample` times in all (RePaint's j and r; r = 1 is plain replacement).

Like `sample`, RePaint starts at alpha(1) * 0 + sigma(1) * noise = sigma(1) * noise (plain
noise for the built-in schedules, whose sigma(1) is 1).

The step sequence is RePaint's `get_schedule_jump` over `steps` levels t_k = k / steps, computed
on the host; the sampler is one `lax.scan` over it, each item a step down (one network call) or a
step up (no call). `repaint_schedule` gives the sequence, and `repaint_cost` the call count.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from apd import checks, corruption
from apd.sampling import ddim, inputs
from apd.sampling.sampler import Cost, Denoise
from apd.schedules import Schedule

Array = jax.Array


def repaint_schedule(steps: int, jump_length: int = 10, resample: int = 10) -> np.ndarray:
    """RePaint's level sequence, from 1 (pure noise) to 0 (clean).

    Args:
      steps: T >= 1 levels t_k = k / T (k = T, ..., 0) on the plain path down.
      jump_length: j >= 1, steps per jump back up.
      resample: r >= 1, times each stretch of j steps is done (r - 1 jumps back up).
    Returns:
      [P + 1] float32 levels; item p -> p + 1 is a step down (a network call) or up.
    """
    for what, value in (("steps", steps), ("jump_length", jump_length), ("resample", resample)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"repaint {what} must be an int >= 1; got {value!r}.")
    # Level k / T is RePaint's time index k - 1; it jumps after reaching index 0, j, 2j, ...
    jumps = dict.fromkeys(range(1, steps - jump_length + 1, jump_length), resample - 1)
    k, ks = steps, [steps]
    while k >= 1:
        k -= 1
        ks.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            ks.extend(range(k + 1, k + jump_length + 1))
            k += jump_length
    return np.asarray(ks, np.float32) / steps


def repaint_cost(batch: int, steps: int, jump_length: int = 10, resample: int = 10) -> Cost:
    """The network work of `repaint`: one call per step down."""
    levels = repaint_schedule(steps, jump_length, resample)
    calls = int(np.sum(levels[1:] < levels[:-1]))
    return Cost(calls, calls, batch)


def repaint(
    denoise: Denoise,
    x_known: Array,
    mask: Array,
    key: Array,
    *,
    schedule: Schedule,
    steps: int = 250,
    jump_length: int = 10,
    resample: int = 10,
    prediction: str = "v",
    eta: float | Array = 1.0,
    labels: Array | None = None,
    num_classes: int = 0,
) -> Array:
    """RePaint inpainting.

    Args:
      denoise: (z [B, *tokens, C], levels [B, *tokens] (all equal), labels [B] or None) ->
        prediction like z, of type `prediction`.
      x_known: [B, *tokens, C] float32, the image (only its known tokens are used).
      mask: [B, *tokens], 1 (True) = known.
      key: PRNG key.
      schedule: the model's noise schedule.
      steps, jump_length, resample: T, j, r (RePaint's defaults 250, 10, 10).
      prediction: 'x', 'v', or 'eps' only for a schedule with alpha(1) > 0 (RePaint steps from
        level 1, where 'eps' leaves x undefined for the built-in schedules: ValueError).
      eta: DDIM coefficient of the steps down (1 = RePaint's ancestral steps).
      labels: [B] int32 or None; num_classes: for checking labels (0 = unchecked).
    Returns:
      [B, *tokens, C] float32; known tokens exactly x_known.
    """
    checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)
    if prediction == "eps" and inputs.alpha_at_noise(schedule) == 0.0:
        raise inputs.eps_at_noise_error("RePaint starts every token at level 1")
    x_known = jnp.asarray(x_known, jnp.float32)
    checks.check_mask(
        mask,
        x_known.shape[:-1],
        "repaint mask",
        form="[B, *tokens] (x_known without its channel axis)",
        zero="generate",
        one="known",
    )
    inputs.check_scalar("eta", eta, 0.0, 1.0)
    labels = inputs.check_labels(labels, x_known.shape[0], num_classes)
    levels = jnp.asarray(repaint_schedule(steps, jump_length, resample))
    return _repaint(
        x_known,
        jnp.asarray(mask) != 0,
        key,
        levels,
        labels,
        inputs.f32(eta),
        denoise=denoise,
        schedule=schedule,
        prediction=prediction,
    )


@functools.partial(jax.jit, static_argnames=("denoise", "schedule", "prediction"))
def _repaint(
    x_known: Array,
    known: Array,
    key: Array,
    levels: Array,
    labels: Array | None,
    eta: Array,
    *,
    denoise: Denoise,
    schedule: Schedule,
    prediction: str,
) -> Array:
    key_start, key_steps = jax.random.split(key)
    token_shape = known.shape

    def down(z: Array, t: Array, s: Array, key: Array) -> Array:
        t_map, s_map = jnp.full(token_shape, t), jnp.full(token_shape, s)
        pred = denoise(z, t_map, labels).astype(jnp.float32)
        x_hat, eps_hat = corruption.to_x_eps(pred, z, t_map, schedule, prediction)
        key_unknown, key_known = jax.random.split(key)
        unknown = ddim.ddim_step(
            z, x_hat, eps_hat, t_map, s_map, jax.random.normal(key_unknown, z.shape), eta, schedule
        )
        known_z = ddim.noised(x_known, s_map, jax.random.normal(key_known, z.shape), schedule)
        return jnp.where(known[..., None], known_z, unknown)

    def up(z: Array, t: Array, s: Array, key: Array) -> Array:
        t_map, s_map = jnp.full(token_shape, t), jnp.full(token_shape, s)
        return ddim.forward_step(z, t_map, s_map, jax.random.normal(key, z.shape), schedule)

    def step(z: Array, item: tuple[Array, Array, Array]) -> tuple[Array, None]:
        p, t, s = item
        key = jax.random.fold_in(key_steps, p)
        return jax.lax.cond(s < t, down, up, z, t, s, key), None

    # The start convention of `sample`: sigma(1) * noise (see `ddim.noised`).
    noise = jax.random.normal(key_start, x_known.shape, jnp.float32)
    z0 = ddim.noised(jnp.zeros_like(x_known), jnp.ones(token_shape), noise, schedule)
    items = (jnp.arange(levels.shape[0] - 1), levels[:-1], levels[1:])
    z, _ = jax.lax.scan(step, z0, items)
    return z
