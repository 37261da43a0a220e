"""Training level samplers: random level maps [B, *grid] float32 in [0, 1] (0 clean, 1 pure noise).

`sample(name, key, batch_size, grid, **params)` is the one entry point. It checks the name and the
parameters eagerly in Python, fills in the defaults (`DEFAULTS`), and calls one jitted draw with
the name, batch size, grid and parameters static: a new key never retraces, and the draw also runs
inside a caller's `jax.jit` (key traced) and with the batch axis sharded.

Patches: "grid K" means K patches along every token axis (K x K for an image), and token i of an
axis of length n lies in patch floor(i * K / n), so a grid that K does not divide gets patches of
sizes differing by one token. A per-image K is handled by gathering from a table of Kmax^d patch
levels with that index (one static shape for every K, no branch per K).
"""

import functools
import math
import numbers
import types
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from apd import checks
from apd.levels import perlin

Array = jax.Array
Grid = tuple[int, ...]

DEFAULTS: Mapping[str, Mapping[str, object]] = types.MappingProxyType(
    {
        "synchronous": types.MappingProxyType({}),
        "independent": types.MappingProxyType({}),
        "patchwise": types.MappingProxyType({"patch_sizes": None, "patch_probs": None}),
        "perlin": types.MappingProxyType({"scale": 2, "threshold": 0.0, "octaves": 1}),
        "asyncpatch": types.MappingProxyType(
            {
                "t_min": 0.0,
                "t_max": 1.0,
                "delta_max": 0.5,
                "patch_sizes": None,
                "patch_probs": None,
                "p_synchronous": 0.0,
            }
        ),
    }
)
"""Sampler name -> its parameters and their defaults (None: derived from the grid, see `sample`)."""

NAMES: tuple[str, ...] = tuple(DEFAULTS)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def sample(name: str, key: Array, batch_size: int, grid: int | Sequence[int], **params) -> Array:
    """Draws a batch of training level maps.

    Args:
      name: one of `NAMES`:
        'synchronous': one t ~ U(0, 1) per image, broadcast to the grid.
        'independent': t_i ~ U(0, 1) per token.
        'patchwise' (patch_sizes=None, patch_probs=None): K drawn per image from `patch_sizes`
          with `patch_probs` (defaults as for 'asyncpatch'), one U(0, 1) level per patch of the
          K x K grid. A single K (e.g. `patch_sizes=(4,)`) draws no K: the whole key goes to
          the patch levels (the draws of a fixed-K patchwise).
        'perlin' (scale=2, threshold=0.0, octaves=1): binary mask m = [noise > threshold] of
          Perlin gradient noise on a lattice of `scale` cells per axis (octave o adds noise at
          scale * 2^o cells with amplitude 2^-o; the finest octave has at most one cell per
          token of the longest axis; noise lies within +-sqrt(d)/2, threshold in [-1, 1]),
          t ~ U(0, 1) and b ~ Bernoulli(1/2) per image; levels t * m + (1 - m) * b.
        'asyncpatch' (t_min=0, t_max=1, delta_max=0.5, patch_sizes=None, patch_probs=None,
          p_synchronous=0): tbar ~ U(t_min, t_max), delta = min(tbar - t_min, t_max - tbar,
          delta_max), K drawn per image from `patch_sizes` (the grid sizes K, i.e. patches per
          axis; default the powers of two from 1 to the smallest grid axis) with `patch_probs`
          (default uniform; must sum to 1), each patch level ~ U(tbar - delta, tbar + delta).
          With probability `p_synchronous` an image is a 'synchronous' draw instead (one level
          ~ U(0, 1), whatever t_min and t_max).
      key: a single PRNG key (typed `jax.random.key` or raw uint32[2]); may be traced.
      batch_size: B >= 0.
      grid: the token grid: an int n (square, (n, n)) or a tuple of ints (h, w), (n,), ...
      **params: the sampler's parameters (see above); unknown ones raise ValueError.

    Returns:
      levels: [B, *grid] float32 in [0, 1].
    """
    resolved = resolve_params(name, grid, **params)
    grid = checks.as_grid(grid)
    batch_size = checks.check_int("batch_size", batch_size, lo=0)
    _check_key(key)
    return _sample_jit(
        key, name=name, batch_size=batch_size, grid=grid, params=tuple(sorted(resolved.items()))
    )


def resolve_params(name: str, grid: int | Sequence[int], **params) -> dict[str, object]:
    """Checks a sampler's parameters and returns all of them, defaults filled in and normalised.

    Raises ValueError for an unknown name, an unknown parameter (listing the valid ones) or a bad
    value (naming it and the expected form). Sequences come back as tuples, numbers as int/float.
    """
    checks.check_choice("level sampler", name, NAMES)
    grid = checks.as_grid(grid)
    valid = DEFAULTS[name]
    for param in params:
        if param not in valid:
            raise ValueError(
                f"unknown parameter {param!r} for level sampler {name!r}; its parameters are "
                f"{sorted(valid) if valid else 'none'}."
            )
    return _RESOLVERS[name](grid, **{**valid, **params})


# ---------------------------------------------------------------------------------------------
# Eager checks
# ---------------------------------------------------------------------------------------------


def _check_float(what: str, value, lo: float, hi: float) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{what} must be a finite number in [{lo}, {hi}]; got {value!r}.")
    return float(value)


def _check_key(key) -> None:
    typed = jax.dtypes.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
    if jnp.shape(key) != (() if typed else (2,)):
        raise ValueError(
            f"key must be a single PRNG key (jax.random.key(seed), shape (), or a raw uint32[2]); "
            f"got an array of shape {jnp.shape(key)}. Split it outside, or vmap over keys."
        )


def _resolve_none(grid: Grid) -> dict[str, object]:
    del grid
    return {}


def _resolve_patch_grid(
    sampler: str, grid: Grid, patch_sizes, patch_probs
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Checks a sampler's grid sizes K (patches per axis) and their probabilities.

    Default sizes: the powers of two from 1 to the smallest grid axis; default probabilities:
    uniform. Returns both as tuples, the probabilities normalised.
    """
    k_hi = min(grid)
    if patch_sizes is None:
        patch_sizes = tuple(2**i for i in range(k_hi.bit_length()))
    if isinstance(patch_sizes, numbers.Integral):
        patch_sizes = (patch_sizes,)
    if not isinstance(patch_sizes, Sequence) or not patch_sizes:
        raise ValueError(
            f"{sampler} patch_sizes must be a non-empty sequence of grid sizes K (patches per "
            f"axis) in [1, {k_hi}]; got {patch_sizes!r}."
        )
    patch_sizes = tuple(
        checks.check_int(f"{sampler} patch_sizes entry (K)", k, 1, k_hi) for k in patch_sizes
    )
    if len(set(patch_sizes)) != len(patch_sizes):
        raise ValueError(f"{sampler} patch_sizes must not repeat a K; got {patch_sizes!r}.")

    if patch_probs is None:
        patch_probs = (1.0 / len(patch_sizes),) * len(patch_sizes)
    if not isinstance(patch_probs, Sequence) or len(patch_probs) != len(patch_sizes):
        raise ValueError(
            f"{sampler} patch_probs must be a sequence of {len(patch_sizes)} probabilities, one "
            f"per entry of patch_sizes={patch_sizes!r}; got {patch_probs!r}."
        )
    patch_probs = tuple(
        _check_float(f"{sampler} patch_probs entry", p, 0.0, 1.0) for p in patch_probs
    )
    if abs(sum(patch_probs) - 1.0) > 1e-6:
        raise ValueError(
            f"{sampler} patch_probs must sum to 1; got {patch_probs!r} (sum {sum(patch_probs)!r})."
        )
    total = sum(patch_probs)
    return patch_sizes, tuple(p / total for p in patch_probs)


def _resolve_patchwise(grid: Grid, patch_sizes, patch_probs) -> dict[str, object]:
    patch_sizes, patch_probs = _resolve_patch_grid("patchwise", grid, patch_sizes, patch_probs)
    return {"patch_sizes": patch_sizes, "patch_probs": patch_probs}


def _resolve_perlin(grid: Grid, scale, threshold, octaves) -> dict[str, object]:
    scale = checks.check_int("perlin scale (lattice cells per axis)", scale, lo=1, hi=max(grid))
    octaves = checks.check_int("perlin octaves", octaves, lo=1, hi=8)
    if scale * 2 ** (octaves - 1) > max(grid):
        raise ValueError(
            f"perlin scale * 2**(octaves - 1), the cells per axis of the finest octave, must be at "
            f"most the largest grid axis {max(grid)} (one cell per token); got scale={scale!r}, "
            f"octaves={octaves!r}."
        )
    return {
        "scale": scale,
        "threshold": _check_float("perlin threshold", threshold, -1.0, 1.0),
        "octaves": octaves,
    }


def _resolve_asyncpatch(
    grid: Grid, t_min, t_max, delta_max, patch_sizes, patch_probs, p_synchronous
) -> dict[str, object]:
    t_min = _check_float("asyncpatch t_min", t_min, 0.0, 1.0)
    t_max = _check_float("asyncpatch t_max", t_max, 0.0, 1.0)
    if t_min >= t_max:
        raise ValueError(f"asyncpatch needs t_min < t_max; got t_min={t_min!r}, t_max={t_max!r}.")
    delta_max = _check_float("asyncpatch delta_max", delta_max, 0.0, 1.0)
    p_synchronous = _check_float("asyncpatch p_synchronous", p_synchronous, 0.0, 1.0)
    patch_sizes, patch_probs = _resolve_patch_grid("asyncpatch", grid, patch_sizes, patch_probs)
    return {
        "t_min": t_min,
        "t_max": t_max,
        "delta_max": delta_max,
        "patch_sizes": patch_sizes,
        "patch_probs": patch_probs,
        "p_synchronous": p_synchronous,
    }


# ---------------------------------------------------------------------------------------------
# The draws (pure, traced once per static configuration)
# ---------------------------------------------------------------------------------------------


def _per_image(values: Array, grid: Grid) -> Array:
    """[B] -> [B, *grid], each image constant."""
    return jnp.broadcast_to(
        values.reshape(values.shape[0], *(1,) * len(grid)), (values.shape[0], *grid)
    )


def _patch_levels(table: Array, k: Array, k_max: int, grid: Grid) -> Array:
    """Spreads per-patch levels over the tokens, with a per-image grid size K.

    Args:
      table: [B, k_max ** d] float32, the level of patch (p_1, ..., p_d) at the row-major index.
      k: [B] int32 in [1, k_max], the grid size K of each image.
      k_max: static bound on k.
      grid: the token grid (n_1, ..., n_d).
    Returns:
      [B, *grid]; token (i_1, ..., i_d) gets the level of patch (floor(i_a * K / n_a))_a.
    """
    batch, d = table.shape[0], len(grid)
    flat = 0
    for axis, n in enumerate(grid):
        shape = [batch] + [1] * d
        shape[axis + 1] = n
        patch = (jnp.arange(n, dtype=jnp.int32)[None, :] * k[:, None]) // n
        flat = flat * k_max + patch.reshape(shape)
    size = math.prod(grid)
    return jnp.take_along_axis(table, flat.reshape(batch, size), axis=1).reshape(batch, *grid)


def _synchronous(key: Array, batch_size: int, grid: Grid) -> Array:
    return _per_image(jax.random.uniform(key, (batch_size,), jnp.float32), grid)


def _independent(key: Array, batch_size: int, grid: Grid) -> Array:
    # Drawn flat: rank-2 random draws compile several times faster than rank-3+ ones on CPU.
    size = math.prod(grid)
    return jax.random.uniform(key, (batch_size, size), jnp.float32).reshape(batch_size, *grid)


def _draw_k(
    key: Array, batch_size: int, patch_sizes: tuple[int, ...], patch_probs: tuple[float, ...]
) -> Array:
    """[B] int32: a grid size K per image, from `patch_sizes` with `patch_probs`."""
    return jax.random.choice(
        key,
        jnp.asarray(patch_sizes, jnp.int32),
        (batch_size,),
        p=jnp.asarray(patch_probs, jnp.float32),
    )


def _patchwise(
    key: Array,
    batch_size: int,
    grid: Grid,
    patch_sizes: tuple[int, ...],
    patch_probs: tuple[float, ...],
) -> Array:
    k_max = max(patch_sizes)
    if len(patch_sizes) == 1:  # one K: nothing to draw, the whole key goes to the patch levels
        k = jnp.full((batch_size,), k_max, jnp.int32)
    else:
        key_k, key = jax.random.split(key)
        k = _draw_k(key_k, batch_size, patch_sizes, patch_probs)
    table = jax.random.uniform(key, (batch_size, k_max ** len(grid)), jnp.float32)
    return _patch_levels(table, k, k_max, grid)


def _perlin(
    key: Array, batch_size: int, grid: Grid, scale: int, threshold: float, octaves: int
) -> Array:
    key_noise, key_t, key_b = jax.random.split(key, 3)
    noise = perlin.fractal_noise(key_noise, batch_size, grid, scale, octaves)
    mask = (noise > threshold).astype(jnp.float32)
    t = _per_image(jax.random.uniform(key_t, (batch_size,), jnp.float32), grid)
    b = _per_image(jax.random.bernoulli(key_b, 0.5, (batch_size,)).astype(jnp.float32), grid)
    return t * mask + (1.0 - mask) * b


def _asyncpatch(
    key: Array,
    batch_size: int,
    grid: Grid,
    t_min: float,
    t_max: float,
    delta_max: float,
    patch_sizes: tuple[int, ...],
    patch_probs: tuple[float, ...],
    p_synchronous: float,
) -> Array:
    key_tbar, key_k, key_patch, key_mix, key_sync = jax.random.split(key, 5)
    tbar = jax.random.uniform(key_tbar, (batch_size,), jnp.float32, t_min, t_max)
    delta = jnp.minimum(jnp.minimum(tbar - t_min, t_max - tbar), delta_max)
    k = _draw_k(key_k, batch_size, patch_sizes, patch_probs)
    k_max = max(patch_sizes)
    u = jax.random.uniform(key_patch, (batch_size, k_max ** len(grid)), jnp.float32, -1.0, 1.0)
    table = tbar[:, None] + delta[:, None] * u
    levels = jnp.clip(_patch_levels(table, k, k_max, grid), t_min, t_max)
    synchronous = jax.random.bernoulli(key_mix, p_synchronous, (batch_size,))
    return jnp.where(
        _per_image(synchronous, grid), _synchronous(key_sync, batch_size, grid), levels
    )


_DRAWS = {
    "synchronous": _synchronous,
    "independent": _independent,
    "patchwise": _patchwise,
    "perlin": _perlin,
    "asyncpatch": _asyncpatch,
}

_RESOLVERS = {
    "synchronous": _resolve_none,
    "independent": _resolve_none,
    "patchwise": _resolve_patchwise,
    "perlin": _resolve_perlin,
    "asyncpatch": _resolve_asyncpatch,
}


@functools.partial(jax.jit, static_argnames=("name", "batch_size", "grid", "params"))
def _sample_jit(
    key: Array, *, name: str, batch_size: int, grid: Grid, params: tuple[tuple[str, object], ...]
) -> Array:
    return _DRAWS[name](key, batch_size, grid, **dict(params))
