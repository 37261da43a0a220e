"""The paper's mask-aware autoencoder for ImageNet 256 (Table 7): 256 x 256 x 3 -> 64 x 64 x 3
latents, `ae-f4-paper` (128 channels, multipliers (1, 2, 4), 2 residual blocks per level, RMSNorm,
self-attention in the middle), a codebook of 8,192 entries.

    python -m apd.train_autoencoder --config=experiments/imagenet256_autoencoder.py \\
        --workdir=gs://BUCKET/ae_imagenet256 --config.data.data_dir=DIR
    python -m apd.encode --autoencoder=gs://BUCKET/ae_imagenet256 --out=DIR/latents_imagenet256

Data: `tfds build imagenet2012 --data_dir=DIR --file_format=array_record` (the ImageNet tarballs
in DIR/downloads/manual first); images are center-cropped and resized to 256 and flipped at
random (apd.encode stores each image's flip beside it). Arguments: quantizer (vq: the paper's
learned codebook, EMA updates with dead-code restarts | fsq: levels (16, 16, 32), 8,192 implicit
codes), steps, batch, gan (default on: weight 0.1 from `gan_start`), gan_start, fsdp, smoke.

The paper gives the architecture, not the optimisation: the learning rate, batch, length and GAN
schedule here are apd's choice, in the range of LDM's vq-f4 first stage (Adam, lr 1e-4 at batch
64 after warmup, the PatchGAN term switched on after 50k steps, its discriminator training from
step 0).
"""

import ml_collections as mc

from apd import checks
from experiments import common

QUANTIZERS = {
    "vq": {"kind": "vq", "num_codes": 8192, "update": "ema", "restart_after": 1000},
    "fsq": {"kind": "fsq", "levels": (16, 16, 32)},
}


ARG_DEFAULTS = {
    "quantizer": "vq",
    "steps": 500_000,
    "batch": 64,
    "gan": True,
    "gan_start": 50_000,
    "fsdp": 1,
    "smoke": False,
}
"""The `:ARGS` and their defaults (shared with the LSUN Bedroom config)."""


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, **ARG_DEFAULTS)
    return paper_autoencoder(arg, dataset="imagenet2012")


def paper_autoencoder(arg: mc.ConfigDict, dataset: str) -> mc.ConfigDict:
    """The paper's autoencoder config on a 256 x 256 dataset (shared with LSUN Bedroom)."""
    checks.check_choice("quantizer", arg.quantizer, QUANTIZERS)
    config = common.autoencoder_config(
        dataset=dataset,
        size="ae-f4-paper",
        quantizer=QUANTIZERS[arg.quantizer],
        steps=arg.steps,
        batch=arg.batch,
        lr=1e-4,
        warmup_steps=5_000,
        gan_weight=0.1 if arg.gan else 0.0,
        gan_start=arg.gan_start,
        image_size=256,
        random_flip=True,
        fsdp=arg.fsdp,
    )
    config.adversarial.channels = 64
    config.adversarial.optimizer.lr = 1e-4
    config.checkpoint.every_steps = 5_000
    config.checkpoint.keep_every = 50_000  # kept for the latent datasets encoded with them
    if arg.smoke:
        common.shrink_autoencoder_for_smoke(config, image_size=64)
    return config
