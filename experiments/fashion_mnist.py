"""The embedded default: a small per-pixel-FiLM U-Net on Fashion-MNIST (28 x 28 x 1).

The default length (1,200 steps at batch 64, 1.3 epochs; about 105 images/s on 2 idle CPU
cores) is sized for roughly 15 minutes; `:steps=N` changes it, and relaunching with more steps
continues the same run.

    python -m apd.train --config=experiments/fashion_mnist.py --workdir=runs/fmnist
    python -m apd.train --config=experiments/fashion_mnist.py:sampler=perlin --workdir=...
    python -m apd.train --config=experiments/fashion_mnist.py:smoke --workdir=/tmp/smoke

Arguments: sampler (synchronous | independent | patchwise | perlin | asyncpatch), size (a model
size name from apd.models.SIZES), steps (total training steps), batch (global batch size), smoke
(shrinks everything to seconds on CPU).
"""

import ml_collections as mc

from experiments import common


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, sampler="asyncpatch", size="unet-small", steps=1200, batch=64, smoke=False
    )
    config = common.training_config(
        dataset="fashion_mnist",
        data_path="/usr/share/datasets/fashion-mnist",
        grid=28,
        size=arg.size,
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=2e-3,
        warmup_steps=200,
    )
    config.checkpoint.every_steps = 300
    config.log_every_steps = 50
    config.sample_every_steps = 600
    config.progress_every_secs = 30.0
    # The main job's evaluation (about 10 minutes on 2 CPU cores): FID_FMNIST of 1,000 samples,
    # every mask family on 100 test images with and without input guidance, bits/dim on 200 test
    # images along the three paths. The RePaint baseline (method 'repaint' in
    # `evaluate.inpainting.methods`) is in the sampler ablation (experiments/ablation_samplers.py).
    config.evaluate = common.evaluation(
        num_samples=1000, num_images=100, steps=25, inpainting_methods=("apd", "apd:ig=1.5")
    )
    config.evaluate.inpainting.repaint_steps = 25
    config.evaluate.inpainting.repaint_jump = 5
    config.evaluate.inpainting.repaint_resample = 3
    config.evaluate.likelihood.num_images = 200
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
