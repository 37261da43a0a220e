"""Trains (once) the feature network behind FID_FMNIST, and caches the test split's statistics.

    python -m apd.features --dataset=fashion_mnist --out=DIR [--steps=N] [--path=DATA_DIR]

DIR then holds `params.npz` and `features.json` (test accuracy, steps, the params' SHA-256; see
`apd.evaluation.features`) and `reference/` with the feature statistics of the test split, keyed
by the network's hash. Run again with the same --out, it reuses the stored network after checking
its hash (a modified params.npz is refused, not silently retrained) and the cached statistics.
About three minutes on two CPU cores for the default 3000 steps; test accuracy above 90%.
A user error ends with one line `apd.features: error: ...` and exit code 1 (--verbose: traceback).
"""

import jax
from absl import app, flags, logging

from apd import cli
from apd.data import fashion_mnist
from apd.evaluation import features

_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", features.DATASETS, "Dataset.")
_OUT = flags.DEFINE_string("out", None, "Directory for the feature network and its statistics.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps (when no network is stored yet).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Training batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam's peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation and the data order.")
_PATH = flags.DEFINE_string(
    "path", fashion_mnist.DEFAULT_PATH, "Directory of the Fashion-MNIST IDX files."
)
_MIN_ACCURACY = 0.9


def train_or_load(
    out: str,
    dataset: str,
    path: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> dict:
    """The stored network's record if OUT has one (hash-checked), else trains and stores one."""
    if features.exists(out):
        _, record = features.load(out)
        if record["dataset"] != dataset:
            raise ValueError(
                f"{out} holds a feature network for {record['dataset']!r}, not {dataset!r}."
            )
        logging.info("Reusing the feature network in %s: %s", out, record)
        return record
    train_images, train_labels = fashion_mnist.load("train", path)
    test_images, test_labels = fashion_mnist.load("test", path)
    params = features.train(
        jax.random.key(seed), train_images, train_labels, steps, batch_size, learning_rate
    )
    accuracy = features.accuracy(params, test_images, test_labels)
    record = features.save(
        out,
        params,
        {
            "dataset": dataset,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "num_train": int(train_images.shape[0]),
            "test_accuracy": accuracy,
        },
    )
    logging.info("Trained the feature network: test accuracy %.4f; stored in %s", accuracy, out)
    if accuracy < _MIN_ACCURACY:
        logging.warning(
            "Test accuracy %.4f is below %.2f: features of a weak classifier make FID_FMNIST "
            "less sensitive; train longer (--steps) with a fresh --out.",
            accuracy,
            _MIN_ACCURACY,
        )
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    record = train_or_load(
        _OUT.value,
        _DATASET.value,
        _PATH.value,
        _STEPS.value,
        _BATCH_SIZE.value,
        _LEARNING_RATE.value,
        _SEED.value,
    )
    stats = features.reference_statistics(_OUT.value, "test", _PATH.value)
    logging.info(
        "Feature network %s (test accuracy %.4f); test-split statistics over %d images.",
        record["params_sha256"][:16],
        record["test_accuracy"],
        stats.count,
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    cli.run(main, "apd.features")
