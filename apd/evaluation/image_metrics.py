"""Per-image PSNR and SSIM in JAX, on images [B, H, W, C] in [-1, 1] (or any range: `data_range`).

PSNR = 10 log10(L^2 / MSE), the MSE over all pixels and channels of an image; L is the data
range (2 for [-1, 1], 1 for [0, 1], 255 for uint8 values). Identical images give +inf from
`psnr`; `capped_psnr`, what evaluation averages, floors each image's MSE at that of rounding to
8 bits, (L / 255)^2 / 12, so an identical image reads `PSNR_CAP_DB` = 10 log10(12 * 255^2) =
58.9 dB: one inpainting whose hole falls on a flat background it fills exactly (clip art's white)
would otherwise make the mean over images infinite.

SSIM is Wang et al. (2004) with their reference settings: an 11 x 11 Gaussian window (sigma 1.5,
normalised to sum 1), K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2, local variances
without the N / (N - 1) correction, and the SSIM map averaged over the positions where the
window fits inside the image ("valid"). Colour images average the per-channel maps. This equals
scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L, channel_axis=-1)`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(x: Array, y: Array) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"image metrics need two image batches of one shape [B, H, W, C]; got {x.shape} and "
            f"{y.shape}."
        )


@jax.jit
def _psnr(x: Array, y: Array, data_range: Array) -> Array:
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(jnp.square(data_range) / mse)


def psnr(x: Array, y: Array, data_range: float = 2.0) -> Array:
    """Peak signal-to-noise ratio in dB, per image.

    Args:
      x, y: [B, H, W, C] images (float, any dtype) of the same shape.
      data_range: L, the width of the pixel range: 2.0 for [-1, 1], 1.0 for [0, 1].

    Returns:
      [B] float32; +inf where the images are identical.
    """
    _check_pair(x, y)
    return _psnr(x, y, jnp.float32(data_range))


# The PSNR of uniform 8-bit rounding noise, MSE = (L / 255)^2 / 12, whatever the range L.
PSNR_CAP_DB = float(10.0 * np.log10(12.0 * 255.0**2))


def capped_psnr(x: Array, y: Array, data_range: float = 2.0) -> Array:
    """`psnr` with each image's MSE floored at the 8-bit rounding error's: [B] float32 in
    (-inf, PSNR_CAP_DB]; images within 8-bit rounding of each other read the cap."""
    return jnp.minimum(psnr(x, y, data_range), PSNR_CAP_DB)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The 1-D Gaussian [size] float32, summing to 1 (the 2-D window is its outer product)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    window = np.exp(-0.5 * np.square(offsets / sigma))
    return (window / window.sum()).astype(np.float32)


def _blur(maps: Array, window: np.ndarray) -> Array:
    """Valid separable filtering of maps [N, H, W, K], each of the K channels on its own."""
    k = maps.shape[-1]
    size = window.shape[0]
    dimension_numbers = ("NHWC", "HWIO", "NHWC")
    column = jnp.asarray(np.tile(window.reshape(size, 1, 1, 1), (1, 1, 1, k)))
    row = jnp.asarray(np.tile(window.reshape(1, size, 1, 1), (1, 1, 1, k)))
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=dimension_numbers,
        feature_group_count=k,
        precision=jax.lax.Precision.HIGHEST,
    )
    return conv(conv(maps, column), row)


@functools.partial(jax.jit, static_argnames=("window_size", "sigma"))
def _ssim(x: Array, y: Array, data_range: Array, window_size: int, sigma: float) -> Array:
    b, h, w, c = x.shape
    x = jnp.moveaxis(x.astype(jnp.float32), -1, 1).reshape(b * c, h, w)
    y = jnp.moveaxis(y.astype(jnp.float32), -1, 1).reshape(b * c, h, w)
    maps = jnp.stack([x, y, x * x, y * y, x * y], axis=-1)
    mu_x, mu_y, xx, yy, xy = jnp.moveaxis(_blur(maps, gaussian_window(window_size, sigma)), -1, 0)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = jnp.square(SSIM_K1 * data_range), jnp.square(SSIM_K2 * data_range)
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.reshape(b, c, -1).mean(axis=(1, 2))


def ssim(
    x: Array,
    y: Array,
    data_range: float = 2.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Array:
    """Structural similarity (Wang et al. 2004), per image.

    Args:
      x, y: [B, H, W, C] images of the same shape, H and W >= window_size.
      data_range: L, the width of the pixel range: 2.0 for [-1, 1], 1.0 for [0, 1].
      window_size: the Gaussian window's side (odd).
      sigma: the Gaussian's standard deviation in pixels.

    Returns:
      [B] float32 in [-1, 1]; 1 for identical images.
    """
    _check_pair(x, y)
    if window_size % 2 != 1 or min(x.shape[1:3]) < window_size:
        raise ValueError(
            f"SSIM needs an odd window no larger than the image; got window {window_size} for "
            f"images of {x.shape[1]}x{x.shape[2]}."
        )
    return _ssim(x, y, jnp.float32(data_range), window_size, float(sigma))
