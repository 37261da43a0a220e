"""Samples as images: a jitted sampler over model parameters, and PNG grids.

    sample_fn = images.make_sample_fn(model.apply, schedule=schedule, prediction="v", channels=1,
                                      num_classes=10)
    plan = apd.plans.synchronous(steps=50, batch=64, grid=(28, 28))
    x = sample_fn(ema_params, plan, key, labels=jnp.arange(64) % 10)   # [64, 28, 28, 1]
    images.write_sample_grid("samples/step_00001000.png", x)

`make_sample_fn` compiles once per plan shape and takes the parameters as an argument, so a
training loop can sample with its current EMA parameters without recompiling. Pixels are
float32 in [-1, 1] (the data pipeline's range) and uint8 in [0, 255] on disk.
"""

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from PIL import Image

from apd import plans
from apd.sampling import sampler
from apd.schedules import Schedule

Array = jax.Array
ApplyFn = Callable[..., Array]
SampleFn = Callable[..., Array]


def denoiser(apply_fn: ApplyFn, params: Any) -> sampler.Denoise:
    """The sampler's `denoise(z, levels, labels)` for a Flax model's `apply` and its parameters.

    Args:
      apply_fn: `model.apply`, called as apply_fn({'params': params}, z, levels, labels).
      params: the model's parameter tree (concrete or traced).
    """

    def denoise(z: Array, levels: Array, labels: Array | None) -> Array:
        return apply_fn({"params": params}, z, levels, labels)

    return denoise


def make_sample_fn(
    apply_fn: ApplyFn,
    *,
    schedule: Schedule,
    prediction: str,
    channels: int,
    eta: float = 0.25,
    num_classes: int = 0,
    cfg_scale: float = 0.0,
    input_guidance: float = 0.0,
    context_level: str | float = "match",
    out_sharding: jax.sharding.Sharding | None = None,
) -> SampleFn:
    """A jitted `sample_fn(params, plan, key, x_known=None, noise=None, labels=None)`.

    It runs `apd.sampling.sample` with `denoise` built from `apply_fn` and the traced parameters,
    so new parameters (or a new plan of the same shape) reuse the compiled program. Guidance
    scales are fixed here: a scale of exactly 0 leaves its branch out of the network call.

    Args:
      apply_fn: `model.apply` of a backbone (z [N, H, W, C], levels [N, H, W], labels [N] or
        None) -> prediction like z.
      schedule, prediction: the model's noise schedule and prediction type ('x', 'eps', 'v').
      channels: C, the data's channel count.
      eta: DDIM stochastic coefficient in [0, 1].
      num_classes: classes of a class-conditional model (0: unconditional).
      cfg_scale, input_guidance: guidance scales (see `apd.sampling.sample`).
      context_level: input guidance's noisier context, 'match' or a level in [0, 1].
      out_sharding: sharding of the samples (e.g. replicated, so every process can read them).
    Returns:
      sample_fn(params, plan, key, x_known=None, noise=None, labels=None) -> samples
      [B, *tokens, C] float32, with plan an `apd.plans.Plan`, x_known and noise [B, *tokens, C]
      float32 and labels [B] int32 as in `apd.sampling.sample`.
    """

    def sample_fn(
        params: Any,
        plan: plans.Plan,
        key: Array,
        x_known: Array | None = None,
        noise: Array | None = None,
        labels: Array | None = None,
    ) -> Array:
        return sampler.sample(
            denoiser(apply_fn, params),
            plan,
            key,
            schedule=schedule,
            prediction=prediction,
            eta=eta,
            x_known=x_known,
            noise=noise,
            channels=channels,
            labels=labels,
            num_classes=num_classes,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
            context_level=context_level,
        )

    return jax.jit(sample_fn, out_shardings=out_sharding)


# ---------------------------------------------------------------------------------------------
# Pixels and PNG grids
# ---------------------------------------------------------------------------------------------


def to_uint8(images: Array | np.ndarray) -> np.ndarray:
    """float pixels in [-1, 1] -> uint8 in [0, 255] (rounded, clipped); uint8 passes through.

    The inverse of the pipeline's `u * 2 / 255 - 1`: data pixels come back exactly.
    """
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be float in [-1, 1] or uint8; got dtype {arr.dtype}.")
    return np.clip(np.round((arr.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(
    images: Array | np.ndarray, columns: int | None = None, pad: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tiles images row by row into one image.

    Args:
      images: [N, H, W, C] float in [-1, 1] or uint8, C in {1, 3}.
      columns: images per row; default ceil(sqrt(N)).
      pad: pixels between images and around the border.
      pad_value: uint8 value of the padding.
    Returns:
      uint8 [rows * (H + pad) + pad, columns * (W + pad) + pad, C], empty cells padding.
    """
    pixels = to_uint8(images)
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3) or pixels.shape[0] < 1:
        raise ValueError(
            f"images must be [N, H, W, C] with N >= 1 and C in (1, 3); got shape {pixels.shape}."
        )
    n, h, w, c = pixels.shape
    columns = math.ceil(math.sqrt(n)) if columns is None else columns
    if columns < 1:
        raise ValueError(f"columns must be >= 1; got {columns!r}.")
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = pixels[i]
    return out


def write_png(path: str, image: np.ndarray) -> None:
    """Writes uint8 [H, W, 1] (grayscale) or [H, W, 3] (RGB) as a PNG, creating its folder."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(
            f"write_png takes uint8 [H, W, 1 or 3]; got {image.dtype} of shape {image.shape}."
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)


def write_sample_grid(
    path: str, images: Array | np.ndarray, columns: int | None = None, pad: int = 2
) -> None:
    """Writes samples [N, H, W, C] (float in [-1, 1] or uint8) as one PNG grid."""
    write_png(path, grid(images, columns, pad))


def side_by_side(*panels: Array | np.ndarray, gap: int = 1) -> np.ndarray:
    """Joins per-sample panels left to right: k arrays [N, H, W, C] -> uint8 [N, H, k W + gap, C].

    Each panel is float in [-1, 1] or uint8; panels with one channel are repeated to match the
    others (a mask or level map next to RGB samples). The gap is mid-gray.
    """
    arrays = [to_uint8(p) for p in panels]
    channels = max(a.shape[-1] for a in arrays)
    arrays = [np.repeat(a, channels, axis=-1) if a.shape[-1] == 1 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(arrays[0].shape) != 4:
        raise ValueError(
            f"side_by_side takes panels of one shape [N, H, W, C]; got {[p.shape for p in panels]}."
        )
    n, h, _, c = arrays[0].shape
    separator = np.full((n, h, gap, c), 128, np.uint8)
    joined = [arrays[0]]
    for a in arrays[1:]:
        joined += [separator, a]
    return np.concatenate(joined, axis=2)


def level_map_image(levels: Array | np.ndarray) -> np.ndarray:
    """A level or strength map [N, H, W] in [0, 1] as grayscale uint8 [N, H, W, 1] (white = 1)."""
    arr = np.clip(np.asarray(levels, np.float32), 0.0, 1.0)
    return np.round(arr * 255.0).astype(np.uint8)[..., None]


def masked_input_image(
    images: Array | np.ndarray, known: Array | np.ndarray, fill: int = 128
) -> np.ndarray:
    """Inputs [N, H, W, C] with the tokens to generate (known [N, H, W] False) painted `fill`."""
    pixels = to_uint8(images).copy()
    pixels[~np.asarray(known, bool)] = fill
    return pixels
