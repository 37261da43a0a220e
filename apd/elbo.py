"""The valid ELBO of per-token diffusion (paper Theorem 1), estimated along paths; bits/dim.

Why a path. The diffusion ELBO comes from a chain of latents, each noisier than the last: -log p(x)
is bounded by a prior term, a reconstruction term, and a sum of KLs between the forward posterior
of each step and the model's reverse step. In continuous time the sum becomes an integral whose
weight on the error at a state is the rate at which the SNR falls as the chain passes through it.
With one level per token the same argument holds for any chain in which every token is only ever
noised further, i.e. a path tau(u) in level space, each coordinate non-decreasing in u. Forward
noise is independent per token, so each step's KL splits over tokens, and the bound is a line
integral (x-prediction form, summed over tokens i and channels):

    -ELBO_path(x) = prior + reconstruction
        + sum_i 1/2 * integral_0^1 (-d SNR(tau_i(u)) / du) * ||x_i - xhat_i(z_u, tau(u))||^2 du

with z_u ~ q(z | x) at the levels tau(u). The synchronous path is the usual diffusion ELBO; a raster
path is an autoregressive ELBO over patches.

Why the training loss is not one. Eq. 2 draws level maps from some distribution and weighs each
token by a function of its own level alone. It has the right minimiser for any such choice, but a
bound weighs token i at a state by how fast its SNR falls along a path through that state, times
how often paths visit the state: a weight that depends on all tokens' levels jointly. Only when
the level-map distribution is the occupation measure of a family of paths does a weighted loss
become a bound. Averaging the random-ray family of `apd.paths` gives Theorem 1's closed-form
weight, which couples all tokens through (sum_j h_j)^N and is far too peaked to use; apd instead
samples paths and points on them, an unbiased Monte Carlo estimate of the same bound.

Estimator. For each example b, `num_points` points u_k on [0, 1] of its own (stratified,
u_k = (k + U_b) / K with an offset U_b ~ U[0, 1) per example, or i.i.d. uniform per example), a
fresh noise draw at each, and the weight -d SNR / du from a JVP of SNR(path(u)) (as VDM does for
its schedule; the path takes one point per example, see `apd.paths`). Tokens the path does not
move at u get weight exactly 0, whatever their SNR or error. Examples share no random draw, so
the per-example estimates of one call are independent (given independent paths, e.g. random rays
drawn per example, or a deterministic path): the standard deviation over the batch over sqrt(B)
is a valid standard error of the batch mean.

All functions are jit-compatible. Callables (`denoise_fn`, `path`) are closed over or passed as
static arguments, e.g.

    term = jax.jit(lambda x, key: diffusion_term(denoise_fn, x, path, key, num_points=16))

Nats per example throughout; `bits_per_dim` converts. Data are scaled to [-1, 1]; the
reconstruction term is a 256-bin discretized Gaussian decoder (bins of width 2 / 255), as in VDM.
"""

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from apd import checks, corruption, paths
from apd.schedules import RectifiedFlow, Schedule

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]

DEFAULT_SCHEDULE = RectifiedFlow()  # the paper's schedule

_HALF_BIN = 1.0 / 255.0  # half the width of one of 256 bins over [-1, 1]


def x_pred_wrapper(
    model_fn: Callable[[Array, Array], Array], schedule: Schedule, prediction: str
) -> DenoiseFn:
    """Turns a network predicting 'x', 'eps' or 'v' into an x-predictor `denoise_fn(z, levels)`.

    Args:
      model_fn: model_fn(z [B, *tokens, C], levels [B, *tokens]) -> prediction like z.
      schedule: the schedule the network was trained with.
      prediction: what model_fn predicts: 'x', 'eps' or 'v'.
    Returns:
      denoise_fn(z, levels) -> x_hat [B, *tokens, C] float32.
    """
    checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)

    def denoise_fn(z: Array, levels: Array) -> Array:
        pred = model_fn(z, levels).astype(jnp.float32)
        return corruption.to_x_eps(pred, z, levels, schedule, prediction)[0]

    return denoise_fn


def _check_data(x: Array) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"data must be [B, *tokens, C] with at least one token axis; got shape {x.shape}."
        )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _per_example_sum(values: Array) -> Array:
    return jnp.sum(values.reshape(values.shape[0], -1), axis=-1)


def diffusion_term(
    denoise_fn: DenoiseFn,
    x: Array,
    path: paths.Path,
    key: Array,
    *,
    num_points: int = 16,
    schedule: Schedule = DEFAULT_SCHEDULE,
    stratified: bool = True,
    points_per_chunk: int | None = None,
) -> Array:
    """Unbiased Monte Carlo estimate of the diffusion term of -ELBO_path, per example.

    Args:
      denoise_fn: denoise_fn(z [B, *tokens, C], levels [B, *tokens]) -> x_hat like z.
      x: [B, *tokens, C] clean data.
      path: path(u) -> [B, *tokens] levels (size-1 axes broadcast), see `apd.paths`. Checked by
        `paths.check_path` (values only when concrete).
      key: PRNG key for the points and the noise.
      num_points: points u per example; they are vectorised (vmap), not looped.
      schedule: the noise schedule.
      stratified: u_k = (k + U_b) / num_points with an offset U_b ~ U[0, 1) per example b; else
        i.i.d. uniform u_k per example. Both are unbiased and independent across examples;
        stratified has far lower variance.
      points_per_chunk: evaluate this many points at a time (lax.map) to bound memory; None
        evaluates all points in one vectorised call.
    Returns:
      [B] float32 nats, >= 0.
    """
    x = jnp.asarray(x, jnp.float32)
    _check_data(x)
    _check_positive_int("num_points", num_points)
    if points_per_chunk is not None:
        _check_positive_int("points_per_chunk", points_per_chunk)
    level_shape = x.shape[:-1]
    paths.check_path(path, level_shape)
    key_u, key_eps = jax.random.split(key)
    batch = level_shape[0]
    if stratified:
        offset = jax.random.uniform(key_u, (1, batch), jnp.float32)
        u = (jnp.arange(num_points, dtype=jnp.float32)[:, None] + offset) / num_points
    else:
        u = jax.random.uniform(key_u, (num_points, batch), jnp.float32)
    # [K, B, 1, ..., 1]: point k of every example, broadcast against its tokens.
    u = u.reshape(num_points, batch, *(1,) * (len(level_shape) - 1))

    def levels_and_snr(u: Array) -> tuple[Array, Array]:
        levels = jnp.broadcast_to(path(u), level_shape)
        return levels, schedule.snr(levels)

    def integrand(point: tuple[Array, Array]) -> Array:
        u, point_key = point
        (levels, _), (d_levels, d_snr) = jax.jvp(levels_and_snr, (u,), (jnp.ones_like(u),))
        eps = jax.random.normal(point_key, x.shape, jnp.float32)
        x_hat = denoise_fn(corruption.corrupt(x, eps, levels, schedule), levels)
        sq_err = jnp.sum(jnp.square(x - x_hat.astype(jnp.float32)), axis=-1)
        # Tokens that do not move contribute exactly 0, even where their SNR (t = 0), its
        # derivative or their error is inf or nan; masking the weight too keeps gradients finite.
        moving = d_levels != 0.0
        weight = jnp.where(moving, -0.5 * d_snr, 0.0)
        per_token = jnp.where(moving, weight * sq_err, 0.0)
        return _per_example_sum(per_token)

    points = (u, jax.random.split(key_eps, num_points))
    if points_per_chunk is None:
        values = jax.vmap(integrand)(points)
    else:
        values = jax.lax.map(integrand, points, batch_size=points_per_chunk)
    return jnp.mean(values, axis=0)


def _endpoint_levels(t: Array | float, x: Array, name: str) -> Array:
    """A scalar level or a level map -> [B, *tokens] float32 levels for data x."""
    t = jnp.asarray(t, jnp.float32)
    checks.check_levels(t, name)
    if t.ndim:
        checks.check_level_shape(t.shape, x.shape)
    return jnp.broadcast_to(t, x.shape[:-1])


def prior_term(x: Array, t_end: Array | float, schedule: Schedule) -> Array:
    """KL(q(z | x) at t_end || N(0, I)), summed over tokens and channels.

    Args:
      x: [B, *tokens, C] clean data.
      t_end: the noisy-end level: a float, or [B, *tokens] float32 in [0, 1] (size-1 axes
        broadcast).
      schedule: the noise schedule.
    Returns:
      [B] float32 nats, >= 0.
    """
    x = jnp.asarray(x, jnp.float32)
    _check_data(x)
    levels = _endpoint_levels(t_end, x, "t_end")
    alpha, sigma = schedule.alpha_sigma(levels[..., None])
    log_var = 2.0 * jnp.log(sigma)
    # var - 1 - log(var), written to stay accurate when var is close to 1.
    kl = 0.5 * (jnp.square(alpha * x) + jnp.expm1(log_var) - log_var)
    return _per_example_sum(kl)


def _log_bin_probability(x: Array, mean: Array, scale: Array) -> Array:
    """log P(bin of x) under N(mean, scale^2); the outer bins extend to -inf / +inf."""
    lower = jnp.where(x < -1.0 + _HALF_BIN, -jnp.inf, (x - _HALF_BIN - mean) / scale)
    upper = jnp.where(x > 1.0 - _HALF_BIN, jnp.inf, (x + _HALF_BIN - mean) / scale)
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): evaluate on the side of the lower tail for accuracy.
    flip = lower + upper > 0.0
    a = jnp.where(flip, -upper, lower)
    b = jnp.where(flip, -lower, upper)
    log_b = log_ndtr(b)
    return log_b + jnp.log1p(-jnp.exp(log_ndtr(a) - log_b))


def reconstruction_term(
    denoise_fn: DenoiseFn | None,
    x: Array,
    t_start: Array | float,
    schedule: Schedule,
    key: Array,
) -> Array:
    """-log p(x | z at t_start) with a 256-bin discretized Gaussian decoder (VDM style).

    z = alpha x + sigma eps at the level t_start; the decoder is N(m, (sigma / alpha)^2) per
    dimension, integrated over the bin of width 2 / 255 around x (the bins at -1 and +1 extend to
    infinity), with m = z / alpha or, given a denoiser, m = denoise_fn(z, levels).

    Args:
      denoise_fn: None (decoder centred at z / alpha) or denoise_fn(z, levels) -> x_hat.
      x: [B, *tokens, C] data in [-1, 1], on the grid 2 k / 255 - 1 for 8-bit data.
      t_start: the clean-end level: a float in (0, 1), or [B, *tokens] float32 (size-1 axes
        broadcast).
      schedule: the noise schedule.
      key: PRNG key for the noise.
    Returns:
      [B] float32 nats, >= 0.
    """
    x = jnp.asarray(x, jnp.float32)
    _check_data(x)
    if checks.is_concrete(x) and x.size and not bool(jnp.all(jnp.abs(x) <= 1.0)):
        raise ValueError(
            "the discretized decoder needs data scaled to [-1, 1]; got values in "
            f"[{float(jnp.min(x))!r}, {float(jnp.max(x))!r}]."
        )
    levels = _endpoint_levels(t_start, x, "t_start")
    alpha, sigma = schedule.alpha_sigma(levels[..., None])
    z = alpha * x + sigma * jax.random.normal(key, x.shape, jnp.float32)
    mean = z / alpha if denoise_fn is None else denoise_fn(z, levels).astype(jnp.float32)
    return -_per_example_sum(_log_bin_probability(x, mean, sigma / alpha))


def elbo_terms(
    denoise_fn: DenoiseFn,
    x: Array,
    path: paths.Path,
    key: Array,
    *,
    num_points: int = 16,
    schedule: Schedule = DEFAULT_SCHEDULE,
    stratified: bool = True,
    points_per_chunk: int | None = None,
    denoised_decoder: bool = False,
) -> dict[str, Array]:
    """The three terms of -ELBO_path, each [B] float32 nats.

    The prior term is taken at the path's noisy end path(1), the reconstruction term at its clean
    end path(0), per token, so the three terms always fit together.

    Args:
      denoise_fn, x, path, key, num_points, schedule, stratified, points_per_chunk: as in
        `diffusion_term`; x in [-1, 1].
      denoised_decoder: centre the decoder at denoise_fn's output rather than at z / alpha.
    Returns:
      {'prior', 'reconstruction', 'diffusion'} -> [B] float32.
    """
    key_reconstruction, key_diffusion = jax.random.split(key)
    return {
        "prior": prior_term(x, path(1.0), schedule),
        "reconstruction": reconstruction_term(
            denoise_fn if denoised_decoder else None, x, path(0.0), schedule, key_reconstruction
        ),
        "diffusion": diffusion_term(
            denoise_fn,
            x,
            path,
            key_diffusion,
            num_points=num_points,
            schedule=schedule,
            stratified=stratified,
            points_per_chunk=points_per_chunk,
        ),
    }


def negative_elbo(
    denoise_fn: DenoiseFn,
    x: Array,
    path: paths.Path,
    key: Array,
    *,
    num_points: int = 16,
    schedule: Schedule = DEFAULT_SCHEDULE,
    stratified: bool = True,
    points_per_chunk: int | None = None,
    denoised_decoder: bool = False,
) -> Array:
    """-ELBO_path = prior + reconstruction + diffusion, [B] float32 nats (see `elbo_terms`)."""
    terms = elbo_terms(
        denoise_fn,
        x,
        path,
        key,
        num_points=num_points,
        schedule=schedule,
        stratified=stratified,
        points_per_chunk=points_per_chunk,
        denoised_decoder=denoised_decoder,
    )
    return terms["prior"] + terms["reconstruction"] + terms["diffusion"]


def bits_per_dim(nelbo: Array, num_dims: int) -> Array:
    """nats per example -> bits per dimension: nelbo / (num_dims * ln 2).

    Args:
      nelbo: [B] (or any shape) -ELBO in nats per example.
      num_dims: dimensions per example, e.g. H * W * C.
    """
    _check_positive_int("num_dims", num_dims)
    return jnp.asarray(nelbo, jnp.float32) / (num_dims * math.log(2.0))
