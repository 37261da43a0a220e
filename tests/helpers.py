"""Shared test fixtures' building blocks: a tiny fake Fashion-MNIST written as IDX files, config
values set by dotted key, and a binary's `main` run in-process the way `apd.cli` runs it."""

import contextlib
import gzip
import importlib.metadata
import io
import os
import struct

import numpy as np


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array in the IDX format, gzip-compressed."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(directory: str, num_train: int = 256, num_test: int = 64) -> str:
    """Random 28x28 images with a class-dependent mean, in the Debian package's file layout."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 64, (n, 28, 28)) + labels[:, None, None] * 19
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return directory


def set_values(config, **values):
    """Sets config values by dotted key (`set_values(config, **{"data.path": p})`); returns
    `config`."""
    for key, value in values.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def call_main(call) -> None:
    """Runs `call()` (a binary's `main` wrapped by `apd.cli.call`, returning its exit code) with
    stderr captured; a non-zero exit raises SystemExit with what the binary printed on stderr (its
    one-line error), as the binary itself would end."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = call()
    if code:
        raise SystemExit(err.getvalue().strip() or code)


def installed(distribution: str) -> bool:
    """Whether the Python distribution (a PyPI name) is installed."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
