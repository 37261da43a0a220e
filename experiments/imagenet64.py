"""ImageNet 64 x 64, class-conditional: the paper's 60M ablation and 620M main models.

    python -m apd.train --config=experiments/imagenet64.py:size=60m,sampler=asyncpatch --workdir=...
    python -m apd.train --config=experiments/imagenet64.py:size=620m --workdir=gs://...

Data: `tfds build imagenet2012 --data_dir=DIR --file_format=array_record` (needs the ImageNet
tarballs in DIR/downloads/manual), then `--config.data.data_dir=DIR`; images are center-cropped and
resized to 64. The paper trains the 60M model for 1M steps at batch 512 with Adam, warmup,
gradient clipping and EMA 0.999 (learning rate, betas and clip value are not given; the values here
are apd's choice). The 620M model shards its parameters over an 'fsdp' mesh axis of 8.

Arguments: size (60m | 620m), sampler, steps, batch, smoke.
"""

import ml_collections as mc

from experiments import common

SIZES = {"60m": ("unet-60m", 1), "620m": ("unet-620m", 8)}


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, sampler="asyncpatch", size="60m", steps=1_000_000, batch=512, smoke=False
    )
    if arg.size not in SIZES:
        raise ValueError(f"unknown size {arg.size!r}; expected one of {sorted(SIZES)}.")
    model, fsdp = SIZES[arg.size]
    config = common.training_config(
        dataset="imagenet2012",
        grid=64,
        size=model,
        sampler=arg.sampler,
        steps=arg.steps,
        batch=arg.batch,
        lr=1e-4,
        warmup_steps=10_000,
        image_size=64,
        random_flip=True,
        fsdp=fsdp,
    )
    config.model.options.dropout = 0.1
    if arg.smoke:
        common.shrink_for_smoke(config)
    return config
