"""The embedded default: a small per-pixel-FiLM U-Net on Fashion-MNIST (28 x 28 x 1).

    python -m apd.train --config=experiments/fashion_mnist.py --workdir=runs/fmnist
    python -m apd.train --config=experiments/fashion_mnist.py:sampler=perlin --workdir=...
    python -m apd.train --config=experiments/fashion_mnist.py:smoke --workdir=/tmp/smoke

Arguments: sampler (synchronous | independent | patchwise | perlin | asyncpatch), size (a model
size name), steps (total training steps), batch (global batch size), smoke (shrinks everything to
seconds on CPU).
"""

import ml_collections as mc

from experiments import common


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, sampler="asyncpatch", size="unet-small", steps=6000, batch=64, smoke=False
    )
    config = mc.ConfigDict()
    config.seed = 0
    config.total_steps = arg.steps

    config.data = mc.ConfigDict(
        {
            "name": "fashion_mnist",
            "path": "/usr/share/datasets/fashion-mnist",
            "data_dir": None,
            "image_size": None,
            "random_flip": False,
            "global_batch_size": arg.batch,
        }
    )
    config.model = mc.ConfigDict(
        {"name": arg.size, "class_conditional": True, "options": mc.ConfigDict()}
    )
    config.diffusion = common.diffusion()
    config.levels = common.level_sampler(arg.sampler, 28)
    config.optimizer = common.optimizer(lr=2e-3, warmup_steps=200)
    config.ema_decay = 0.999
    config.mesh = mc.ConfigDict({"data": -1, "fsdp": 1})
    config.checkpoint = mc.ConfigDict(
        {"every_steps": 500, "keep_last": 3, "keep_every": 0, "async_save": True}
    )
    config.log_every_steps = 50
    config.sample_every_steps = 1000  # PNG grids of EMA samples in WORKDIR/samples; 0 = off
    config.sample = mc.ConfigDict({"num": 64, "steps": 50, "eta": 0.25})
    config.progress_every_secs = 30.0

    if arg.smoke:
        config.total_steps = 4
        config.data.global_batch_size = 8
        config.model.name = "unet-tiny"
        config.optimizer.warmup_steps = 2
        config.checkpoint.every_steps = 2
        config.log_every_steps = 2
        config.progress_every_secs = 1.0
        config.sample_every_steps = 0
    return config
