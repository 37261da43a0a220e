"""A latent dataset: an image dataset encoded by an autoencoder (`python -m apd.encode`), read
back as the data source `latents` (`get_source('latents', split, path=DIR)`).

Layout of DIR:

    plan.json                                what is being encoded (written first; `apd.latents`)
    SPLIT-IIIII-of-NNNNN.array_record        the records of shard I of the split's N shards
    SPLIT-IIIII-of-NNNNN.json                the shard's done-file (written after the shard)
    latents.json                             the manifest, written once every shard is done

A split's images are cut into shards of `shard_size` consecutive images (records i in
[I * shard_size, (I + 1) * shard_size)), so record i of a split is image i of the dataset's
split and the shards of a split, read in order, are the split in order. Each shard is an
ArrayRecord file (`RECORD_OPTIONS`: one record per chunk, uncompressed, so random access reads
one record) of fixed-size records:

    label     int32, little-endian, 4 bytes
    latents   float16, little-endian, h * w * D values, row-major [h, w, D]
    flipped   (only where the split stores flips) the latents of the image mirrored
              left-right, same layout

The latents are the autoencoder's pre-quantisation latents, not normalised; the source
normalises them with the manifest's per-channel statistics on reading,
(z - shift) / scale, in float32.

`latents.json` (`FORMAT`, `VERSION`) holds: the autoencoder's identity (workdir, step, model,
parameter-shape hash and parameter hash: `apd.latents.Codec.identity`), `latent_shape`
[h, w, D], `factor`, the dataset (`name`, `path`, `image_size`, `image_shape`, `num_classes`),
`normalization` (`shift`, `scale`, float32 [D] as numbers, and `measured`: how they were
measured), `record` (dtype and byte size), `shard_size`, and per split its `records`, `flips`
and `shards` (file names, in order). A directory without it is an encode that did not finish
(it has `plan.json`) or no latent dataset at all; either is refused with a message saying so.

This module knows nothing of models: `apd.latents` encodes and writes, this module reads.
"""

import json
import os
from typing import Any

import grain
import numpy as np

from apd.data import transforms

FORMAT = "apd-latents"
VERSION = 1
MANIFEST = "latents.json"
PLAN = "plan.json"
RECORD_OPTIONS = "group_size:1,uncompressed"
LABEL_DTYPE = np.dtype("<i4")
LATENT_DTYPE = np.dtype("<f2")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def shard_name(split: str, index: int, count: int) -> str:
    """The file name of shard `index` of the split's `count` shards."""
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def done_name(shard: str) -> str:
    """The done-file of a shard: its name with `.json` for `.array_record`."""
    return shard.removesuffix(".array_record") + ".json"


def record_bytes(latent_shape: tuple[int, ...], flips: bool) -> int:
    """The size of one record in bytes (see the module docstring)."""
    values = int(np.prod(latent_shape)) * (2 if flips else 1)
    return LABEL_DTYPE.itemsize + values * LATENT_DTYPE.itemsize


def encode_record(label: int, latents: np.ndarray, flipped: np.ndarray | None = None) -> bytes:
    """One record: int32 label, float16 latents [h, w, D], and the flipped latents if given.

    Raises:
      ValueError: a latent value that float16 cannot hold (|z| > 65504, or not finite).
    """
    parts = [latents] if flipped is None else [latents, flipped]
    for part in parts:
        largest = float(np.max(np.abs(part))) if part.size else 0.0
        if not largest <= FLOAT16_MAX:  # also NaN
            raise ValueError(
                f"a latent value of magnitude {largest!r} does not fit the records' float16 "
                f"(at most {FLOAT16_MAX}): the autoencoder's latents have run away; check its "
                "training."
            )
    data = [np.asarray(label, LABEL_DTYPE).tobytes()]
    data += [np.ascontiguousarray(part, LATENT_DTYPE).tobytes() for part in parts]
    return b"".join(data)


def decode_record(
    data: bytes, latent_shape: tuple[int, ...], flips: bool
) -> tuple[int, np.ndarray, np.ndarray | None]:
    """(label, float16 latents [h, w, D], flipped latents or None) of one record."""
    expected = record_bytes(latent_shape, flips)
    if len(data) != expected:
        raise ValueError(
            f"a latent record of {len(data)} bytes, expected {expected} (latents "
            f"{list(latent_shape)}, flips {flips}): the shard was written in another layout; "
            "re-encode with apd.encode."
        )
    size = int(np.prod(latent_shape))
    label = int(np.frombuffer(data, LABEL_DTYPE, count=1)[0])
    offset = LABEL_DTYPE.itemsize
    latents = np.frombuffer(data, LATENT_DTYPE, count=size, offset=offset)
    flipped = None
    if flips:
        offset += size * LATENT_DTYPE.itemsize
        flipped = np.frombuffer(data, LATENT_DTYPE, count=size, offset=offset)
        flipped = flipped.reshape(latent_shape)
    return label, latents.reshape(latent_shape), flipped


def _not_found(message: str) -> Exception:
    from apd.data.sources import DatasetNotFoundError

    return DatasetNotFoundError(message)


def _rerun_hint(directory: str) -> str:
    command = ""
    path = os.path.join(directory, PLAN)
    try:
        with open(path, encoding="utf-8") as f:
            command = json.load(f).get("command") or ""
    except (OSError, ValueError):
        pass
    return f": {command}" if command else " (--autoencoder, --config, --out, --splits)"


def read_manifest(directory: str | None) -> dict[str, Any]:
    """The manifest (latents.json) of a finished latent dataset.

    Raises:
      ValueError: no directory given, or a manifest of another format or version.
      DatasetNotFoundError: no such directory, an encode that did not finish, or a directory
        that holds no latent dataset.
    """
    if not directory:
        raise ValueError(
            "dataset 'latents' needs path=DIR (config.data.path): the output directory of "
            "python -m apd.encode --autoencoder=AE_WORKDIR --out=DIR."
        )
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise _not_found(
            f"no latent dataset at {directory}: the directory does not exist. Encode one with "
            f"python -m apd.encode --autoencoder=AE_WORKDIR --out={directory}."
        )
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, PLAN)):
            raise _not_found(
                f"the latent dataset in {directory} is incomplete: its encode did not finish "
                f"(no {MANIFEST}). Rerun apd.encode with the same flags to complete it"
                f"{_rerun_hint(directory)}."
            )
        raise _not_found(
            f"{directory} is not a latent dataset: it has no {MANIFEST} (python -m apd.encode "
            "writes one)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-encode with apd.encode.") from e
    found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else ()
    if found != (FORMAT, VERSION):
        raise ValueError(
            f"{path} is not a latent dataset of format {FORMAT!r} version {VERSION} (found "
            f"{found or type(manifest).__name__}); re-encode it with this apd's apd.encode."
        )
    return manifest


def info(directory: str | None, image_size: int | None = None) -> tuple[tuple[int, ...], int]:
    """(latent shape (h, w, D), num_classes) of a finished latent dataset.

    image_size must be None (or the latents' side, for square latents): latents are not resized.
    """
    manifest = read_manifest(directory)
    shape = tuple(int(n) for n in manifest["latent_shape"])
    if image_size is not None and (image_size, image_size) != shape[:2]:
        raise ValueError(
            f"image_size={image_size!r} does not apply to the latent dataset in {directory} "
            f"(latents {list(shape)}, not resized): set config.data.image_size to None."
        )
    return shape, int(manifest["dataset"]["num_classes"])


def splits(directory: str | None) -> tuple[str, ...]:
    """The splits a finished latent dataset holds."""
    return tuple(read_manifest(directory)["splits"])


class LatentSource:
    """The records of one split of a latent dataset, through grain's ArrayRecordDataSource.

    `source[i]` is `{'image': float32 [h, w, D] normalised latents, 'label': int}`, plus
    `transforms.FLIPPED` (the normalised latents of the mirrored image) where the split stores
    flips. `stored_flips` says so; `mirrorable` is False (mirroring latents does not give the
    latents of the mirrored image), so the pipeline's `random_flip` picks the stored flip and is
    refused on a split without one.
    """

    mirrorable = False

    def __init__(self, directory: str, split: str):
        self.directory = os.path.abspath(directory or "")
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise ValueError(
                f"the latent dataset in {self.directory} has no split {split!r}; expected one of "
                f"{sorted(manifest['splits'])} (encode it with apd.encode --splits=...)."
            )
        entry = manifest["splits"][split]
        self.split = split
        self.latent_shape = tuple(int(n) for n in manifest["latent_shape"])
        self.stored_flips = bool(entry["flips"])
        norm = manifest["normalization"]
        self._shift = np.asarray(norm["shift"], np.float32)
        self._scale = np.asarray(norm["scale"], np.float32)
        paths = [os.path.join(self.directory, name) for name in entry["shards"]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise _not_found(
                f"the latent dataset in {self.directory} lacks {len(missing)} shard file(s) of "
                f"split {split!r} (first: {os.path.basename(missing[0])}). Rerun apd.encode with "
                f"the same flags to write them again{_rerun_hint(self.directory)}."
            )
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != int(entry["records"]):
            raise ValueError(
                f"split {split!r} of the latent dataset in {self.directory} holds "
                f"{len(self._records)} records, but {MANIFEST} lists {entry['records']}: a shard "
                "was replaced; re-encode with apd.encode."
            )

    def __len__(self) -> int:
        return len(self._records)

    def _normalise(self, latents: np.ndarray) -> np.ndarray:
        return (latents.astype(np.float32) - self._shift) / self._scale

    def __getitem__(self, index: int) -> dict:
        label, latents, flipped = decode_record(
            self._records[index], self.latent_shape, self.stored_flips
        )
        record = {"image": self._normalise(latents), "label": label}
        if flipped is not None:
            record[transforms.FLIPPED] = self._normalise(flipped)
        return record

    def __repr__(self) -> str:
        return (
            f"LatentSource({self.directory!r}, split={self.split!r}, num_records={len(self)}, "
            f"latent_shape={self.latent_shape}, stored_flips={self.stored_flips})"
        )
