"""Image transforms on numpy records and batches (host side, before anything reaches a device).

Records are dicts `{'image': uint8 [H, W, C], 'label': int}`, or for a latent dataset
(`apd.data.latents`) `{'image': float32 [h, w, D], 'label': int}` with, where the dataset stores
flips, the flipped latents under `FLIPPED`; batches stack them along a leading axis. Per-record
transforms run on uint8 (cheap to copy); the conversion to float runs once per batch.
"""

import numpy as np
from PIL import Image

FLIPPED = "flipped_image"
"""The record key of a stored flip: the image (latents) of the record mirrored left-right, where
mirroring the array is not the flip (latents of the mirrored image, `apd.data.latents`)."""


def to_float(images: np.ndarray) -> np.ndarray:
    """Maps uint8 pixels to float32 in [-1, 1] (0 -> -1, 255 -> 1); float arrays (latents) pass
    through as float32, their values unchanged.

    Args:
      images: uint8 [..., H, W, C] in [0, 255], or a float array.

    Returns:
      float32 [..., H, W, C]: in [-1, 1] for uint8 input.
    """
    if np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32, copy=False)
    if images.dtype != np.uint8:
        raise ValueError(
            f"to_float expects uint8 pixels in [0, 255] or float latents; got dtype {images.dtype}."
        )
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the short side to `size` and crops the centre square (ADM's ImageNet-64 recipe).

    Halves the image with a box filter while its short side is at least 2 * size (cheap and
    alias-free), then resizes with a bicubic filter so the short side is `size`, then crops the
    central size x size square. An image already size x size is returned unchanged.

    Args:
      image: uint8 [H, W, C] with C in {1, 3}.
      size: the output height and width, >= 1.

    Returns:
      uint8 [size, size, C].
    """
    if size < 1:
        raise ValueError(f"image size must be a positive integer; got {size!r}.")
    height, width, channels = image.shape
    if (height, width) == (size, size):
        return image
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    new_size = (max(size, round(pil.size[0] * scale)), max(size, round(pil.size[1] * scale)))
    pil = pil.resize(new_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(pil).reshape(new_size[1], new_size[0], channels)
    top, left = (new_size[1] - size) // 2, (new_size[0] - size) // 2
    return array[top : top + size, left : left + size]


def random_flip(record: dict, rng: np.random.Generator) -> dict:
    """Flips the record's image left-right with probability 1/2: its stored flip (`FLIPPED`)
    where the record has one, else the image mirrored.

    Args:
      record: `{'image': [H, W, C], ...}`, optionally with `FLIPPED`; other entries pass
        through.
      rng: the generator grain derives for this record (from the pipeline seed and the record's
        position in the stream), so the flips are deterministic and resumable.

    Returns:
      The record with its image flipped or not, without `FLIPPED`.
    """
    flip = rng.random() < 0.5
    if FLIPPED in record:
        record = dict(record)
        flipped = record.pop(FLIPPED)
        return {**record, "image": flipped} if flip else record
    if flip:
        return {**record, "image": record["image"][:, ::-1]}
    return record


def drop_flipped(record: dict) -> dict:
    """The record without its stored flip (`FLIPPED`), for pipelines that do not flip."""
    if FLIPPED not in record:
        return record
    return {k: v for k, v in record.items() if k != FLIPPED}
