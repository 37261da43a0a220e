"""SHA-256 of files, and JSON records that carry them: how evaluation files prove they are intact.

Every file the evaluation reuses (feature-network parameters, cached reference statistics,
converted Inception weights) is written once with a JSON record beside it that holds the file's
SHA-256; a reader recomputes the hash and refuses a file that no longer matches its record.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: str, expected: str, what: str) -> str:
    """Returns the file's SHA-256; ValueError unless it starts with `expected` (a hash or prefix).

    Args:
      path: the file to hash.
      expected: a full hex SHA-256 or a prefix of one (case-insensitive), at least 8 characters.
      what: what the file is, for the error message (e.g. "Inception weights").
    """
    if len(expected) < 8:
        raise ValueError(f"an expected SHA-256 needs at least 8 hex digits; got {expected!r}.")
    actual = sha256_file(path)
    if not actual.startswith(expected.lower()):
        raise ValueError(
            f"{what} {path!r} has SHA-256 {actual}, expected one starting with {expected.lower()}: "
            "the file is corrupt, was modified, or is a different file."
        )
    return actual


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """A hash of named arrays (names, dtypes, shapes and bytes), independent of the file format."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def write_json(path: str, record: dict[str, Any]) -> None:
    """Writes a JSON record atomically (a temporary file renamed over `path`)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any]:
    """Reads a JSON record written by `write_json`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
