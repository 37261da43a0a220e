"""grain pipelines: a resumable, sharded training stream and a one-pass evaluation set.

Training (`make_dataset`) reads one global stream of records: the source, shuffled with a new
permutation each epoch, repeated, optionally flipped and resized, cut into global batches of B.
Process `p` of `k` takes the contiguous block `[p * B / k, (p + 1) * B / k)` of every global batch,
which is exactly where `jax.make_array_from_process_local_data` places its rows: the global batch,
row for row, does not depend on the number of processes (and neither do the per-example level maps
and noise drawn for it). All randomness (shuffle, flips) derives
from `seed` and the stream position, so a stream is reproducible and resumes exactly from its
iterator state, inside an Orbax checkpoint or alone.

Evaluation (`make_eval_dataset`) reads the first examples of a source once, in order, padded with
masked zero records to whole global batches, so every process runs the same number of batches of
the same shape (a requirement of jitted multi-process evaluation).
"""

import functools
import math

import grain
import jax
import numpy as np

from apd.data import transforms
from apd.data.sources import Source, get_source

# In-process reading: on 2 CPU cores threads beat worker processes for small images.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _process_shard(
    process_index: int | None, process_count: int | None, global_batch_size: int
) -> tuple[int, int, int]:
    """(process index, process count, per-process batch size), defaulting to this JAX process."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"process_index={index!r}, process_count={count!r}: expected "
            "0 <= process_index < process_count."
        )
    if global_batch_size < 1 or global_batch_size % count:
        raise ValueError(
            f"global_batch_size={global_batch_size!r} must be a positive multiple of "
            f"process_count={count}."
        )
    return index, count, global_batch_size // count


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be None or a positive integer; got {image_size!r}.")


def _resize(record: dict, size: int) -> dict:
    return {**record, "image": transforms.center_crop_resize(record["image"], size)}


def _finish_batch(batch: dict) -> dict:
    """uint8 images -> float32 in [-1, 1], float images (latents) -> float32 unchanged
    (`transforms.to_float`); labels -> int32; other entries unchanged."""
    return {
        **batch,
        "image": transforms.to_float(batch["image"]),
        "label": batch["label"].astype(np.int32),
    }


def make_dataset(
    source: Source,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    image_size: int | None = None,
    random_flip: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """The training stream of this process: an iterator of numpy batches.

    Args:
      source: a random-access source of `{'image': uint8 [H, W, C], 'label': int}` records, or
        of float32 latents (see `apd.data.sources.get_source`).
      global_batch_size: examples per step over all processes; a multiple of process_count.
      seed: the seed of the shuffle and the flips (the same on every process).
      shuffle: draw a new permutation of the source for each epoch.
      num_epochs: passes over the source, or None to repeat indefinitely. A finite stream is cut
        to whole global batches (drop remainder); batches may span epoch boundaries.
      image_size: if set, center crop + resize every image to image_size x image_size (required
        for sources whose images vary in size).
      random_flip: flip each image left-right with probability 1/2, drawn per stream position:
        the record's stored flip where the source stores flips (`stored_flips`, a latent
        dataset), else the image mirrored; refused for a source that cannot be mirrored
        (`mirrorable` False) and stores no flips.
      process_index: this process's index; default `jax.process_index()`.
      process_count: the number of processes; default `jax.process_count()`.
      worker_count: worker processes for reading; 0 reads in this process with threads (faster on
        few cores). Worker processes need absl flags parsed (run under `absl.app.run`).

    Returns:
      A `grain.DatasetIterator` of `{'image': float32 [b, H, W, C] in [-1, 1] (latents: as the
      source holds them), 'label': int32 [b]}` with b = global_batch_size // process_count.
      `get_state()` / `set_state(state)` save and resume the exact stream; see
      `checkpoint_save_args` for Orbax.
    """
    index, _, batch_size = _process_shard(process_index, process_count, global_batch_size)
    _check_image_size(image_size)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(
            f"num_epochs must be None (repeat indefinitely) or >= 1; got {num_epochs}."
        )
    if len(source) < 1:
        raise ValueError(f"the source {source!r} holds no records.")
    stored_flips = getattr(source, "stored_flips", False)
    if random_flip and not (stored_flips or getattr(source, "mirrorable", True)):
        raise ValueError(
            f"random_flip=True needs the flipped images, which {source!r} does not store (its "
            "records cannot be mirrored: latents of a mirrored image are not mirrored latents). "
            "Encode the dataset with config.data.random_flip=True (apd.encode), or set "
            "config.data.random_flip=False."
        )
    records = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        records = records.shuffle()
    records = records.repeat(num_epochs)
    if random_flip:
        records = records.random_map(transforms.random_flip)
    elif stored_flips:
        records = records.map(transforms.drop_flipped)
    if image_size is not None:
        records = records.map(functools.partial(_resize, size=image_size))
    if num_epochs is not None:
        records = records[: len(records) // global_batch_size * global_batch_size]
    block = _ProcessBlock(records, index, batch_size, global_batch_size)
    batches = block.batch(batch_size, drop_remainder=True).map(_finish_batch)
    stream = batches.to_iter_dataset(_READ_OPTIONS)
    if worker_count > 0:
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(stream)


class _ProcessBlock(grain.MapDataset):
    """Process p's records: the block [p * b, (p + 1) * b) of every global batch of B records."""

    def __init__(self, parent: grain.MapDataset, index: int, batch_size: int, global_batch: int):
        super().__init__(parent)
        self._index = index
        self._batch_size = batch_size
        self._global_batch = global_batch

    def __len__(self) -> int:
        return len(self._parent) // self._global_batch * self._batch_size

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        batch, offset = divmod(position, self._batch_size)
        return self._parent[batch * self._global_batch + self._index * self._batch_size + offset]

    def __str__(self) -> str:
        return f"ProcessBlock(index={self._index}, batch_size={self._batch_size})"


class _PaddedRecords:
    """Index -> record of the first `num_examples` of `source` with mask True; beyond, padding."""

    def __init__(self, source: Source, num_examples: int, image_size: int | None):
        self._source = source
        self._num_examples = num_examples
        self._image_size = image_size
        image = self._load(0)["image"]
        self._padding = {"image": np.zeros_like(image), "label": 0, "mask": False}

    def _load(self, index: int) -> dict:
        record = transforms.drop_flipped(self._source[index])
        return record if self._image_size is None else _resize(record, self._image_size)

    def __call__(self, index: int) -> dict:
        if index >= self._num_examples:
            return self._padding
        return {**self._load(index), "mask": True}


def make_eval_dataset(
    source: Source,
    *,
    global_batch_size: int,
    num_examples: int | None = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """One ordered pass over the first `num_examples` records, split over processes.

    The examples (unflipped: a stored flip is dropped) are padded with black images (uint8 0,
    i.e. -1 after scaling; zeros for latents; label 0, mask False) up to a whole number of
    global batches; process p takes positions p, p + k, ... of that
    padded sequence. So every process yields the same number of full-size batches, and masked
    means over all processes count each example exactly once.

    Args:
      source: a random-access source of `{'image': uint8 [H, W, C], 'label': int}` records, or
        of float32 latents.
      global_batch_size: examples per step over all processes; a multiple of process_count.
      num_examples: how many records to evaluate, from the start of the source; default all.
      image_size: if set, center crop + resize every image to image_size x image_size.
      process_index: this process's index; default `jax.process_index()`.
      process_count: the number of processes; default `jax.process_count()`.

    Returns:
      A re-iterable `grain.MapDataset` of `{'image': float32 [b, H, W, C] in [-1, 1] (latents:
      as the source holds them), 'label': int32 [b], 'mask': bool [b]}` with
      b = global_batch_size // process_count; `len()` is the number of batches,
      ceil(num_examples / global_batch_size).
    """
    index, count, batch_size = _process_shard(process_index, process_count, global_batch_size)
    _check_image_size(image_size)
    total = len(source) if num_examples is None else min(num_examples, len(source))
    if total < 1:
        raise ValueError(
            f"nothing to evaluate: num_examples={num_examples!r}, source of {len(source)} records."
        )
    padded = math.ceil(total / global_batch_size) * global_batch_size
    positions = grain.MapDataset.range(padded)[index::count]
    records = positions.map(_PaddedRecords(source, total, image_size))
    return records.batch(batch_size).map(_finish_batch)


def checkpoint_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """The Orbax argument that saves `iterator`'s position, for one entry of `ocp.args.Composite`.

    grain writes one small JSON file per process (`process_<i>-of-<k>.json`), so every process
    saves and restores its own stream position.
    """
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """The Orbax argument that restores a saved position into `iterator` (in place).

    `iterator` must come from `make_dataset` with the same arguments as the saved one.
    """
    return grain.checkpoint.CheckpointRestore(iterator)


def read_images(
    data_cfg, split: str, num: int, at_most: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` images of a split of the dataset `data_cfg` names (`name`, `path`,
    `data_dir`, `image_size`), as the evaluation pipeline reads them: (float32 [n, H, W, C] in
    [-1, 1], labels int32 [n]). n = num, or with at_most=True the split's size if smaller (else
    a split smaller than num is an error)."""
    cfg = data_cfg
    source = get_source(cfg.name, split, data_dir=cfg.data_dir, path=cfg.path)
    if at_most:
        num = min(num, len(source))
    elif len(source) < num:
        raise ValueError(f"{num} images asked of split {split!r}, which holds {len(source)}.")
    batch = make_eval_dataset(
        source,
        global_batch_size=num,
        num_examples=num,
        image_size=cfg.image_size,
        process_index=0,
        process_count=1,
    )[0]
    return np.asarray(batch["image"]), np.asarray(batch["label"])
