"""Image data for apd: sources (Fashion-MNIST IDX files, clip art, TFDS array_record, latent
datasets of `apd.encode`) and grain pipelines.

    source = get_source("fashion_mnist", "train")
    image_shape, num_classes = dataset_info("fashion_mnist")
    batches = make_dataset(source, global_batch_size=128, seed=0)
    batch = next(batches)  # {'image': float32 [b, 28, 28, 1] in [-1, 1], 'label': int32 [b]}

This package knows nothing of models or training.
"""

from apd.data.pipeline import (
    checkpoint_restore_args,
    checkpoint_save_args,
    make_dataset,
    make_eval_dataset,
    read_images,
)
from apd.data.sources import (
    LATENTS,
    NAMES,
    ArraySource,
    DatasetNotFoundError,
    Source,
    TfdsSource,
    dataset_info,
    dataset_splits,
    default_data_dir,
    get_source,
)

__all__ = [
    "LATENTS",
    "NAMES",
    "ArraySource",
    "DatasetNotFoundError",
    "Source",
    "TfdsSource",
    "checkpoint_restore_args",
    "checkpoint_save_args",
    "dataset_info",
    "dataset_splits",
    "default_data_dir",
    "get_source",
    "make_dataset",
    "make_eval_dataset",
    "read_images",
]
