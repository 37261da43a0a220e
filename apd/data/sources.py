"""Where images come from: a registry of random-access sources and what they hold.

A source has `len(source)` and `source[i] -> {'image': uint8 [H, W, C], 'label': int}`, the
protocol grain reads. Nothing is ever downloaded here: TFDS datasets must have been prepared
beforehand with `tfds build NAME --data_dir=DIR --file_format=array_record`, and a missing one
raises `DatasetNotFoundError` before anything heavy is built.

| name           | image shape    | classes | splits             | origin                         |
|----------------|----------------|---------|--------------------|--------------------------------|
| `fashion_mnist`| 28 x 28 x 1    | 10      | train, test        | Debian IDX files, else TFDS    |
| `clipart`      | 64 x 64 x 3    | 22      | train, test        | Debian PNGs (openclipart-png)  |
| `cifar10`      | 32 x 32 x 3    | 10      | train, test        | TFDS                           |
| `imagenet2012` | varies (x 3)   | 1000    | train, validation  | TFDS (manual tarballs)         |
| `lsun/bedroom` | varies (x 3)   | 0       | train, validation  | TFDS                           |
| `latents`      | h x w x D      | encoded | encoded            | `path=DIR` of `apd.encode`     |

Images of varying size need an `image_size` (center crop + resize, done in the pipeline).
`num_classes == 0` means unlabelled: such records carry label 0.

`latents` is an image dataset encoded by an autoencoder (`python -m apd.encode`,
`apd.data.latents`): records `{'image': float32 [h, w, D] normalised pre-quantisation latents,
'label': int}` read through grain's ArrayRecordDataSource; its shape, classes and splits are
those in DIR/latents.json (the encoded dataset's classes and splits), and it takes no
`image_size`. Where the encode stored flips (the train split of a dataset with
`config.data.random_flip`), the pipeline's `random_flip` picks the stored latents of the
mirrored image (mirroring latents is not encoding the mirrored image); without them
`random_flip` is refused. Such sources say so with two optional attributes the pipeline reads:
`stored_flips` (records carry `transforms.FLIPPED`; default False) and `mirrorable` (mirroring
the image gives the flipped record; default True).
"""

import dataclasses
import glob
import os
import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import tensorflow_datasets as tfds

from apd.checks import check_choice
from apd.data import clipart, fashion_mnist


class Source(Protocol):
    """What the pipelines read: `len(source)` records, `source[i]` in any order."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict:
        """Record `index`: `{'image': uint8 [H, W, C], 'label': int}`."""
        ...


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on this machine; the message says how to get it (nothing is downloaded)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    image_shape: tuple[int | None, int | None, int]  # None: the size varies between images.
    num_classes: int  # 0: unlabelled.
    splits: tuple[str, ...]
    prepare_note: str = ""  # Extra steps before `tfds build`; "{data_dir}" is filled in.


_SPECS = {
    "fashion_mnist": _Spec(fashion_mnist.IMAGE_SHAPE, fashion_mnist.NUM_CLASSES, ("train", "test")),
    "clipart": _Spec(clipart.IMAGE_SHAPE, clipart.NUM_CLASSES, clipart.SPLITS),
    "cifar10": _Spec((32, 32, 3), 10, ("train", "test")),
    "imagenet2012": _Spec(
        (None, None, 3),
        1000,
        ("train", "validation"),
        "ImageNet cannot be downloaded automatically: first place ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar in {data_dir}/downloads/manual, then run: ",
    ),
    "lsun/bedroom": _Spec((None, None, 3), 0, ("train", "validation")),
}
LATENTS = "latents"
NAMES = (*_SPECS, LATENTS)

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def dataset_info(
    name: str, image_size: int | None = None, *, path: str | None = None
) -> tuple[tuple[int, int, int], int]:
    """The shape of one image as the pipeline delivers it, and the number of classes.

    Lets a binary build its model before touching any data (for `latents`, only its
    latents.json is read).

    Args:
      name: one of `NAMES`.
      image_size: the `image_size` passed to the pipeline (center crop + resize), or None to keep
        the stored size (only for datasets whose images all have one size; `latents` takes
        None).
      path: the dataset's `path` (config.data.path); needed by `latents` (the directory of
        apd.encode), not read by the others.

    Returns:
      (image_shape (H, W, C), num_classes); num_classes is 0 for unlabelled datasets. For
      `latents`, the latent shape (h, w, D) and the encoded dataset's classes.
    """
    check_choice("dataset", name, NAMES)
    if name == LATENTS:
        from apd.data import latents

        return latents.info(path, image_size)
    spec = _SPECS[name]
    height, width, channels = spec.image_shape
    if image_size is not None:
        return (image_size, image_size, channels), spec.num_classes
    if height is None or width is None:
        raise ValueError(
            f"dataset {name!r} has images of varying size; pass image_size (e.g. 64) to crop and "
            "resize them to a square."
        )
    return (height, width, channels), spec.num_classes


def dataset_splits(name: str, *, path: str | None = None) -> tuple[str, ...]:
    """The splits of a dataset (see the module table); for `latents`, those its latents.json
    lists (path: the directory of apd.encode)."""
    check_choice("dataset", name, NAMES)
    if name == LATENTS:
        from apd.data import latents

        return latents.splits(path)
    return _SPECS[name].splits


class ArraySource:
    """A random-access source over in-memory arrays.

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N].
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, H, W, C]; got {images.dtype} of shape {images.shape}."
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must have shape [N] = {images.shape[:1]}; got shape {labels.shape}."
            )
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self._images[index], "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"ArraySource(num_records={len(self)}, image_shape={self._images.shape[1:]})"


class TfdsSource:
    """Reduces the records of a `tfds.data_source` to `{'image', 'label'}`.

    Args:
      source: a TFDS random-access data source (array_record) with an 'image' feature, uint8
        [H, W, C], and for labelled datasets a 'label' feature.
      labelled: whether records carry a 'label'; if not, every record gets label 0.
    """

    def __init__(self, source: Sequence[dict], labelled: bool):
        self._source = source
        self._labelled = labelled

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        label = int(record["label"]) if self._labelled else 0
        return {"image": np.asarray(record["image"], np.uint8), "label": label}

    def __repr__(self) -> str:
        return f"TfdsSource({self._source!r})"


def default_data_dir() -> str:
    """TFDS's default data directory: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _build_hint(name: str, data_dir: str) -> str:
    note = _SPECS[name].prepare_note.format(data_dir=data_dir)
    return f"{note}tfds build {name} --data_dir={data_dir} --file_format=array_record"


def _prepared_version(name: str, split: str, data_dir: str) -> str:
    """The newest version of `name` prepared in `data_dir` with array_record files for `split`.

    Looks only at the file system (`<data_dir>/<name>/<version>/dataset_info.json` and
    `*-<split>.array_record-*`), so a missing dataset fails fast instead of starting a download.
    """
    dataset_dir = os.path.join(data_dir, *name.split("/"))
    ready, other_format = [], []
    if os.path.isdir(dataset_dir):
        for version in os.listdir(dataset_dir):
            variant = os.path.join(dataset_dir, version)
            if not (_VERSION.match(version) and os.path.isfile(f"{variant}/dataset_info.json")):
                continue
            if glob.glob(os.path.join(glob.escape(variant), f"*-{split}.array_record*")):
                ready.append(version)
            elif glob.glob(os.path.join(glob.escape(variant), f"*-{split}.*")):
                other_format.append(version)
    if ready:
        return max(ready, key=lambda v: tuple(int(p) for p in v.split(".")))
    found = (
        f"found {dataset_dir}/{other_format[0]} in another file format (grain reads array_record)"
        if other_format
        else f"found no {dataset_dir}/<version>/ with dataset_info.json and array_record files"
    )
    raise DatasetNotFoundError(
        f"dataset {name!r} split {split!r} is not prepared in data_dir {data_dir!r}: {found}. "
        f"Prepare it once (this may take long) with: {_build_hint(name, data_dir)}"
    )


def _tfds_source(name: str, split: str, data_dir: str) -> TfdsSource:
    version = _prepared_version(name, split, data_dir)
    source = tfds.data_source(f"{name}:{version}", split=split, data_dir=data_dir, download=False)
    return TfdsSource(source, labelled=_SPECS[name].num_classes > 0)


def get_source(
    name: str, split: str, *, data_dir: str | None = None, path: str | None = None
) -> Source:
    """A random-access source of `{'image': uint8 [H, W, C], 'label': int}` records (`latents`:
    float32 [h, w, D] latents, `apd.data.latents.LatentSource`).

    Args:
      name: one of `NAMES`.
      split: one of the dataset's splits (see the module table).
      data_dir: the TFDS data directory; default `default_data_dir()`.
      path: for `fashion_mnist`, the directory of IDX files; default
        `/usr/share/datasets/fashion-mnist`. If that default directory is missing, a Fashion-MNIST
        prepared by TFDS in `data_dir` is used instead. For `clipart`, the root of the category
        folders; default `/usr/share/openclipart/png` (decoded once into a cache,
        `apd.data.clipart`). For `latents` (required), the output directory of apd.encode.
        Other datasets take no path.

    Raises:
      DatasetNotFoundError: the dataset is not on this machine (for `latents`: no directory, or
        an encode that did not finish); the message names the dataset, the places looked in and
        the command that prepares it.
      ValueError: unknown name or split, `path` given for a TFDS dataset, or a `latents`
        directory of another format.
    """
    check_choice("dataset", name, NAMES)
    if name == LATENTS:
        from apd.data import latents

        return latents.LatentSource(path, split)
    check_choice(f"split of {name}", split, _SPECS[name].splits)
    data_dir = data_dir or default_data_dir()
    if name == "clipart":
        try:
            return ArraySource(*clipart.load(split, path or clipart.DEFAULT_PATH))
        except FileNotFoundError as e:
            raise DatasetNotFoundError(str(e)) from e
    if name != "fashion_mnist":
        if path is not None:
            raise ValueError(
                f"path={path!r} applies to fashion_mnist and clipart only among image datasets "
                f"(their files' directory; latents: apd.encode's directory); {name!r} is read "
                "from the TFDS data_dir."
            )
        return _tfds_source(name, split, data_dir)
    if os.path.isdir(path or fashion_mnist.DEFAULT_PATH):
        return ArraySource(*fashion_mnist.load(split, path or fashion_mnist.DEFAULT_PATH))
    if path is not None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST: the IDX directory {path!r} does not exist. Pass "
            "--config.data.path=DIR with the four IDX files, or install them with: "
            "sudo apt-get install dataset-fashion-mnist"
        )
    try:
        return _tfds_source(name, split, data_dir)
    except DatasetNotFoundError as e:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: no IDX directory {fashion_mnist.DEFAULT_PATH!r} and no "
            f"prepared TFDS fashion_mnist in data_dir {data_dir!r}. Install it with: sudo apt-get "
            "install dataset-fashion-mnist (or pass --config.data.path=DIR with the IDX files)."
        ) from e
