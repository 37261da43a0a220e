"""Sampling settings swept without retraining, on the sampler ablation's models.

A second evaluation (`EVALUATION = "sampling"`) of runs that `experiments/ablation_samplers.py`
trains: the same points (asyncpatch and the synchronous baseline, training seeds 0-2), the same
training config, so with the ablation's --root every run is evaluated, not retrained. Results go
to ROOT/RUN/eval_sampling and the table to ROOT/table.sampling.md (mean and 95% t-interval over
the three training seeds).

    python -m apd.sweep --config=experiments/sampling_settings.py --root=runs/ablation

What it compares, on 160 test images per mask family and evaluation seed 0 (every unit records
its network evaluations per image, guidance branches counted):
  - input guidance w in 0, 0.5, 1, 1.5, 2, 4 (context level 'match'), and w = 1.5 with the
    context at fixed levels 0.5 and 1 (asyncpatch);
  - apd's inpainting plan at 25 and 75 steps against RePaint on the synchronous model at 25 steps
    with jump 5 / resample 3 (65 calls), jump 1 / resample 3 (73 calls: about 75, apd's 75-step
    cost) and the RePaint paper's jump 10 / resample 10 ratio (205 calls);
  - classifier-free guidance scale 0, 0.25, 0.5, 1, 2, 4 for generation (500 samples; FID and
    KID).

Config arguments: sampler (asyncpatch or synchronous), steps, smoke (as the ablation's).
"""

import ml_collections as mc

from experiments import ablation_samplers, common

EVALUATION = "sampling"
SAMPLERS = ("asyncpatch", "synchronous")
INPUT_GUIDANCE = (0.5, 1.0, 1.5, 2.0, 4.0)
CONTEXT_LEVELS = (0.5, 1.0)
CFG_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


def get_config(arg: str | None = None) -> mc.ConfigDict:
    parsed = common.parse_arg(arg, sampler="asyncpatch", steps=1200, smoke=False)
    if parsed.sampler not in SAMPLERS:
        raise ValueError(f"sampler={parsed.sampler!r}; this sweep's samplers are {SAMPLERS}.")
    config = ablation_samplers.get_config(arg)
    ev = config.evaluate
    ev.seeds = (0,)
    ev.evaluators = ("generation", "inpainting")
    ev.generation.methods = ("ddim", *(f"ddim:cfg={c:g}" for c in CFG_SCALES))
    methods = ["apd", "apd:steps=75"]
    if parsed.sampler == "synchronous":
        methods += ["repaint", "repaint:jump=1", "repaint:jump=10,resample=10"]
    else:
        methods += [f"apd:ig={w:g}" for w in INPUT_GUIDANCE]
        methods += [f"apd:ig=1.5,context={c:g}" for c in CONTEXT_LEVELS]
    ev.inpainting.methods = tuple(methods)
    if parsed.smoke:
        ev.generation.methods = ("ddim", "ddim:cfg=2")
        ev.inpainting.methods = tuple(methods[:3])
    return config


def get_hyper(h):
    return h.product([h.sweep(":sampler", SAMPLERS), h.sweep("seed", ablation_samplers.SEEDS)])
