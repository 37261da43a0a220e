"""Inpainting mask families, deterministic by seed; 1 = KNOWN pixel (apd convention).

The one source of masks: the evaluation's inpainting protocol (`FAMILIES`) and `apd.sample
--mask` (any family in `ALL_FAMILIES`). `make_masks(family, key_or_seed, batch, grid)` returns
uint8 [B, H, W] in {0, 1}. Mask i depends only on (family, seed, i): a batch of 10 is the first
10 masks of a batch of 1000, and a run can be split across hosts by index. Masks are drawn on the
host with numpy (Perlin noise on device, by `apd.levels.perlin`). Geometry given in pixels for
256 x 256 images (the conventions below are stated at that size) is scaled by min(H, W) / 256, so
every resolution sees the same shapes.

The evaluation protocol's families (`FAMILIES`), with the fraction of UNKNOWN pixels each
produces (checked by the tests):

  extrema  only a box of half the height and half the width is known, at a uniformly random
           position at least H/16, W/16 from the border; everything else is unknown. The
           "extreme" masks of MCG/DPS that RAD evaluates with (the complement of their box mask).
           Unknown fraction 1 - (H//2)(W//2)/(HW): 0.75 for even sizes.
  square   the complement: one unknown box of half the height and width (25% of the area), at a
           uniformly random position at least H/16, W/16 from the border (MCG/DPS "box": 128 x 128
           in 256 x 256 with a 16-pixel margin; RePaint and LaMa use boxes of similar area).
           Unknown fraction (H//2)(W//2)/(HW): 0.25 for even sizes.
  thin     LaMa's "thin" free-form masks (random_thin_256): 4-50 strokes, each a polyline of 1-5
           segments from a uniformly random start, segment length 10-49 px, brush width 5-14 px,
           direction 0.01 + {0, 1, 2, 3} rad (mirrored to 2 pi minus that on every other stroke).
           Unknown fraction in (0, 0.5]: masks outside are redrawn, as LaMa's generator drops
           masks covering more than half the image (max_tamper_area 0.5) or nothing.
  wide     LaMa's "thick" masks (random_thick_256), RePaint's "wide": with probability 1/1.3,
           1-5 strokes of length 10-209 px and width 5-104 px; otherwise 1-3 boxes with sides of
           30-149 px, at least 10 px from the border. Unknown fraction in (0, 0.5] (redrawn
           likewise).
  half     one half of the image is known: the left, right, top or bottom half, uniformly.
           Unknown fraction 0.5 for even sizes.
  perlin   binary Perlin regions (apd's 'perlin' level sampler's noise, lattices of 2 and 4 cells
           per axis): the unknown region is where the noise exceeds its (1 - f)-quantile, with
           f ~ U(0.2, 0.8) per mask. Unknown fraction f, in [0.2, 0.8].

Further families for sampling (`EXTRA_FAMILIES`, not part of the protocol):

  top      the top half (H//2 rows) is known, the bottom half generated; the same for every seed.
  patches  a 4 x 4 grid of cells (cell boundaries at multiples of H/4, W/4), each generated with
           probability 1/2, independently per cell and mask. Unknown fraction k/16 with
           k ~ Binomial(16, 1/2) when 4 divides H and W.

Strokes are drawn as capsules: a pixel (row y, column x) is covered when its distance to the
segment is at most half the brush width (OpenCV's thick lines, which LaMa draws with, also have
round ends).
"""

import functools
import math
import numbers
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.levels import perlin

FAMILIES = ("extrema", "square", "thin", "wide", "half", "perlin")
"""The evaluation protocol's families (`evaluate.inpainting.families` takes these)."""

EXTRA_FAMILIES = ("top", "patches")
"""Families for sampling only (`apd.sample --mask`); see the module docstring."""

ALL_FAMILIES = FAMILIES + EXTRA_FAMILIES

REFERENCE_SIZE = 256
"""The image size (pixels) at which the families' geometry is stated."""

MAX_UNKNOWN_FREE_FORM = 0.5
"""Thin and wide masks covering more than this fraction (or nothing) are redrawn."""

PERLIN_UNKNOWN_RANGE = (0.2, 0.8)
_PERLIN_SCALE, _PERLIN_OCTAVES = 2, 2
_PERLIN_CHUNK = 32
_MAX_REDRAWS = 1000
_PATCH_CELLS = 4  # 'patches': cells per side


# ---------------------------------------------------------------------------------------------
# Seeds.
# ---------------------------------------------------------------------------------------------


def seed_words(key_or_seed) -> tuple[int, ...]:
    """The entropy behind a seed: (seed,) for an int >= 0, the key's uint32 words for a key."""
    if isinstance(key_or_seed, numbers.Integral) and not isinstance(key_or_seed, bool):
        if not 0 <= key_or_seed < 2**63:
            raise ValueError(f"mask seed must be an int in [0, 2**63); got {key_or_seed!r}.")
        return (int(key_or_seed),)
    key = key_or_seed
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key)
    if words.dtype != np.uint32 or words.ndim != 1:
        raise ValueError(
            "masks need a seed: a non-negative int or a single JAX PRNG key (typed, or raw "
            f"uint32[2]); got {type(key_or_seed).__name__} {getattr(words, 'shape', '')}."
        )
    return tuple(int(w) for w in words)


def _rng(family: str, words: tuple[int, ...], index: int) -> np.random.Generator:
    # The family's index in ALL_FAMILIES is part of the seed: FAMILIES come first, so the
    # protocol's masks do not depend on the families added after them.
    return np.random.default_rng([*words, ALL_FAMILIES.index(family), index])


# ---------------------------------------------------------------------------------------------
# Geometry.
# ---------------------------------------------------------------------------------------------


def _box(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """bool [H, W]: True inside a (H//2) x (W//2) box at least H//16, W//16 from the border."""
    inside = np.zeros((height, width), bool)
    box_h, box_w = max(1, height // 2), max(1, width // 2)
    top = rng.integers(height // 16, height - height // 16 - box_h, endpoint=True)
    left = rng.integers(width // 16, width - width // 16 - box_w, endpoint=True)
    inside[top : top + box_h, left : left + box_w] = True
    return inside


def _paint_segment(
    canvas: np.ndarray, start: tuple[float, float], end: tuple[float, float], width: float
) -> None:
    """Sets canvas pixels within width / 2 of the segment start -> end ((row, col) points)."""
    height, width_px = canvas.shape
    radius = width / 2.0
    (y0, x0), (y1, x1) = start, end
    top, bottom = (
        max(0, math.floor(min(y0, y1) - radius)),
        min(height, math.ceil(max(y0, y1) + radius) + 1),
    )
    left, right = (
        max(0, math.floor(min(x0, x1) - radius)),
        min(width_px, math.ceil(max(x0, x1) + radius) + 1),
    )
    if top >= bottom or left >= right:
        return
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float64)
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    t = 0.0 if length2 == 0 else np.clip(((ys - y0) * dy + (xs - x0) * dx) / length2, 0.0, 1.0)
    dist2 = (ys - y0 - t * dy) ** 2 + (xs - x0 - t * dx) ** 2
    canvas[top:bottom, left:right] |= dist2 <= radius * radius


def _strokes(
    rng: np.random.Generator,
    height: int,
    width: int,
    times: tuple[int, int],
    max_len: int,
    max_width: int,
) -> np.ndarray:
    """bool [H, W]: LaMa-style random polylines (parameters in pixels at REFERENCE_SIZE)."""
    scale = min(height, width) / REFERENCE_SIZE
    canvas = np.zeros((height, width), bool)
    for stroke in range(rng.integers(times[0], times[1], endpoint=True)):
        y, x = int(rng.integers(height)), int(rng.integers(width))
        for _ in range(1 + rng.integers(5)):
            angle = 0.01 + rng.integers(4)
            if stroke % 2 == 0:
                angle = 2.0 * math.pi - angle
            length = (10 + rng.integers(max_len)) * scale
            brush = max(1.0, (5 + rng.integers(max_width)) * scale)
            end_y = int(np.clip(y + length * math.cos(angle), 0, height))
            end_x = int(np.clip(x + length * math.sin(angle), 0, width))
            _paint_segment(canvas, (y, x), (end_y, end_x), brush)
            y, x = end_y, end_x
    return canvas


def _boxes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """bool [H, W]: LaMa's 1-3 random rectangles (sides 30-149 px, margin 10 px at 256)."""
    scale = min(height, width) / REFERENCE_SIZE
    margin = int(10 * scale)
    low = max(1, int(30 * scale))
    high = max(low + 1, min(int(150 * scale), height - 2 * margin, width - 2 * margin))
    canvas = np.zeros((height, width), bool)
    for _ in range(rng.integers(1, 3, endpoint=True)):
        box_w, box_h = int(rng.integers(low, high)), int(rng.integers(low, high))
        left = int(rng.integers(margin, max(margin, width - margin - box_w) + 1))
        top = int(rng.integers(margin, max(margin, height - margin - box_h) + 1))
        canvas[top : top + box_h, left : left + box_w] = True
    return canvas


def _free_form(
    draw: Callable[[np.random.Generator, int, int], np.ndarray],
) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    """Redraws until the unknown region covers some, at most half, of the image (LaMa's filter)."""

    def known(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        for _ in range(_MAX_REDRAWS):
            unknown = draw(rng, height, width)
            if 0.0 < unknown.mean() <= MAX_UNKNOWN_FREE_FORM:
                return ~unknown
        raise RuntimeError(
            f"no acceptable free-form mask in {_MAX_REDRAWS} draws on {height}x{width}."
        )

    return known


def _thin(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return _strokes(rng, height, width, times=(4, 50), max_len=40, max_width=10)


def _wide(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    if rng.random() < 1.0 / 1.3:
        return _strokes(rng, height, width, times=(1, 5), max_len=200, max_width=100)
    return _boxes(rng, height, width)


def _half(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    known = np.zeros((height, width), bool)
    side = rng.integers(4)
    if side == 0:
        known[:, : width // 2] = True
    elif side == 1:
        known[:, width - width // 2 :] = True
    elif side == 2:
        known[: height // 2] = True
    else:
        known[height - height // 2 :] = True
    return known


def _top(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    known = np.zeros((height, width), bool)
    known[: height // 2] = True
    return known


def _patches(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    unknown_cells = rng.random((_PATCH_CELLS, _PATCH_CELLS)) < 0.5
    cell_rows = (np.arange(height) * _PATCH_CELLS) // height
    cell_cols = (np.arange(width) * _PATCH_CELLS) // width
    return ~unknown_cells[cell_rows][:, cell_cols]


_KNOWN_FNS = {
    "extrema": _box,
    "square": lambda rng, h, w: ~_box(rng, h, w),
    "thin": _free_form(_thin),
    "wide": _free_form(_wide),
    "half": _half,
    "top": _top,
    "patches": _patches,
}


@functools.partial(jax.jit, static_argnames="grid")
def _perlin_unknown(seeds: jax.Array, fractions: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Unknown regions [B, H, W] bool: noise above its (1 - f)-quantile, one seed per mask."""

    def one(seed, fraction):
        key = jax.random.key(seed)
        noise = perlin.fractal_noise(key, 1, grid, _PERLIN_SCALE, _PERLIN_OCTAVES)[0]
        return noise > jnp.quantile(noise, 1.0 - fraction)

    return jax.vmap(one)(seeds, fractions)


def _perlin_masks(words: tuple[int, ...], batch: int, height: int, width: int) -> np.ndarray:
    seeds, fractions = np.zeros(batch, np.uint32), np.zeros(batch, np.float32)
    for i in range(batch):
        rng = _rng("perlin", words, i)
        seeds[i], fractions[i] = rng.integers(0, 2**31 - 1), rng.uniform(*PERLIN_UNKNOWN_RANGE)
    # Fixed-size chunks (the last one padded): one compilation per image size, whatever B is.
    padded = -(-batch // _PERLIN_CHUNK) * _PERLIN_CHUNK
    seeds, fractions = np.resize(seeds, padded), np.resize(fractions, padded)
    unknown = [
        np.asarray(
            _perlin_unknown(
                seeds[start : start + _PERLIN_CHUNK],
                fractions[start : start + _PERLIN_CHUNK],
                (height, width),
            )
        )
        for start in range(0, padded, _PERLIN_CHUNK)
    ]
    return ~np.concatenate([np.zeros((0, height, width), bool), *unknown])[:batch]


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def _as_grid(grid: int | Sequence[int]) -> tuple[int, int]:
    dims = (grid, grid) if isinstance(grid, numbers.Integral) else tuple(grid)
    if len(dims) != 2 or not all(isinstance(n, numbers.Integral) and n >= 4 for n in dims):
        raise ValueError(
            f"mask grid must be an int n >= 4 (n x n pixels) or a pair (H, W) of ints >= 4; got "
            f"{grid!r}."
        )
    return int(dims[0]), int(dims[1])


def make_masks(family: str, key_or_seed, batch: int, grid: int | Sequence[int]) -> np.ndarray:
    """Draws inpainting masks of one family (see the module docstring for each family).

    Args:
      family: one of `ALL_FAMILIES` (the protocol's `FAMILIES`, then `EXTRA_FAMILIES`).
      key_or_seed: a non-negative int seed or a JAX PRNG key; the same seed gives the same masks.
      batch: B >= 0, the number of masks; mask i depends only on (family, seed, i).
      grid: the image size: n for n x n, or (H, W); each >= 4 pixels.

    Returns:
      masks: uint8 [B, H, W] in {0, 1}, 1 = known pixel, 0 = to be inpainted.
    """
    checks.check_choice("mask family", family, ALL_FAMILIES)
    if not isinstance(batch, numbers.Integral) or batch < 0:
        raise ValueError(f"mask batch size must be an int >= 0; got {batch!r}.")
    height, width = _as_grid(grid)
    words = seed_words(key_or_seed)
    if family == "perlin":
        known = _perlin_masks(words, batch, height, width)
    else:
        draw = _KNOWN_FNS[family]
        known = np.zeros((batch, height, width), bool)
        for i in range(batch):
            known[i] = draw(_rng(family, words, i), height, width)
    return known.astype(np.uint8)


def unknown_fraction(masks: np.ndarray) -> np.ndarray:
    """[B] float64: the fraction of pixels to inpaint (mask == 0) in each mask [B, H, W]."""
    return 1.0 - np.asarray(masks, np.float64).mean(axis=(1, 2))


def _check_masks(masks: np.ndarray, where: str) -> None:
    if masks.dtype != np.uint8 or masks.ndim != 3 or (masks.size and masks.max() > 1):
        raise ValueError(
            f"{where}: masks must be uint8 [B, H, W] in {{0, 1}} (1 = known); got "
            f"{masks.dtype} of shape {masks.shape}"
            + (f" with max {masks.max()}" if masks.size else "")
            + "."
        )


def save_masks(path: str, masks: np.ndarray, family: str, key_or_seed) -> None:
    """Writes masks with their family and seed to an .npz (saved beside inpainting results)."""
    masks = np.asarray(masks)
    _check_masks(masks, "save_masks")
    checks.check_choice("mask family", family, ALL_FAMILIES)
    words = np.asarray(seed_words(key_or_seed), np.uint64)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, masks=masks, family=np.asarray(family), seed_words=words)
    os.replace(tmp, path)


def load_masks(path: str) -> tuple[np.ndarray, dict]:
    """Reads `save_masks` output: (masks uint8 [B, H, W], {"family": str, "seed_words": tuple})."""
    with np.load(path, allow_pickle=False) as f:
        if not {"masks", "family", "seed_words"} <= set(f.files):
            raise ValueError(
                f"{path!r} is not a saved mask file (needs masks, family and seed_words; has "
                f"{sorted(f.files)})."
            )
        masks, family, words = f["masks"], str(f["family"]), tuple(int(w) for w in f["seed_words"])
    _check_masks(masks, path)
    return masks, {"family": family, "seed_words": words}
