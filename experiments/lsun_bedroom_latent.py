"""The paper's LSUN Bedroom latent model: the 620M U-Net on the 64 x 64 x 3 latents of
`lsun_bedroom_autoencoder.py`, unconditional (as `imagenet256_latent.py` otherwise).

    python -m apd.encode --autoencoder=AE --out=LATENTS
    python -m apd.train --config=experiments/lsun_bedroom_latent.py:latents=LATENTS --workdir=...

Arguments: latents, autoencoder (optional), sampler, steps, batch, fsdp, smoke.
"""

import ml_collections as mc

from experiments import common, imagenet256_latent


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(arg, **imagenet256_latent.ARG_DEFAULTS)
    return imagenet256_latent.paper_latent(arg, class_conditional=False)
