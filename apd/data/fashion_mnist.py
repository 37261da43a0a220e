"""Fashion-MNIST from IDX files, as installed by the Debian package `dataset-fashion-mnist`.

The IDX format (LeCun's MNIST format): a 4-byte big-endian magic number, two zero bytes then a
dtype code then the number of dimensions; one big-endian uint32 per dimension; then the values in
C order, big-endian. Files may be gzip-compressed (detected from their first bytes, not the name).
"""

import gzip
import os
import zlib

import numpy as np

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)

_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}

# IDX dtype codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"corrupt or truncated gzip file {path!r}: {e}") from e


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (raw or gzip-compressed) into a native-endian numpy array.

    Args:
      path: the IDX file, e.g. `.../train-images-idx3-ubyte.gz`.

    Returns:
      An array with the dimensions and dtype the file's header declares (uint8 for image and
      label files).

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if the header is not an IDX header, or the data is shorter or longer than the
        header's dimensions say (a truncated or corrupt file).
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path!r} is not an IDX file: only {len(data)} bytes, no 4-byte header.")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path!r} is not an IDX file: bad magic number 0x{data[:4].hex()}; expected "
            f"0x0000TTNN with dtype code TT in {sorted(hex(c) for c in _IDX_DTYPES)} and NN >= 1 "
            f"dimensions (e.g. 0x00000803 for images, 0x00000801 for labels)."
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"truncated IDX file {path!r}: {len(data)} bytes, but its header declares {ndim} "
            f"dimensions ({header_size} header bytes)."
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header_size + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "corrupt"
        raise ValueError(
            f"{kind} IDX file {path!r}: {len(data)} bytes, but its header declares dimensions "
            f"{dims} of {dtype.name} ({expected} bytes)."
        )
    array = np.frombuffer(data, dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find(directory: str, stem: str) -> str:
    """The gzip-compressed file if present, else the raw one."""
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"no Fashion-MNIST file {stem}[.gz] in {directory!r}. Install the Debian package "
        "(sudo apt-get install dataset-fashion-mnist) or point the path at a directory holding "
        "the four IDX files."
    )


def load(split: str, path: str = DEFAULT_PATH) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of Fashion-MNIST from its IDX files.

    Args:
      split: "train" (60000 examples, files `train-*`) or "test" (10000, files `t10k-*`).
      path: the directory holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

    Returns:
      images: [N, 28, 28, 1] uint8 in [0, 255].
      labels: [N] int32 in [0, 9].

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: for an unknown split, or files that are corrupt, truncated or do not match.
    """
    if split not in _SPLIT_PREFIXES:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(_SPLIT_PREFIXES)}."
        )
    prefix = _SPLIT_PREFIXES[split]
    images_path = _find(path, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(path, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE[:2]:
        raise ValueError(
            f"{images_path!r} holds {images.dtype} of shape {images.shape}; expected uint8 of "
            f"shape [N, 28, 28]."
        )
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{labels_path!r} holds {labels.dtype} of shape {labels.shape}; expected uint8 of "
            f"shape [{images.shape[0]}] (one label per image in {images_path!r})."
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(
            f"{labels_path!r} has label {int(labels.max())}; expected labels in "
            f"[0, {NUM_CLASSES - 1}]."
        )
    return images[..., None], labels.astype(np.int32)
