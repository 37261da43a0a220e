"""Latent diffusion on clip art: the U-Net on the 16 x 16 x 3 latents of the clip-art
autoencoder (`experiments/clipart_autoencoder.py`, f = 4), the small-scale counterpart of the
paper's latent models (`imagenet256_latent.py`, `lsun_bedroom_latent.py`).

    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py --workdir=runs/ae
    python -m apd.encode --autoencoder=runs/ae --out=runs/clipart_latents
    python -m apd.train --config=experiments/clipart_latent.py:latents=runs/clipart_latents \\
        --workdir=runs/clipart_latent
    python -m apd.sample --workdir=runs/clipart_latent --num=32 --out=...   # decoded images
    python -m apd.evaluate --workdir=runs/clipart_latent --inception_weights=...

Arguments: latents (the latent dataset's DIR), autoencoder (the autoencoder's workdir; default
the one the dataset names), sampler, size, steps, batch, smoke. Inpainting in evaluation and
`apd.sample` runs in pixel space on decoded images: a latent token is known only when every
pixel it covers is known, and the known pixels are composited exactly.

unet-small as it is (three levels, 16 -> 8 -> 4, attention at 4 x 4): the same 1,000 steps at
batch 32 as the pixel config `experiments/clipart.py` cost a fraction of its time
(`benchmarks/RESULTS.md`, latent vs pixel).
"""

import ml_collections as mc

from experiments import common


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg,
        latents="runs/clipart_latents",
        autoencoder="",
        sampler="asyncpatch",
        size="unet-small",
        steps=1000,
        batch=32,
        smoke=False,
    )
    config = common.training_config(
        dataset="latents",
        grid=16,
        size=arg.size,
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=1e-3,
        warmup_steps=100,
        random_flip=False,
    )
    config.checkpoint.every_steps = 250
    config.log_every_steps = 50
    config.sample_every_steps = 500
    config.progress_every_secs = 30.0
    # FID/KID of 500 samples against the 504 test images; inpainting on the first 100, one
    # unpadded chunk of 100 per unit (Inception features of the samples cost more than sampling
    # the latent model on CPU).
    config.evaluate = common.evaluation(num_samples=500, num_images=100, steps=25)
    config.evaluate.batch = 100
    common.latent_data(config, arg.latents, arg.autoencoder or None)
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
