"""The paper's mask-aware autoencoder for LSUN Bedroom 256: as `imagenet256_autoencoder.py`
(`ae-f4-paper`, 256 x 256 x 3 -> 64 x 64 x 3, 8,192 codes), on `lsun/bedroom`.

    python -m apd.train_autoencoder --config=experiments/lsun_bedroom_autoencoder.py \\
        --workdir=gs://BUCKET/ae_bedroom --config.data.data_dir=DIR

Data: `tfds build lsun/bedroom --data_dir=DIR --file_format=array_record`. Arguments as
`imagenet256_autoencoder.py`.
"""

import ml_collections as mc

from experiments import common, imagenet256_autoencoder


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, **imagenet256_autoencoder.ARG_DEFAULTS)
    return imagenet256_autoencoder.paper_autoencoder(arg, dataset="lsun/bedroom")
