"""The mask-aware latent autoencoder on clip art (64 x 64 x 3, `apd.data.clipart`): `ae-f4-small`,
f = 4, so images become 16 x 16 x 3 latents (`apd.models.autoencoder`; the task
`apd.training.autoencoder_task`).

    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py --workdir=runs/ae
    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py:quantizer=fsq ...
    python -m apd.train_autoencoder --config=experiments/clipart_autoencoder.py:smoke ...

Arguments: quantizer (vq: a 1,024-code EMA codebook with dead-code restarts | fsq: levels
(8, 8, 16), 1,024 codes), steps (total training steps), cooldown (0: a constant learning rate;
N > 0: the last N steps cool it down linearly to zero, `optimizer.decay = 'cooldown'`; extending
a run moves its cooldown to the new end), batch (global batch size), gan (switch
on the PatchGAN term: weight 0.1 from a third of the run on; its discriminator trains from step
0), smoke (the tiny autoencoder, 4 steps, seconds on CPU).

The default length (250 steps at batch 8, 2,000 images, 0.4 epochs) is sized for about 10
minutes on 2 idle CPU cores (`STEP_GFLOP`); relaunching with more `steps` continues the same
run. `quantizer=vq,steps=6000,cooldown=1500` (about 2.5 hours idle) reaches 26.3 dB PSNR on the
whole test split with every code in use (`benchmarks/RESULTS.md`, "The latent stage on clip
art"). The GAN term is off by default: VQGAN switches it on after tens of thousands of steps, far
beyond a CPU run.
"""

import ml_collections as mc

from apd import checks
from apd.data import clipart
from experiments import common

# ae-f4-small's training step costs 14.3 GFLOP per image (XLA's count: the training rule encodes
# every image twice, masked and full, and decodes once; VQ, no GAN term): 115 GFLOP at batch 8.
# Measured on the 2-core machine while busy with other jobs: 7.4-9 s per step at batch 8 (20 s
# at batch 16) while its float32 matmul peak measured 30-35 GFLOP/s in the same run, i.e. 35-50%
# of the peak. Idle, the peak is 110-200 GFLOP/s (shared/docs/stack-notes.md): 1.2-3 s per step,
# so 250 steps take 5-12 minutes, after 1-2 minutes of compilation.
STEP_GFLOP = 14.3

QUANTIZERS = {
    "vq": {"kind": "vq", "num_codes": 1024, "update": "ema", "restart_after": 100},
    "fsq": {"kind": "fsq", "levels": (8, 8, 16)},
}


def get_config(arg: str | None = None) -> mc.ConfigDict:
    arg = common.parse_arg(
        arg, quantizer="vq", steps=250, cooldown=0, batch=8, gan=False, smoke=False
    )
    checks.check_choice("quantizer", arg.quantizer, QUANTIZERS)
    config = common.autoencoder_config(
        dataset="clipart",
        # A string, so that `--config.data.path=DIR` reads clip art from elsewhere.
        data_path=clipart.DEFAULT_PATH,
        size="ae-f4-small",
        quantizer=QUANTIZERS[arg.quantizer],
        steps=arg.steps,
        batch=arg.batch,
        lr=5e-4,
        warmup_steps=25,
        gan_weight=0.1 if arg.gan else 0.0,
        gan_start=arg.steps // 3,
        # No flips: mirrored flags, text and arrows are not clip art of the same kind.
        random_flip=False,
    )
    # The training binary checks the length against the run's (`optim.learning_rate`).
    if arg.cooldown:
        config.optimizer.decay = "cooldown"
        config.optimizer.cooldown_steps = arg.cooldown
    config.checkpoint.every_steps = 50
    # Every 500th step's checkpoint stays: a latent dataset names the autoencoder step it was
    # encoded with, so that step must outlive the rolling last three while the run goes on.
    config.checkpoint.keep_every = 500
    config.log_every_steps = 10
    config.sample_every_steps = 50
    config.progress_every_secs = 30.0
    if arg.smoke:
        common.shrink_autoencoder_for_smoke(config, sample_every_steps=4)
    return config
