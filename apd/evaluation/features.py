"""A small Fashion-MNIST classifier whose penultimate layer gives FID-like scores (FID_FMNIST).

Inception is the wrong tool for 28x28 grayscale clothes: upsampled 10x and repeated to RGB they
are far from its training images. apd instead trains this CNN on the dataset's own training split
and fits Gaussians to its 128-d feature layer:

    conv 5x5 stride 2, 32 -> ReLU -> conv 5x5 stride 2, 64 -> ReLU (7 x 7 x 64)
      -> dense 128 (the features) -> ReLU -> dense 10 (logits)

Strided convolutions rather than max pooling: on CPU, XLA's max-pool gradient made a training
step ~5x slower. 3000 Adam steps at batch 128 (about three minutes on two CPU cores) reach about
91% test accuracy.

The features are the 128-d layer's pre-activations: unlike the ReLU outputs they have no
coordinates stuck at zero, so their covariance stays full-rank.

Stored in a directory as `params.npz` (the parameter tree flattened to "Module/param" names) and
`features.json` (the dataset, the training settings, the test accuracy and the SHA-256 of
params.npz); `load` refuses params whose hash differs from the record. `python -m apd.features`
trains it once and reuses it afterwards.

Images everywhere: [B, 28, 28, 1] float32 in [-1, 1] (apd's pixel convention).
"""

import os
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from apd.data import fashion_mnist, transforms
from apd.evaluation import integrity, reference

Array = jax.Array
Params = dict[str, Any]

FEATURE_DIM = 128
PARAMS_FILE = "params.npz"
RECORD_FILE = "features.json"
REFERENCE_DIR = "reference"
DATASETS = ("fashion_mnist",)


class FeatureNet(nn.Module):
    """The classifier: images [B, 28, 28, 1] in [-1, 1] -> (features [B, 128], logits [B, 10])."""

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, Array]:
        x = nn.relu(nn.Conv(32, (5, 5), strides=2)(images))
        x = nn.relu(nn.Conv(64, (5, 5), strides=2)(x))
        features = nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1))
        logits = nn.Dense(fashion_mnist.NUM_CLASSES)(nn.relu(features))
        return features, logits


def init_params(key: Array) -> Params:
    """Fresh parameters (Flax default initialisers)."""
    return FeatureNet().init(key, jnp.zeros((1, *fashion_mnist.IMAGE_SHAPE), jnp.float32))["params"]


@jax.jit
def features(params: Params, images: Array) -> Array:
    """images [B, 28, 28, 1] float32 in [-1, 1] -> features [B, 128] float32."""
    return FeatureNet().apply({"params": params}, images)[0]


@jax.jit
def logits(params: Params, images: Array) -> Array:
    """images [B, 28, 28, 1] float32 in [-1, 1] -> class logits [B, 10] float32."""
    return FeatureNet().apply({"params": params}, images)[1]


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------


def _make_step(optimizer: optax.GradientTransformation) -> Callable:
    def loss_fn(params, images, labels):
        _, out = FeatureNet().apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    @jax.jit
    def step(params, opt_state, train_images, train_labels, index):
        images = _to_float(train_images[index])
        loss, grads = jax.value_and_grad(loss_fn)(params, images, train_labels[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _to_float(images: Array) -> Array:
    """uint8 -> float32 in [-1, 1] on device (as `apd.data.transforms.to_float` on the host)."""
    return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def train(
    key: Array,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
) -> Params:
    """Trains the classifier with Adam and cross-entropy, reshuffling the data every epoch.

    Args:
      key: PRNG key for the initialisation and the data order.
      images: [N, 28, 28, 1] uint8 training images.
      labels: [N] int labels in [0, 9].
      steps: number of Adam steps, >= 1.
      batch_size: examples per step, in [1, N].
      learning_rate: Adam's step size (cosine-decayed to 0 over `steps`).

    Returns:
      The trained parameters.
    """
    if images.dtype != np.uint8 or images.shape[1:] != fashion_mnist.IMAGE_SHAPE:
        raise ValueError(
            f"training images must be uint8 [N, 28, 28, 1]; got {images.dtype} {images.shape}."
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels {labels.shape} must be [N] for images {images.shape}.")
    num = images.shape[0]
    if steps < 1 or not 1 <= batch_size <= num:
        raise ValueError(
            f"need steps >= 1 and 1 <= batch_size <= {num} (the training set size); got "
            f"steps={steps!r}, batch_size={batch_size!r}."
        )
    init_key, order_key = jax.random.split(key)
    params = init_params(init_key)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimizer.init(params)
    step_fn = _make_step(optimizer)
    train_images, train_labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    per_epoch = num // batch_size
    order = None
    for step in range(steps):
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            order = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, epoch), num))
        index = order[position * batch_size : (position + 1) * batch_size]
        params, opt_state, loss = step_fn(params, opt_state, train_images, train_labels, index)
        if (step + 1) % 500 == 0 or step + 1 == steps:
            logging.info("feature network step %d/%d: loss %.4f", step + 1, steps, float(loss))
    return params


def _batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, images.shape[0], batch_size):
        yield transforms.to_float(images[start : start + batch_size])


def accuracy(
    params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000
) -> float:
    """Top-1 accuracy on uint8 images [N, 28, 28, 1] with labels [N]."""
    predictions = np.concatenate(
        [
            np.asarray(jnp.argmax(logits(params, batch), -1))
            for batch in _batches(images, batch_size)
        ]
    )
    return float(np.mean(predictions == labels))


def statistics(params: Params, images: np.ndarray, batch_size: int = 1000) -> reference.Stats:
    """Feature statistics (mean, covariance, count) of uint8 images [N, 28, 28, 1]."""
    return reference.accumulate(
        lambda batch: features(params, batch), _batches(images, batch_size), FEATURE_DIM
    )


# ---------------------------------------------------------------------------------------------
# Files: params.npz + features.json, hash-checked.
# ---------------------------------------------------------------------------------------------


def _flatten(params: Params) -> dict[str, np.ndarray]:
    return {
        "/".join(k.key for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _unflatten(arrays: dict[str, np.ndarray]) -> Params:
    params: Params = {}
    for name, array in arrays.items():
        node = params
        *modules, leaf = name.split("/")
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = array
    return params


def save(directory: str, params: Params, record: dict[str, Any]) -> dict[str, Any]:
    """Writes params.npz and features.json (the record plus the params' SHA-256); returns it."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PARAMS_FILE)
    with open(f"{path}.tmp", "wb") as f:
        np.savez(f, **_flatten(params))
    os.replace(f"{path}.tmp", path)
    record = {
        **record,
        "params_file": PARAMS_FILE,
        "params_sha256": integrity.sha256_file(path),
        "feature_dim": FEATURE_DIM,
        "feature_layer": "pre-activation of the 128-d dense layer",
    }
    integrity.write_json(os.path.join(directory, RECORD_FILE), record)
    return record


def exists(directory: str) -> bool:
    """Whether `directory` holds a feature network record (it may still fail `load`'s checks)."""
    return os.path.isfile(os.path.join(directory, RECORD_FILE))


def load(directory: str) -> tuple[Params, dict[str, Any]]:
    """Reads a stored feature network, checking params.npz against its recorded SHA-256.

    Returns:
      (params, record): the record is features.json (dataset, steps, test_accuracy,
      params_sha256, ...).

    Raises:
      FileNotFoundError: if the directory holds no feature network (train one with
        `python -m apd.features --dataset=fashion_mnist --out=DIR`).
      ValueError: if params.npz does not match the recorded hash or the parameter shapes.
    """
    record_path = os.path.join(directory, RECORD_FILE)
    params_path = os.path.join(directory, PARAMS_FILE)
    if not (os.path.isfile(record_path) and os.path.isfile(params_path)):
        raise FileNotFoundError(
            f"no feature network in {directory!r} (expected {RECORD_FILE} and {PARAMS_FILE}); "
            f"train one with: python -m apd.features --dataset=fashion_mnist --out={directory}"
        )
    record = integrity.read_json(record_path)
    integrity.check_sha256(params_path, record["params_sha256"], "feature network parameters")
    with np.load(params_path, allow_pickle=False) as f:
        params = _unflatten({k: f[k] for k in f.files})
    expected = jax.eval_shape(init_params, jax.random.key(0))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(
        got
    ) != jax.tree.leaves(expected):
        raise ValueError(f"{params_path!r} does not hold FeatureNet parameters.")
    return params, record


def reference_statistics(
    directory: str, split: str = "test", data_path: str = fashion_mnist.DEFAULT_PATH
) -> reference.Stats:
    """Feature statistics of a Fashion-MNIST split, cached under DIRECTORY/reference.

    The cache is keyed by dataset, split and the feature network's SHA-256, so retraining the
    network never reuses stale statistics.
    """
    params, record = load(directory)
    return reference.load_or_compute(
        os.path.join(directory, REFERENCE_DIR),
        dataset="fashion_mnist",
        split=split,
        network_sha256=record["params_sha256"],
        compute=lambda: statistics(params, fashion_mnist.load(split, data_path)[0]),
    )
