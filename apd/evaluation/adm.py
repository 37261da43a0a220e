"""Samples in the layout OpenAI's guided-diffusion evaluator reads (`evaluations/evaluator.py`).

The evaluator takes two .npz "batches": the reference batch and the sample batch, each with the
images as `arr_0`, uint8 [N, H, W, 3] in [0, 255], channels last, RGB (what
`np.savez(path, arr_0=images)` writes, as the guided-diffusion sampling scripts do). It computes
FID, sFID, Inception Score, precision and recall with its own TensorFlow Inception.
"""

import os

import numpy as np


def export_npz(path: str, images_uint8: np.ndarray) -> None:
    """Writes images as the evaluator's sample batch: `arr_0` uint8 [N, H, W, 3].

    Args:
      path: the .npz file to write (replaced atomically if it exists).
      images_uint8: uint8 [N, H, W, 3] RGB, or [N, H, W, 1] grayscale (repeated to RGB: the
        evaluator's Inception expects three channels).
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "the ADM evaluator reads uint8 images [N, H, W, 3] (or grayscale [N, H, W, 1], "
            f"repeated to RGB); got {images.dtype} of shape {images.shape}."
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if not path.endswith(".npz"):
        raise ValueError(f"the ADM evaluator reads .npz files; got path {path!r}.")
    tmp = f"{path[: -len('.npz')]}.tmp.npz"
    np.savez(tmp, arr_0=np.ascontiguousarray(images))
    os.replace(tmp, path)
