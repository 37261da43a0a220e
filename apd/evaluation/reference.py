"""Reference feature statistics of a dataset split, computed once and cached on disk.

A cache entry is `DATASET-SPLIT-NETWORK16.npz` (mean, covariance and count, float64, and the
features of the split's first `KID_FEATURES` examples, float32, for KID) with a JSON
record beside it, `DATASET-SPLIT-NETWORK16.json`, that names the dataset, the split, the full
SHA-256 of the feature network that produced it and the SHA-256 of the .npz. The key includes
the network's hash, so statistics are never reused across feature networks; a file whose hash
no longer matches its record is refused (delete it to recompute).
"""

import dataclasses
import os
import re
from collections.abc import Callable, Iterable

import numpy as np
from absl import logging

from apd.evaluation import frechet, integrity

KID_FEATURES = 5000
"""Reference features kept for KID: the first this many of the split (in its fixed order)."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Gaussian statistics of N feature vectors: mean [D], unbiased covariance [D, D] (float64),
    and the first min(N, keep) feature vectors themselves (float32 [n, D]; None in an entry
    written before features were kept)."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int
    features: np.ndarray | None = None


def accumulate(
    embed: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[np.ndarray],
    dim: int,
    keep: int = KID_FEATURES,
) -> Stats:
    """Streams batches through a feature function into `Stats`, one batch in memory at a time.

    Args:
      embed: batch -> features [N, dim] (e.g. a jitted network; device arrays are fine).
      batches: inputs that `embed` takes, e.g. images [N, H, W, C].
      dim: the feature dimension D.
      keep: how many of the first feature vectors to keep (for KID); 0 keeps none.
    """
    running = frechet.RunningStats(dim)
    kept: list[np.ndarray] = []
    num_kept = 0
    for batch in batches:
        features = np.asarray(embed(batch))
        running.update(features)
        if num_kept < keep:
            kept.append(np.asarray(features[: keep - num_kept], np.float32))
            num_kept += kept[-1].shape[0]
    features = np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)
    return Stats(running.mean, running.covariance, running.count, features)


_NAME_PART = re.compile(r"^[A-Za-z0-9_.]+$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


def cache_paths(cache_dir: str, dataset: str, split: str, network_sha256: str) -> tuple[str, str]:
    """(statistics .npz, record .json) paths of a cache entry."""
    for what, value in (("dataset", dataset), ("split", split)):
        if not _NAME_PART.match(value):
            raise ValueError(
                f"{what} {value!r} cannot name a cache file; use letters, digits, '_' and '.'."
            )
    if not _HASH.match(network_sha256):
        raise ValueError(
            f"network_sha256 must be a full lower-case hex SHA-256 (64 digits); got "
            f"{network_sha256!r}."
        )
    stem = os.path.join(cache_dir, f"{dataset}-{split}-{network_sha256[:16]}")
    return f"{stem}.npz", f"{stem}.json"


def save(cache_dir: str, dataset: str, split: str, network_sha256: str, stats: Stats) -> str:
    """Writes a cache entry; returns the .npz path."""
    stats_path, record_path = cache_paths(cache_dir, dataset, split, network_sha256)
    os.makedirs(cache_dir, exist_ok=True)
    with open(f"{stats_path}.tmp", "wb") as f:
        arrays = {"mean": stats.mean, "covariance": stats.covariance}
        if stats.features is not None:
            arrays["features"] = np.asarray(stats.features, np.float32)
        np.savez(f, count=np.int64(stats.count), **arrays)
    os.replace(f"{stats_path}.tmp", stats_path)
    integrity.write_json(
        record_path,
        {
            "dataset": dataset,
            "split": split,
            "network_sha256": network_sha256,
            "count": int(stats.count),
            "feature_dim": int(stats.mean.shape[0]),
            "stats_file": os.path.basename(stats_path),
            "stats_sha256": integrity.sha256_file(stats_path),
        },
    )
    return stats_path


def load(cache_dir: str, dataset: str, split: str, network_sha256: str) -> Stats | None:
    """The cached statistics, or None if there is no entry.

    Raises:
      ValueError: if the entry's record names another dataset, split or network, or the .npz's
        SHA-256 differs from the record (corrupt or modified: delete both files to recompute).
    """
    stats_path, record_path = cache_paths(cache_dir, dataset, split, network_sha256)
    if not (os.path.isfile(stats_path) and os.path.isfile(record_path)):
        return None
    record = integrity.read_json(record_path)
    key = {"dataset": dataset, "split": split, "network_sha256": network_sha256}
    recorded = {k: record.get(k) for k in key}
    if recorded != key:
        raise ValueError(
            f"reference statistics record {record_path!r} is for {recorded}, not {key}; "
            "delete it and its .npz to recompute."
        )
    try:
        integrity.check_sha256(stats_path, record["stats_sha256"], "reference statistics")
    except ValueError as e:
        raise ValueError(f"{e} Delete {stats_path!r} and {record_path!r} to recompute.") from e
    with np.load(stats_path, allow_pickle=False) as f:
        features = f["features"] if "features" in f.files else None
        return Stats(f["mean"], f["covariance"], int(f["count"]), features)


def load_or_compute(
    cache_dir: str,
    dataset: str,
    split: str,
    network_sha256: str,
    compute: Callable[[], Stats],
) -> Stats:
    """The cached statistics if present (hash-checked), else `compute()`, saved to the cache.

    An entry written before reference features were kept (no KID) is recomputed and replaced."""
    cached = load(cache_dir, dataset, split, network_sha256)
    if cached is not None and cached.features is None:
        logging.info(
            "Reference statistics of %s/%s hold no features for KID: recomputing them.",
            dataset,
            split,
        )
        cached = None
    if cached is not None:
        logging.info(
            "Reusing reference statistics of %s/%s (%d examples).", dataset, split, cached.count
        )
        return cached
    stats = compute()
    path = save(cache_dir, dataset, split, network_sha256, stats)
    logging.info(
        "Computed reference statistics of %s/%s (%d examples): %s",
        dataset,
        split,
        stats.count,
        path,
    )
    return stats
