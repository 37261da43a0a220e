"""Monotone paths through level space: the routes along which apd evaluates the ELBO.

A path is a function `path(u) -> levels` of u in [0, 1]: a scalar (a Python float or a float32
scalar, possibly traced), or one point per example, an array [B, 1, ..., 1] with as many axes as
the level map. It returns a level map shaped like the data without its channel axis,
[B, *tokens] float32 in [0, 1] (size-1 axes broadcast: a path of shape [1, H, W] is shared by the
whole batch), example b at its own u[b] when u has one point per example (paths act elementwise in
u, so `apd.elbo` draws independent points for the examples of one batch). Every coordinate is
non-decreasing in u, from the clean end (u = 0) to the noisy end (u = 1). Along any such path the
per-token forward process is a Markov chain that only ever adds noise, so the path defines a valid
ELBO (see `apd.elbo`).

The built-in paths run between common endpoint levels: every coordinate starts at `t_start` at
u = 0 and ends at `t_end` at u = 1. Below `t_start` the reconstruction term of the ELBO takes over,
above `t_end` the prior term, so those two terms are the usual ones whatever the path.

  synchronous  all tokens move together, linear in logSNR: the ordinary diffusion ELBO.
  random_ray   the paper's family: rays h_i = a_i * s in h = -log(1 - t), a_i ~ Exp(1) per token.
  raster       groups of tokens (patches of a grid) noised one after another: an autoregressive
               ELBO over the groups.

Paths are plain closures over arrays, jit-compatible in u (no Python branching on u). The
diffusion integrand is smooth in logSNR, so built-in paths move their coordinates linearly in
logSNR (rays: linearly in log h, a smooth monotone function of logSNR, linear in it near the
clean end).
`check_path` validates a concrete path on a grid of u and with one point per example.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.schedules import RectifiedFlow, Schedule

Array = jax.Array
Path = Callable[[Array | float], Array]

# Default endpoint levels: logSNR of about +23 and -23 under rectified flow.
T_START = 1e-5
T_END = 1.0 - 1e-5

DEFAULT_SCHEDULE = RectifiedFlow()  # the paper's schedule


def _check_endpoints(t_start: float, t_end: float) -> None:
    if not (0.0 < t_start < t_end < 1.0):
        raise ValueError(
            "path endpoints must satisfy 0 < t_start < t_end < 1 (logSNR finite at both ends); "
            f"got t_start={t_start!r}, t_end={t_end!r}."
        )


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(
            f"path shape must be [B, *tokens] with at least one token axis and positive sizes; "
            f"got {shape}."
        )
    return shape


def _points(u: Array | float, shape: tuple[int, ...]) -> tuple[Array, tuple[int, ...]]:
    """u clipped to [0, 1] as float32, and the level shape it gives with a path of `shape`.

    u is a scalar or [b, 1, ..., 1] (len(shape) axes, one point per example: b = B or 1, any b
    for a path shared by the batch, shape[0] = 1).
    """
    u = jnp.asarray(u, jnp.float32)
    per_example = (
        u.ndim == len(shape)
        and all(n == 1 for n in u.shape[1:])
        and (u.shape[0] == 1 or shape[0] in (1, u.shape[0]))
    )
    if u.ndim and not per_example:
        raise ValueError(
            f"path points u must be a scalar or one per example, [B, 1, ..., 1] with "
            f"{len(shape)} axes and B = {shape[0]} (or 1, or any B for a path shared by the "
            f"batch); got shape {u.shape}."
        )
    return jnp.clip(u, 0.0, 1.0), jnp.broadcast_shapes(u.shape, shape)


def _log_snr_line(t_start: float, t_end: float, schedule: Schedule) -> Callable[[Array], Array]:
    """fraction in [0, 1] -> levels that far from t_start to t_end, linear in logSNR."""
    start, end = (schedule.log_snr(jnp.float32(t)) for t in (t_start, t_end))

    def levels(fraction: Array) -> Array:
        return schedule.level_from_log_snr(start + fraction * (end - start))

    return levels


def synchronous(
    shape: Sequence[int],
    t_start: float = T_START,
    t_end: float = T_END,
    schedule: Schedule = DEFAULT_SCHEDULE,
) -> Path:
    """All tokens share one level, linear in logSNR from t_start (u = 0) to t_end (u = 1).

    Args:
      shape: the level shape [B, *tokens] (use [1, *tokens] or [1, 1, ...] to broadcast).
      t_start, t_end: endpoint levels, 0 < t_start < t_end < 1.
      schedule: the schedule whose logSNR the path is linear in.
    Returns:
      path(u) -> [*shape] float32 levels ([B, *tokens] for u with one point per example).
    """
    shape = _check_shape(shape)
    _check_endpoints(t_start, t_end)
    line = _log_snr_line(t_start, t_end, schedule)

    def path(u):
        u, out_shape = _points(u, shape)
        return jnp.broadcast_to(line(u), out_shape)

    return path


def random_ray(
    key: Array, shape: Sequence[int], t_start: float = T_START, t_end: float = T_END
) -> Path:
    """One path of the paper's random-ray family (method.md §4.2).

    Each token draws a rate a_i ~ Exp(1) and follows the ray h_i(s) = a_i * s in the coordinate
    h = -log(1 - t), clipped to the common endpoints: it stays at t_start until its ray gets there,
    moves along the ray, and stays at t_end once it arrives. The family is defined in level space,
    so it needs no schedule. The ray parameter is reparameterised as log s linear in u, from the
    moment the first token of an example leaves t_start (u = 0) to the moment its last token
    reaches t_end (u = 1); each token's log h is then linear in u, as its logSNR is near the clean
    end, which keeps the ELBO integrand smooth.

    Args:
      key: PRNG key for the rates.
      shape: the level shape [B, *tokens]; each example gets its own rates. Pass [1, *tokens]
        for one path shared by the whole batch.
      t_start, t_end: endpoint levels, 0 < t_start < t_end < 1.
    Returns:
      path(u) -> [*shape] float32 levels ([B, *tokens] for u with one point per example).
    """
    shape = _check_shape(shape)
    _check_endpoints(t_start, t_end)
    rates = jax.random.exponential(key, shape, jnp.float32)
    log_rates = jnp.log(jnp.maximum(rates, jnp.finfo(jnp.float32).tiny))
    h_start, h_end = (float(-np.log1p(-t)) for t in (t_start, t_end))
    token_axes = tuple(range(1, len(shape)))
    log_s_first = np.log(h_start) - jnp.max(log_rates, axis=token_axes, keepdims=True)
    log_s_last = np.log(h_end) - jnp.min(log_rates, axis=token_axes, keepdims=True)

    def path(u):
        fraction, out_shape = _points(u, shape)
        log_s = log_s_first + fraction * (log_s_last - log_s_first)
        h = jnp.clip(jnp.exp(log_rates + log_s), h_start, h_end)
        return jnp.broadcast_to(-jnp.expm1(-h), out_shape)

    return path


def raster(
    shape: Sequence[int],
    grid: int | Sequence[int],
    t_start: float = T_START,
    t_end: float = T_END,
    schedule: Schedule = DEFAULT_SCHEDULE,
    order: Sequence[int] | None = None,
) -> Path:
    """Patches of a grid noised one after another (an autoregressive order over the patches).

    The token axes are cut into a grid of G equal patches, numbered in raster (row-major) order.
    The k-th patch of `order` moves from t_start to t_end for u in [k / G, (k + 1) / G], linear in
    logSNR, and stays put otherwise: patches earlier in the order are noised first, so they are
    the ones generated last.

    Args:
      shape: the level shape [B, *tokens].
      grid: patches per token axis: an int (the same on every axis, e.g. K for a K x K grid) or
        one int per token axis, each dividing that axis's size.
      t_start, t_end: endpoint levels, 0 < t_start < t_end < 1.
      schedule: the schedule whose logSNR each patch moves linearly in.
      order: a permutation of range(G): order[k] is the raster index of the k-th patch to be
        noised. Default: raster order.
    Returns:
      path(u) -> [*shape] float32 levels ([B, *tokens] for u with one point per example).
    """
    shape = _check_shape(shape)
    _check_endpoints(t_start, t_end)
    tokens = shape[1:]
    grid = (grid,) * len(tokens) if isinstance(grid, int) else tuple(grid)
    if len(grid) != len(tokens) or any(g < 1 or n % g for g, n in zip(grid, tokens, strict=False)):
        raise ValueError(
            f"raster grid {grid} must give one positive patch count per token axis, each "
            f"dividing the axis size; token axes are {tokens}."
        )
    num_groups = int(np.prod(grid))
    order = np.arange(num_groups) if order is None else np.asarray(order)
    if sorted(order.tolist()) != list(range(num_groups)):
        raise ValueError(
            f"raster order must be a permutation of range({num_groups}) (one entry per patch of "
            f"the {grid} grid); got {order.tolist()}."
        )
    rank_of_group = np.argsort(order)
    cells = np.meshgrid(
        *(np.arange(n) // (n // g) for n, g in zip(tokens, grid, strict=True)), indexing="ij"
    )
    group = np.ravel_multi_index(tuple(cells), grid)
    rank = jnp.asarray(rank_of_group[group][None], jnp.float32)  # [1, *tokens]
    line = _log_snr_line(t_start, t_end, schedule)

    def path(u):
        u, out_shape = _points(u, shape)
        fraction = jnp.clip(num_groups * u - rank, 0.0, 1.0)
        return jnp.broadcast_to(line(fraction), out_shape)

    return path


def check_path(path: Path, shape: Sequence[int], num: int = 65) -> None:
    """Raises ValueError unless `path` is a valid path for levels of shape `shape`.

    Evaluates path on `num` evenly spaced u in [0, 1], and once with one point per example (u of
    shape [B, 1, ..., 1], example b at one of those grid points). Always checks the shapes:
    [B, *tokens] with each axis equal to `shape`'s or 1 (B for per-example points). When the
    levels are concrete (not traced), also checks they lie in [0, 1], are non-decreasing in u in
    every coordinate (to within 1e-6 for rounding), and that with per-example points each example
    gets its levels at its own point (what `apd.elbo` relies on).

    Args:
      path: path(u) -> levels, jit-compatible in u.
      shape: the expected level shape [B, *tokens] (data shape without the channel axis).
      num: number of grid points, >= 2.
    """
    shape = tuple(shape)
    u = jnp.linspace(0.0, 1.0, num, dtype=jnp.float32)
    levels = jax.vmap(path)(u)
    got = tuple(levels.shape[1:])
    if len(got) != len(shape) or any(g not in (1, s) for g, s in zip(got, shape, strict=False)):
        raise ValueError(
            f"path returns levels of shape {got}; expected {shape} (the data shape without its "
            "channel axis; size-1 axes broadcast)."
        )
    # Example b at grid point pick[b]: spread over the grid, different for neighbours.
    pick = (np.arange(shape[0]) * 7 + num // 2) % num
    per_example = path(u[pick].reshape(shape[0], *(1,) * (len(shape) - 1)))
    want = (shape[0], *got[1:])
    if tuple(jnp.shape(per_example)) != want:
        raise ValueError(
            f"with one point per example (u of shape [{shape[0]}, 1, ...]) the path returns levels "
            f"of shape {tuple(jnp.shape(per_example))}; expected {want}."
        )
    if not (checks.is_concrete(levels) and checks.is_concrete(per_example)):
        return
    levels = np.asarray(levels)
    checks.check_levels(levels, "path levels")
    steps = np.diff(levels, axis=0)
    if np.min(steps, initial=0.0) < -1e-6:
        k, *index = np.unravel_index(np.argmin(steps), steps.shape)
        raise ValueError(
            "a path must be non-decreasing in u in every coordinate (clean at u = 0, noisy at "
            f"u = 1); coordinate {tuple(int(i) for i in index)} goes from "
            f"{levels[k][tuple(index)]!r} at u={float(u[k])!r} to {levels[k + 1][tuple(index)]!r} "
            f"at u={float(u[k + 1])!r}."
        )
    expected = np.broadcast_to(levels, (num, *want))[pick, np.arange(shape[0])]
    off = np.abs(np.asarray(per_example) - expected) > 1e-6 + 1e-5 * np.abs(expected)
    if off.any():
        b = int(np.argwhere(off)[0, 0])
        raise ValueError(
            f"a path must act elementwise in u: with one point per example, example {b} at "
            f"u={float(u[pick[b]])!r} gets levels other than path(u={float(u[pick[b]])!r})[{b}] "
            "(the per-example points of apd.elbo need this)."
        )
