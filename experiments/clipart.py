"""Pixel-space diffusion on clip art (64 x 64 x 3, 22 categories) from the Debian package
`openclipart-png` (`apd.data.clipart`: 4,951 train and 504 test images; decoded once into a
cache, a minute or more on 2 CPU cores).

A U-Net sized for 2 CPU cores at 64 x 64 (`UNET_SMALL_64`). The default length (1,000 steps at
batch 32, 6.5 epochs) is sized for roughly 15 minutes on 2 idle CPU cores: side by side on a busy
machine its step ran 2.8x slower per image than Fashion-MNIST's default (6.1 against 17.3
images/s), i.e. about 35-40 images/s where that one runs 105. `:steps=N` changes the length, and
relaunching with more steps continues the same run.

    python -m apd.train --config=experiments/clipart.py --workdir=runs/clipart
    python -m apd.train --config=experiments/clipart.py:sampler=perlin --workdir=...
    python -m apd.train --config=experiments/clipart.py:smoke --workdir=/tmp/smoke
    python -m apd.sample --workdir=runs/clipart --num=32 --out=runs/clipart/samples_final

Arguments: sampler (synchronous | independent | patchwise | perlin | asyncpatch), size (a model
size name from apd.models.SIZES; the 64 x 64 layout below applies to unet-small only), steps
(total training steps), batch (global batch size), smoke (shrinks everything to seconds on CPU).
Evaluation of generated images uses InceptionV3 (`apd.evaluate --inception_weights=...`).
"""

import ml_collections as mc

from apd.data import clipart
from experiments import common

# unet-small's blocks at 64 x 64: four levels (64 -> 32 -> 16 -> 8) of 16, 32, 64 and 64 channels,
# attention only at 8 x 8. 0.9M parameters (as unet-small) and 0.56 forward GFLOP per image, twice
# unet-small's 0.28 at 28 x 28 (unet-small itself at 64 x 64: 1.5).
UNET_SMALL_64 = {
    "base": 16,
    "multipliers": (1, 2, 4, 4),
    "res_blocks": (1, 1, 1, 1),
    "attn_levels": (3,),
}


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, sampler="asyncpatch", size="unet-small", steps=1000, batch=32, smoke=False
    )
    config = common.training_config(
        dataset="clipart",
        # A string, so that `--config.data.path=DIR` reads clip art from elsewhere.
        data_path=clipart.DEFAULT_PATH,
        grid=64,
        size=arg.size,
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=1e-3,
        warmup_steps=100,
        # No flips: mirrored flags, text and arrows are not clip art of the same kind.
        random_flip=False,
    )
    if arg.size == "unet-small":
        config.model.options = mc.ConfigDict(UNET_SMALL_64)
    config.checkpoint.every_steps = 250
    config.log_every_steps = 50
    config.sample_every_steps = 500
    config.progress_every_secs = 30.0
    # FID and KID against InceptionV3 features of the whole test split (504 images; fewer than
    # `num_reference`), inpainting and bits/dim on its first 100 images.
    config.evaluate = common.evaluation(num_samples=1000, num_images=100, steps=25)
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
