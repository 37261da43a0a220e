"""The paper's ImageNet 256 latent model (Tables 2-4): the 620M U-Net (`unet-620m`) on the
64 x 64 x 3 latents of its mask-aware autoencoder (`imagenet256_autoencoder.py`), class-
conditional, its parameters sharded over an 'fsdp' mesh axis of 8.

    python -m apd.train_autoencoder --config=experiments/imagenet256_autoencoder.py \\
        --workdir=AE --config.data.data_dir=DIR
    python -m apd.encode --autoencoder=AE --out=LATENTS          # train and validation splits
    python -m apd.train --config=experiments/imagenet256_latent.py:latents=LATENTS \\
        --workdir=gs://BUCKET/imagenet256_latent
    python -m apd.evaluate --workdir=gs://BUCKET/imagenet256_latent --inception_weights=...

The latent dataset names its autoencoder (and is checked against `autoencoder=AE` when given);
sampling, inpainting and FID run on decoded 256 x 256 images (known pixels composited exactly).
A missing latent dataset fails before anything is built, with the encode command.

Arguments: latents (apd.encode's DIR), autoencoder (optional), sampler, steps, batch, fsdp,
smoke. The paper trains 1M steps at batch 512 with EMA 0.999 (as imagenet64.py; learning rate,
betas and clip value are apd's choice).
"""

import ml_collections as mc

from experiments import common

ARG_DEFAULTS = {
    "latents": "",
    "autoencoder": "",
    "sampler": "asyncpatch",
    "steps": 1_000_000,
    "batch": 512,
    "fsdp": 8,
    "smoke": False,
}
"""The `:ARGS` and their defaults (shared with the LSUN Bedroom config)."""


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, **ARG_DEFAULTS)
    return paper_latent(arg, class_conditional=True)


def paper_latent(arg: mc.ConfigDict, class_conditional: bool) -> mc.ConfigDict:
    """The paper's 620M latent model on a latent dataset of 64 x 64 x 3 tokens."""
    if not arg.latents:
        raise ValueError(
            "the latent dataset is not set: pass :latents=DIR (the --out of python -m apd.encode "
            "--autoencoder=AE_WORKDIR)."
        )
    config = common.training_config(
        dataset="latents",
        grid=64,
        size="unet-620m",
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=1e-4,
        warmup_steps=10_000,
        random_flip=True,  # picks each image's stored flip (apd.encode stores both)
        fsdp=arg.fsdp,
    )
    config.model.class_conditional = class_conditional
    config.model.options.dropout = 0.1
    common.latent_data(config, arg.latents, arg.autoencoder or None)
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
