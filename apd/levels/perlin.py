"""Perlin gradient noise on a token grid, generated on device (for the 'perlin' level sampler).

Classic Perlin noise: random unit gradients g(c) at the corners c of a lattice of `cells` cells
per axis; a point p with cell corner c0 = floor(p) and offset f = p - c0 gets

    noise(p) = sum over the 2^d corners e in {0, 1}^d of  prod_a w(f_a, e_a) * <g(c0 + e), f - e>

with w(f, 1) = fade(f), w(f, 0) = 1 - fade(f) and the quintic fade 6f^5 - 15f^4 + 10f^3.
Each term of the dot product <g, f - e> = sum_b g_b (f_b - e_b) is separable over the axes, so the
noise is a sum over gradient components b of the lattice field g_b contracted along every axis a
with a fixed [n_a, cells + 1] matrix: the fade weights, times (f_a - e_a) along axis b. That is a
few small matmuls per image instead of 2^d gathers. Token i of an axis of length n is sampled at
its centre, p = (i + 1/2) * cells / n, so any grid size works with any number of cells.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _axis_weights(n: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation matrices [n, cells + 1] float32 for one axis of n tokens.

    Returns (fade weights, fade weights times the offset from the corner); each row has two
    non-zeros, at the token's two neighbouring lattice corners.
    """
    pos = (np.arange(n, dtype=np.float64) + 0.5) * cells / n
    corner = np.floor(pos).astype(np.int64)
    frac = pos - corner
    fade = frac**3 * (frac * (frac * 6.0 - 15.0) + 10.0)
    rows = np.arange(n)
    weights = np.zeros((n, cells + 1))
    offsets = np.zeros((n, cells + 1))
    weights[rows, corner], weights[rows, corner + 1] = 1.0 - fade, fade
    offsets[rows, corner], offsets[rows, corner + 1] = (1.0 - fade) * frac, fade * (frac - 1.0)
    return weights.astype(np.float32), offsets.astype(np.float32)


def gradient_noise(key: Array, batch_size: int, grid: tuple[int, ...], cells: int) -> Array:
    """One octave of Perlin noise per image.

    Args:
      key: a PRNG key (may be traced).
      batch_size: B, static.
      grid: the token grid (n_1, ..., n_d), static, d >= 1.
      cells: lattice cells per axis, static, >= 1.
    Returns:
      [B, *grid] float32, zero-mean, |noise| <= sqrt(d) / 2.
    """
    d = len(grid)
    corners = (cells + 1,) * d
    # Drawn flat: rank-2 random draws compile several times faster than rank-3+ ones on CPU.
    gradients = jax.random.normal(key, (batch_size, math.prod(corners) * d), jnp.float32)
    gradients = gradients.reshape(batch_size, *corners, d)
    gradients = gradients / jnp.linalg.norm(gradients, axis=-1, keepdims=True)
    matrices = [_axis_weights(n, cells) for n in grid]
    noise = jnp.zeros((batch_size, *grid), jnp.float32)
    for component in range(d):
        field = gradients[..., component]
        for axis, (weights, offsets) in enumerate(matrices):
            matrix = jnp.asarray(offsets if axis == component else weights)
            field = jnp.moveaxis(
                jnp.tensordot(field, matrix, axes=((axis + 1,), (1,))), -1, axis + 1
            )
        noise = noise + field
    return noise


def fractal_noise(
    key: Array, batch_size: int, grid: tuple[int, ...], scale: int, octaves: int
) -> Array:
    """Octaves of Perlin noise: octave o has scale * 2^o cells per axis and amplitude 2^-o.

    Returns [B, *grid] float32, normalised by the total amplitude (so |noise| <= sqrt(d) / 2).
    """
    amplitudes = [0.5**o for o in range(octaves)]
    keys = jax.random.split(key, octaves)
    total = sum(
        a * gradient_noise(keys[o], batch_size, grid, scale * 2**o)
        for o, a in enumerate(amplitudes)
    )
    return total / sum(amplitudes)
