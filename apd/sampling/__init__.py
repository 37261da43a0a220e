"""Sampling: per-token DDIM along a plan (apd.plans), guidance, and the RePaint baseline.

Sampling knows models only through a `denoise(z, levels, labels) -> prediction` callable.

    plan = apd.plans.inpaint(mask, steps=250)
    x = apd.sampling.sample(denoise, plan, key, schedule=schedule, prediction="v", eta=0.25,
                            x_known=image, input_guidance=1.5)
    cost = apd.sampling.sample_cost(plan, input_guidance=1.5)   # network calls, evaluations

- `ddim`: the per-token DDIM step (any schedule, stochastic coefficient eta) and forward noising.
- `guidance`: classifier-free and input guidance, all branches in one batched call.
- `sampler`: `sample` (one `lax.scan` over the plan's steps) and `sample_cost`.
- `resampling`: RePaint (jump length j, resampling r) for synchronously trained models; its
  functions `repaint`, `repaint_cost`, `repaint_schedule` are re-exported here. (The module is
  not named `repaint`, so that `apd.sampling.repaint` is the function and the module stays
  importable as itself.)
- `inputs`: eager checks of the sampling API's inputs; `images`: PNG grids and the jitted
  sample function for the trainer.
"""

from apd.sampling.ddim import ddim_step, forward_step, noised
from apd.sampling.resampling import repaint, repaint_cost, repaint_schedule
from apd.sampling.sampler import Cost, sample, sample_cost

__all__ = [
    "Cost",
    "ddim_step",
    "forward_step",
    "noised",
    "repaint",
    "repaint_cost",
    "repaint_schedule",
    "sample",
    "sample_cost",
]
