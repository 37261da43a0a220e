"""Statistics of level maps: the image mean tbar and the spread, as the paper plots them (Fig. 3).

`image_mean`, `spread` and `per_image` are pure jnp functions (jit-compatible, shape-generic over
the token axes); `summarize` / `summary` reduce them to plain floats on the host with NumPy.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

DECILES = tuple(range(1, 10))


def _token_axes(levels: Array) -> tuple[int, ...]:
    return tuple(range(1, jnp.ndim(levels)))


def image_mean(levels: Array) -> Array:
    """tbar: levels [B, *grid] in [0, 1] -> [B] float32, the mean level of each image."""
    return jnp.mean(jnp.asarray(levels, jnp.float32), axis=_token_axes(levels))


def spread(levels: Array) -> Array:
    """levels [B, *grid] in [0, 1] -> [B] float32, max - min over the tokens of each image."""
    levels = jnp.asarray(levels, jnp.float32)
    axes = _token_axes(levels)
    return jnp.max(levels, axis=axes) - jnp.min(levels, axis=axes)


def per_image(levels: Array) -> dict[str, Array]:
    """Per-image statistics, each [B] float32.

    Keys: 'mean' (tbar), 'spread' (max - min), 'clean_fraction' (tokens exactly at 0),
    'noise_fraction' (tokens exactly at 1).
    """
    levels = jnp.asarray(levels, jnp.float32)
    axes = _token_axes(levels)
    return {
        "mean": image_mean(levels),
        "spread": spread(levels),
        "clean_fraction": jnp.mean((levels == 0.0).astype(jnp.float32), axis=axes),
        "noise_fraction": jnp.mean((levels == 1.0).astype(jnp.float32), axis=axes),
    }


def ks_uniform(x) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n - F| of samples x (any shape) against U(0, 1)."""
    x = np.sort(np.clip(np.asarray(x, np.float64).ravel(), 0.0, 1.0))
    n = x.size
    if n == 0:
        raise ValueError("ks_uniform needs at least one sample; got an empty array.")
    above = np.arange(1, n + 1) / n - x
    below = x - np.arange(n) / n
    return float(max(above.max(), below.max()))


def summarize(stats: Mapping[str, Array]) -> dict[str, float]:
    """Reduces `per_image` statistics (possibly concatenated over chunks) to a dict of floats.

    Keys: n_images; tbar_mean, tbar_std, tbar_min, tbar_max; tbar_q10 ... tbar_q90 (deciles);
    tbar_ks (KS statistic of tbar against U(0, 1)); tbar_bin0 ... tbar_bin9 (fraction of images
    with tbar in [k/10, (k+1)/10), the last bin closed); spread_mean, spread_std, spread_max;
    zero_spread_fraction (images with a single level); clean_token_fraction and
    noise_token_fraction (tokens exactly at 0 / at 1).
    """
    missing = {"mean", "spread", "clean_fraction", "noise_fraction"} - set(stats)
    if missing:
        raise ValueError(f"summarize needs the per_image keys; missing {sorted(missing)}.")
    tbar = np.asarray(stats["mean"], np.float64)
    spreads = np.asarray(stats["spread"], np.float64)
    if tbar.size == 0:
        raise ValueError("summarize needs at least one image; got none.")
    out = {
        "n_images": float(tbar.size),
        "tbar_mean": float(tbar.mean()),
        "tbar_std": float(tbar.std()),
        "tbar_min": float(tbar.min()),
        "tbar_max": float(tbar.max()),
    }
    for q, value in zip(DECILES, np.quantile(tbar, np.asarray(DECILES) / 10.0), strict=True):
        out[f"tbar_q{10 * q}"] = float(value)
    out["tbar_ks"] = ks_uniform(tbar)
    counts, _ = np.histogram(np.clip(tbar, 0.0, 1.0), bins=10, range=(0.0, 1.0))
    for k, count in enumerate(counts):
        out[f"tbar_bin{k}"] = float(count / tbar.size)
    out.update(
        spread_mean=float(spreads.mean()),
        spread_std=float(spreads.std()),
        spread_max=float(spreads.max()),
        zero_spread_fraction=float(np.mean(spreads == 0.0)),
        clean_token_fraction=float(np.mean(stats["clean_fraction"])),
        noise_token_fraction=float(np.mean(stats["noise_fraction"])),
    )
    return out


def summary(levels: Array) -> dict[str, float]:
    """Summary statistics of a batch of level maps [B, *grid] in [0, 1]; see `summarize`."""
    return summarize({k: np.asarray(v) for k, v in per_image(levels).items()})
