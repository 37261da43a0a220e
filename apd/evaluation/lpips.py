"""LPIPS (Zhang et al. 2018), AlexNet variant v0.1, with weights from local files only.

    d(x, y) = sum over layers l of  mean over positions of  w_l . (n(f_l(x)) - n(f_l(y)))^2

f_l are the ReLU outputs of AlexNet's five convolutions (torchvision's `alexnet().features`,
channels 64, 192, 384, 256, 256), n divides each position's feature vector by its L2 norm
(+1e-10), and w_l are LPIPS's learned non-negative 1x1 weights. Inputs are first shifted and
scaled per channel as the LPIPS package's ScalingLayer does. This is what `lpips.LPIPS(net="alex")`
computes on images in [-1, 1] (the value the inpainting papers report).

Weights come from two published files, converted once into one .npz:
  alexnet-owt-7be5be79.pth  torchvision's ImageNet AlexNet (SHA-256 prefix 7be5be79, checked);
  alex.pth                  LPIPS's linear heads v0.1, shipped in the lpips Python package as
                            lpips/weights/v0.1/alex.pth (names and shapes checked).

    python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz

Parameters stay in torch layout (convolution weights [O, I, kh, kw]), under torch's names.
"""

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from apd.evaluation import integrity, torch_weights

Array = jax.Array
Params = dict[str, np.ndarray]

ALEXNET_FILENAME = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILENAME
ALEXNET_SHA256_PREFIX = "7be5be79"
LINEAR_FILENAME = "alex.pth"
LINEAR_SOURCE = "the lpips Python package, file lpips/weights/v0.1/alex.pth"
WEIGHTS_FLAG = "--lpips_weights"

# (torch name, out channels, in channels, kernel, stride, padding, max pool 3/2 after the ReLU).
_CONVS = (
    ("features.0", 64, 3, 11, 4, 2, True),
    ("features.3", 192, 64, 5, 1, 2, True),
    ("features.6", 384, 192, 3, 1, 1, False),
    ("features.8", 256, 384, 3, 1, 1, False),
    ("features.10", 256, 256, 3, 1, 1, False),
)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 1, 1, 3)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 1, 1, 3)
_NORM_EPS = 1e-10
_CONVERT_HINT = (
    "python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz, and pass the .npz "
    f"with {WEIGHTS_FLAG}."
)
_EXPECTED_NPZ = (
    "the .npz that `python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz` writes"
)
_EXPECTED_PTH = {
    "alexnet": f"torchvision's AlexNet weights ({ALEXNET_FILENAME})",
    "linear": f"LPIPS's AlexNet heads ({LINEAR_FILENAME}, lpips v0.1)",
}


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter names (torch's) and shapes: AlexNet's convolutions and LPIPS's linear heads."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (name, out, inp, kernel, *_) in enumerate(_CONVS):
        shapes[f"{name}.weight"] = (out, inp, kernel, kernel)
        shapes[f"{name}.bias"] = (out,)
        shapes[f"lin{layer}.model.1.weight"] = (1, out, 1, 1)
    return shapes


def check_params(params: Mapping[str, np.ndarray]) -> Params:
    """Returns the expected parameters as float32, ValueError if any is missing or misshaped."""
    expected = expected_shapes()
    missing = sorted(set(expected) - set(params))
    misshaped = sorted(
        f"{k}: {tuple(np.shape(params[k]))} (expected {v})"
        for k, v in expected.items()
        if k in params and tuple(np.shape(params[k])) != v
    )
    if missing or misshaped:
        raise ValueError(
            f"not LPIPS AlexNet parameters: missing {missing[:5]}, wrong shape {misshaped[:5]}."
        )
    return {k: np.asarray(params[k], np.float32) for k in expected}


def random_params(key: Array) -> Params:
    """Random parameters of the right shapes (for tests); linear heads non-negative like LPIPS's."""
    shapes = expected_shapes()
    flat = np.asarray(jax.random.normal(key, (sum(map(np.prod, shapes.values())),), jnp.float32))
    params, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        draw = flat[offset : offset + size].reshape(shape) * np.float32(
            np.sqrt(2 * shape[0] / size)
        )
        params[name] = np.abs(draw) if name.startswith("lin") else draw
        offset += size
    return params


def _conv(x: Array, weight: Array, bias: Array, stride: int, padding: int) -> Array:
    y = jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=(stride, stride),
        padding=[(padding, padding)] * 2,
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + bias[None, None, None, :]


def _features(params: Params, x: Array) -> list[Array]:
    """AlexNet's five ReLU outputs for images [B, H, W, 3] in [-1, 1]."""
    x = (x - _SHIFT) / _SCALE
    taps = []
    for name, _, _, _, stride, padding, pool in _CONVS:
        x = jax.nn.relu(_conv(x, params[f"{name}.weight"], params[f"{name}.bias"], stride, padding))
        taps.append(x)
        if pool:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
    return taps


@jax.jit
def _distance(params: Params, x: Array, y: Array) -> Array:
    total = jnp.zeros(x.shape[0], jnp.float32)
    for layer, (fx, fy) in enumerate(zip(_features(params, x), _features(params, y), strict=True)):
        nx = fx / (jnp.sqrt(jnp.sum(fx * fx, axis=-1, keepdims=True)) + _NORM_EPS)
        ny = fy / (jnp.sqrt(jnp.sum(fy * fy, axis=-1, keepdims=True)) + _NORM_EPS)
        weights = params[f"lin{layer}.model.1.weight"][0, :, 0, 0]
        total = total + jnp.mean(jnp.square(nx - ny) @ weights, axis=(1, 2))
    return total


def distance(params: Params, x: Array, y: Array) -> Array:
    """LPIPS distance per image pair.

    Args:
      params: from `load_params` (or `random_params` in tests).
      x, y: [B, H, W, 3] float32 images in [-1, 1], H and W >= 32 (AlexNet's strides).

    Returns:
      [B] float32 >= 0; 0 for identical images.
    """
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 32:
        raise ValueError(
            "LPIPS needs two RGB batches of one shape [B, H, W, 3] with H, W >= 32 (in [-1, 1]); "
            f"got {x.shape} and {y.shape}."
        )
    return _distance(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------


def _missing_message(path: str) -> str:
    return (
        f"LPIPS weights file {path!r} does not exist. apd downloads nothing: get "
        f"{ALEXNET_FILENAME} (torchvision's AlexNet, {ALEXNET_URL}) and {LINEAR_FILENAME} "
        f"({LINEAR_SOURCE}) on a machine with internet access, convert them where torch is "
        f"installed with {_CONVERT_HINT}"
    )


def load_params(path: str, expected_alexnet_sha256: str | None = ALEXNET_SHA256_PREFIX) -> Params:
    """Loads converted LPIPS weights (an .npz written by `convert`), checking their hashes.

    Args:
      path: the .npz.
      expected_alexnet_sha256: hash or prefix the AlexNet .pth it came from must have; None
        skips that check (test weights). The .npz's content hash is always checked.

    Raises:
      FileNotFoundError: naming the files needed, where to get them and the flag that takes them.
      ValueError: for a wrong or corrupt file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    arrays, sources = torch_weights.read_npz(path, _EXPECTED_NPZ)
    torch_weights.check_source(path, sources, "alexnet", expected_alexnet_sha256)
    return check_params(arrays)


def save_params(path: str, params: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
    """Writes checked parameters with their source files' SHA-256s (see `load_params`)."""
    torch_weights.write_npz(path, check_params(params), sources)


def convert(
    alexnet_pth: str,
    linear_pth: str,
    npz_path: str,
    expected_alexnet_sha256: str | None = ALEXNET_SHA256_PREFIX,
) -> None:
    """Converts torchvision's AlexNet and LPIPS's alex.pth into one .npz for `load_params`.

    The AlexNet classifier's tensors are dropped; only `features.*` convolutions are kept. Any
    other unexpected tensor, a missing one or a wrong shape is refused.
    """
    for pth in (alexnet_pth, linear_pth):
        if not os.path.isfile(pth):
            raise FileNotFoundError(_missing_message(pth))
    alexnet_sha = (
        integrity.check_sha256(alexnet_pth, expected_alexnet_sha256, "AlexNet weights")
        if expected_alexnet_sha256 is not None
        else integrity.sha256_file(alexnet_pth)
    )
    alexnet = torch_weights.read_pth(alexnet_pth, _CONVERT_HINT, _EXPECTED_PTH["alexnet"])
    linear = torch_weights.read_pth(linear_pth, _CONVERT_HINT, _EXPECTED_PTH["linear"])
    expected = expected_shapes()
    unexpected = sorted(
        {k for k in alexnet if not k.startswith("classifier.")} - set(expected)
        | set(linear) - {k for k in expected if k.startswith("lin")}
    )
    if unexpected:
        raise ValueError(
            f"{alexnet_pth!r} / {linear_pth!r} hold tensors that are not torchvision's AlexNet or "
            f"LPIPS's AlexNet heads: {unexpected[:5]}."
        )
    params = {**alexnet, **linear}
    sources = {"alexnet": alexnet_sha, "linear": integrity.sha256_file(linear_pth)}
    save_params(npz_path, params, sources)
    logging.info("Converted %s and %s to %s.", alexnet_pth, linear_pth, npz_path)


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[1] != "convert":
        raise app.UsageError(
            "usage: python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz"
        )
    convert(argv[2], argv[3], argv[4], flags.FLAGS.expected_alexnet_sha256 or None)


if __name__ == "__main__":
    flags.DEFINE_string(
        "expected_alexnet_sha256",
        ALEXNET_SHA256_PREFIX,
        "SHA-256 (or prefix of at least 8 hex digits) the AlexNet .pth must have; empty: no check.",
    )
    app.run(main)
