"""CIFAR-10 (32 x 32 x 3), class-conditional, from TFDS as prepared by `tfds build cifar10`.

    python -m apd.train --config=experiments/cifar10.py[:sampler=perlin,size=unet-60m] --workdir=...

Arguments: sampler, size (default unet-60m, the paper's ablation model), steps, batch, smoke.
"""

import ml_collections as mc

from experiments import common


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, sampler="asyncpatch", size="unet-60m", steps=400_000, batch=128, smoke=False
    )
    config = common.training_config(
        dataset="cifar10",
        grid=32,
        size=arg.size,
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=2e-4,
        warmup_steps=5000,
        random_flip=True,
    )
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
