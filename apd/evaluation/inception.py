"""The FID variant of InceptionV3 in Flax, with weights from a local file (nothing is downloaded).

FID compares pool3 features (the 2048-d global average pool before the classifier) of the
Inception network that the original TensorFlow FID code froze in 2015. pytorch-fid ported its
weights to a PyTorch state_dict, `pt_inception-2015-12-05-6726825d.pth` (the name's suffix is
the first 8 hex digits of the file's SHA-256, PyTorch hub's convention), and rebuilt the graph as
torchvision's Inception3 (1008 classes, no auxiliary head) with four blocks patched to match
TensorFlow: FIDInceptionA/C/E_1 average-pool without counting the zero padding, and
FIDInceptionE_2 max-pools in its pool branch. This module builds the same network in NHWC with
the state_dict's names, so the file maps onto it one tensor at a time:

    X.conv.weight [O, I, kh, kw]   -> params      X/conv/kernel [kh, kw, I, O]
    X.bn.weight, X.bn.bias          -> params      X/bn/scale, X/bn/bias
    X.bn.running_mean, running_var  -> batch_stats X/bn/mean, X/bn/var
    fc.weight [1008, 2048], fc.bias -> params      fc/kernel [2048, 1008], fc/bias
    X.bn.num_batches_tracked        -> (ignored)

where X is a dotted module path such as `Mixed_6b.branch7x7_2`. Every convolution is followed
by batch norm (eps 1e-3, running statistics) and ReLU, as torchvision's BasicConv2d. Convolutions
run at `Precision.HIGHEST` by default, so features do not depend on an accelerator's reduced
default matmul precision (TF32 on recent GPUs, bf16 passes on TPU).

Input: images [B, H, W, C] float32 in [-1, 1] (apd's pixel convention), C in {1, 3} (grayscale
is repeated to RGB). `preprocess` resizes them to 299 x 299 bilinearly with half-pixel centres
and no antialiasing, as pytorch-fid's `F.interpolate(..., mode="bilinear",
align_corners=False)` does. (pytorch-fid maps [0, 1] inputs to [-1, 1] after resizing; both
steps are linear, so the order does not matter.)

Weights files accepted by `load_variables`:
  .pth  the pytorch-fid file itself; needs torch (`torch.load(weights_only=True)`). Its SHA-256
        must start with 6726825d.
  .npz  written by `python -m apd.evaluation.inception convert IN.pth OUT.npz` (no torch needed
        to read it): the same tensors under the same names, plus the source file's SHA-256 and
        a hash of the arrays' content, both checked on load.
Only the hash prefix from the file name is checked against the real file: apd records no full
hash it could not derive itself. Names and shapes are checked strictly (missing, unexpected or
misshaped tensors are refused).

    python -m apd.evaluation.inception convert IN.pth OUT.npz [--expected_sha256=PREFIX]
"""

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from apd.evaluation import integrity, torch_weights

Array = jax.Array
Variables = dict[str, Any]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
"""The first 8 hex digits of the .pth file's SHA-256, from its name (PyTorch hub's convention)."""

WEIGHTS_FLAG = "--inception_weights"
"""The evaluation binary's flag naming the weights file (quoted in error messages)."""

INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
"""The smallest input the network's valid convolutions and poolings accept."""
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

_IGNORED_SUFFIX = ".num_batches_tracked"


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> batch norm with running statistics -> ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.stride,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """3x3 stride-1 average pool over the unpadded neighbours (TensorFlow's; the FID patch)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int) -> Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1, 5x5, double 3x3 and average-pool branches (FIDInceptionA)."""

    pool_features: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3, double 3x3 and max-pool branches."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions (FIDInceptionC)."""

    channels_7x7: int
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 3x3 and 7x7-then-3x3 strided branches, max pool."""

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) with split 1x3 / 3x1 outputs.

    pool="avg" is FIDInceptionE_1 (average pool without the padding); pool="max" is
    FIDInceptionE_2 (a max pool, as in the TensorFlow graph FID froze).
    """

    pool: str
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3 up to pool3, and optionally its 1008-way classifier.

    __call__(x, with_logits=False): x [B, H, W, 3] float32 in [-1, 1] with H, W >= 75 (299 for
    FID: see `preprocess`) -> pool3 features [B, 2048] float32, or (features, logits [B, 1008])
    when with_logits (initialise with with_logits=True to create the classifier's parameters).
    """

    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array, with_logits: bool = False) -> Array | tuple[Array, Array]:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        partial = functools.partial
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        for name, block in (
            ("Mixed_5b", partial(InceptionA, 32)),
            ("Mixed_5c", partial(InceptionA, 64)),
            ("Mixed_5d", partial(InceptionA, 64)),
            ("Mixed_6a", InceptionB),
            ("Mixed_6b", partial(InceptionC, 128)),
            ("Mixed_6c", partial(InceptionC, 160)),
            ("Mixed_6d", partial(InceptionC, 160)),
            ("Mixed_6e", partial(InceptionC, 192)),
            ("Mixed_7a", InceptionD),
            ("Mixed_7b", partial(InceptionE, "avg")),
            ("Mixed_7c", partial(InceptionE, "max")),
        ):
            x = block(precision=self.precision, name=name)(x)
        features = jnp.mean(x, axis=(1, 2))
        if not with_logits:
            return features
        logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(features)
        return features, logits


def preprocess(images: Array, size: int = INPUT_SIZE) -> Array:
    """Images [B, H, W, C] in [-1, 1], C in {1, 3} -> [B, size, size, 3] float32 in [-1, 1].

    Bilinear resize with half-pixel centres and no antialiasing (PyTorch's
    `interpolate(mode="bilinear", align_corners=False)`, which pytorch-fid uses); grayscale is
    repeated to three channels.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"images must be [B, H, W, C] with C in {{1, 3}} (float in [-1, 1]); got shape "
            f"{images.shape}."
        )
    images = jnp.asarray(images, jnp.float32)
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    shape = (images.shape[0], size, size, 3)
    return jax.image.resize(images, shape, method="bilinear", antialias=False)


def abstract_variables() -> Variables:
    """The variables' shapes and dtypes (jax.ShapeDtypeStruct leaves), computed without FLOPs."""
    x = jax.ShapeDtypeStruct((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(
        functools.partial(InceptionV3().init, with_logits=True), jax.random.key(0), x
    )


def random_variables(key: Array) -> Variables:
    """Random variables of the right tree, as numpy arrays (for tests; real: `load_variables`).

    Kernels ~ N(0, 2 / fan_in) (He), so activations keep their scale through the ReLUs; batch
    norm is the identity (scale 1, bias 0, mean 0, var 1). Drawn as one flat vector and sliced:
    Flax's own initialisers draw rank-4 kernels, which take tens of seconds to compile on CPU.
    """
    abstract = abstract_variables()
    leaves, treedef = jax.tree.flatten(abstract)
    kernels = [leaf for leaf in leaves if leaf.ndim >= 2]
    flat = np.asarray(jax.random.normal(key, (sum(leaf.size for leaf in kernels),), jnp.float32))
    values, offset = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if leaf.ndim >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            draw = flat[offset : offset + leaf.size].reshape(leaf.shape)
            values.append(draw * np.float32(np.sqrt(2.0 / fan_in)))
            offset += leaf.size
        else:
            fill = 1.0 if path[-1].key in ("scale", "var") else 0.0
            values.append(np.full(leaf.shape, fill, np.float32))
    return jax.tree.unflatten(treedef, values)


def feature_fn(
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> Callable[[Variables, Array], Array]:
    """A jitted `features(variables, images) -> [B, 2048] float32` (pool3, FID's features).

    images: [B, H, W, C] float32 in [-1, 1], C in {1, 3}, any H, W: resized to 299 x 299.
    """
    model = InceptionV3(precision=precision)

    @jax.jit
    def features(variables: Variables, images: Array) -> Array:
        return model.apply(variables, preprocess(images))

    return features


# ---------------------------------------------------------------------------------------------
# State-dict names <-> the Flax variable tree.
# ---------------------------------------------------------------------------------------------

_BN_TORCH_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _flax_location(name: str) -> tuple[str, tuple[str, ...], bool]:
    """state_dict name -> (collection, path in it, whether the tensor is a transposed kernel)."""
    *modules, layer, tensor = name.split(".")
    if not modules and layer == "fc":
        return "params", ("fc", "kernel" if tensor == "weight" else "bias"), tensor == "weight"
    if layer == "conv" and tensor == "weight":
        return "params", (*modules, "conv", "kernel"), True
    if layer == "bn" and tensor in _BN_TORCH_TO_FLAX:
        collection, leaf = _BN_TORCH_TO_FLAX[tensor]
        return collection, (*modules, "bn", leaf), False
    raise KeyError(name)


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    *modules, layer, leaf = path
    if not modules and layer == "fc":
        return f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
    if layer == "conv":
        return ".".join((*modules, "conv", "weight"))
    tensor = {v: k for k, v in _BN_TORCH_TO_FLAX.items()}[(collection, leaf)]
    return ".".join((*modules, "bn", tensor))


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax kernel [kh, kw, I, O] -> torch [O, I, kh, kw]; dense [I, O] -> [O, I]."""
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T


def _leaves(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
    leaves = {}
    for collection, tree in variables.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaves[(collection, tuple(k.key for k in path))] = leaf
    return leaves


@functools.cache
def _expected_state_dict_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes = []
    for (collection, path), leaf in _leaves(abstract_variables()).items():
        shape = tuple(leaf.shape)
        torch_shape = (*shape[::-1][:2], *shape[:2]) if len(shape) == 4 else shape[::-1]
        shapes.append((_torch_name(collection, path), torch_shape))
    return tuple(shapes)


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state_dict's names and torch-layout shapes (num_batches_tracked omitted).

    Derived from the Flax network itself, so it is the layout `variables_from_state_dict`
    accepts.
    """
    return dict(_expected_state_dict_shapes())


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `variables_from_state_dict`: torch names and layouts, float32 numpy."""
    state_dict = {}
    for (collection, path), leaf in _leaves(variables).items():
        array = np.asarray(leaf, np.float32)
        transposed = path[-1] == "kernel"
        state_dict[_torch_name(collection, path)] = _to_torch_layout(array) if transposed else array
    return state_dict


def variables_from_state_dict(state_dict: Mapping[str, Any]) -> Variables:
    """Maps a pytorch-fid state_dict (name -> array in torch layout) onto the Flax variables.

    Strict: every expected tensor must be present with its exact shape, and no other tensor may
    be (BatchNorm's num_batches_tracked counters are allowed and ignored).

    Returns:
      {"params": ..., "batch_stats": ...} of float32 numpy arrays, for `InceptionV3.apply`.

    Raises:
      ValueError: listing missing, unexpected and misshaped tensors.
    """
    expected = expected_state_dict_shapes()
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(
        f"{k}: {tuple(np.shape(given[k]))} (expected {expected[k]})"
        for k in set(expected) & set(given)
        if tuple(np.shape(given[k])) != expected[k]
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            "not the FID Inception state_dict (pytorch-fid's "
            f"{FID_WEIGHTS_FILENAME} layout): {len(missing)} missing tensors "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(misshaped)} "
            f"with the wrong shape {misshaped[:5]}."
        )
    variables: Variables = {"params": {}, "batch_stats": {}}
    for name, value in given.items():
        collection, path, transposed = _flax_location(name)
        array = np.asarray(value, np.float32)
        node = variables[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _to_flax_layout(array) if transposed else array
    return variables


# ---------------------------------------------------------------------------------------------
# Weights files.
# ---------------------------------------------------------------------------------------------


def _missing_message(path: str) -> str:
    return (
        f"Inception weights file {path!r} does not exist. apd downloads nothing: get "
        f"{FID_WEIGHTS_FILENAME} (pytorch-fid's FID Inception weights, SHA-256 starting "
        f"{FID_WEIGHTS_SHA256_PREFIX}) from {FID_WEIGHTS_URL} on a machine with internet access, "
        f"copy it here and pass its path with {WEIGHTS_FLAG}=PATH. Without torch, convert it "
        "first where torch is installed: python -m apd.evaluation.inception convert IN.pth "
        "OUT.npz, and pass the .npz."
    )


_CONVERT_HINT = (
    f"python -m apd.evaluation.inception convert IN.pth OUT.npz, and pass the .npz with "
    f"{WEIGHTS_FLAG}."
)
_EXPECTED = (
    f"pytorch-fid's {FID_WEIGHTS_FILENAME} or the .npz that `python -m apd.evaluation.inception "
    "convert IN.pth OUT.npz` writes"
)
_SOURCE = "inception"


def load_state_dict(path: str, expected_sha256: str | None = FID_WEIGHTS_SHA256_PREFIX) -> dict:
    """Reads a weights file (.pth or converted .npz) into name -> float32 numpy array.

    Args:
      path: the local file.
      expected_sha256: a hex SHA-256 or prefix (>= 8 digits) that the original .pth must have:
        the .pth's own hash, or for an .npz the source hash recorded by `convert`. None skips
        that check (custom or test weights; a warning is logged). An .npz's content hash is
        always checked.

    Raises:
      FileNotFoundError: naming the file, where to get it and the flag that takes it.
      ValueError: for a wrong hash, an unknown extension or a corrupt .npz.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    if expected_sha256 is None:
        logging.warning("Loading Inception weights %s without checking their hash.", path)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".pth":
        if expected_sha256 is not None:
            integrity.check_sha256(path, expected_sha256, "Inception weights")
        arrays = torch_weights.read_pth(path, _CONVERT_HINT, _EXPECTED)
    elif extension == ".npz":
        arrays, sources = torch_weights.read_npz(path, _EXPECTED)
        torch_weights.check_source(path, sources, _SOURCE, expected_sha256)
    else:
        raise ValueError(
            f"Inception weights {path!r} have an unknown extension; expected {_EXPECTED}."
        )
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def load_variables(path: str, expected_sha256: str | None = FID_WEIGHTS_SHA256_PREFIX) -> Variables:
    """Loads and checks a weights file (see `load_state_dict`) into `InceptionV3` variables."""
    return variables_from_state_dict(load_state_dict(path, expected_sha256))


def write_npz(state_dict: Mapping[str, Any], npz_path: str, source_sha256: str) -> None:
    """Writes a state_dict as the .npz `load_state_dict` reads, recording its source's SHA-256.

    The .npz holds the tensors (float32, torch layout, same names, num_batches_tracked counters
    dropped), `source_sha256` and a hash of the arrays. Names and shapes are checked first.
    """
    arrays = {
        k: np.asarray(v, np.float32)
        for k, v in state_dict.items()
        if not k.endswith(_IGNORED_SUFFIX)
    }
    variables_from_state_dict(arrays)
    torch_weights.write_npz(npz_path, arrays, {_SOURCE: source_sha256.lower()})


def convert(
    pth_path: str, npz_path: str, expected_sha256: str | None = FID_WEIGHTS_SHA256_PREFIX
) -> str:
    """Converts the pytorch-fid .pth to an .npz that loads without torch; returns the .pth's hash.

    Args:
      pth_path: the .pth file (needs torch to read).
      npz_path: the .npz to write.
      expected_sha256: hash or prefix the .pth must have; None skips the check (custom weights).
    """
    if not os.path.isfile(pth_path):
        raise FileNotFoundError(_missing_message(pth_path))
    source = (
        integrity.check_sha256(pth_path, expected_sha256, "Inception weights")
        if expected_sha256 is not None
        else integrity.sha256_file(pth_path)
    )
    write_npz(
        torch_weights.read_pth(pth_path, _CONVERT_HINT, f"pytorch-fid's {FID_WEIGHTS_FILENAME}"),
        npz_path,
        source,
    )
    logging.info("Converted %s (SHA-256 %s) to %s.", pth_path, source, npz_path)
    return source


# ---------------------------------------------------------------------------------------------
# Command line: python -m apd.evaluation.inception convert IN.pth OUT.npz
# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[1] != "convert":
        raise app.UsageError("usage: python -m apd.evaluation.inception convert IN.pth OUT.npz")
    convert(argv[2], argv[3], flags.FLAGS.expected_sha256 or None)


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flag to other binaries.
    flags.DEFINE_string(
        "expected_sha256",
        FID_WEIGHTS_SHA256_PREFIX,
        "SHA-256 (or prefix of at least 8 hex digits) the .pth must have; empty: do not check.",
    )
    app.run(main)
