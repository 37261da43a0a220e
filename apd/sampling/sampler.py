"""The spatially flexible sampler: per-token DDIM along a plan, in one `lax.scan`.

    x = apd.sampling.sample(denoise, plan, key, schedule=RectifiedFlow(), prediction="v")

Step k of the plan calls the network once on the whole batch at the current level map
(`plan.at(k)`, computed inside the scan for compact plans, with the guidance branches batched into
that call) and moves every updated token from its level now to its level next with
`ddim.ddim_step`. Known tokens (update False) and tokens whose level does not change are left bit
for bit.

Start state: z = alpha(t_0) x_known + sigma(t_0) noise per token at its starting level t_0
(`ddim.noised`: exactly x_known at level 0), so one code path serves generation, inpainting and
editing. A token at level 1 therefore starts at sigma(1) * noise: the plain standard normal noise
that diffusers-style samplers start from only when sigma(1) = 1, as for the built-in schedules
(with or without a shift); a schedule with sigma(1) != 1 starts from noise scaled by sigma(1).

Compilation: the plan's arrays, key, data, labels, eta, guidance scales and a numeric context
level are traced; the plan's step count, form and kind, `denoise`, the schedule, the prediction
type, `num_classes`, 'match' and which guidance branches exist (see `guidance.is_off`) are
static. `denoise` is a static argument keyed by
identity: create it once per model and parameters (a new function object compiles again). To
sample with parameters that change (evaluation during training), call `sample` inside a
`jax.jit` of your own that takes the parameters as an argument and builds `denoise` there.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from apd import checks, corruption, plans
from apd.sampling import ddim, guidance, inputs
from apd.schedules import Schedule

Array = jax.Array
Denoise = Callable[[Array, Array, Array | None], Array]


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a sampling run costs in network work."""

    network_calls: int  # batched forward passes (one per step)
    evaluations: int  # network_calls * branches per step
    batch_per_call: int  # samples in each batched call


def sample(
    denoise: Denoise,
    plan: plans.Plan,
    key: Array,
    *,
    schedule: Schedule,
    prediction: str = "v",
    eta: float | Array = 0.25,
    x_known: Array | None = None,
    noise: Array | None = None,
    channels: int | None = None,
    labels: Array | None = None,
    num_classes: int = 0,
    cfg_scale: float | Array = 0.0,
    input_guidance: float | Array = 0.0,
    context_level: str | float | Array = "match",
) -> Array:
    """Samples along a plan with per-token DDIM.

    The start state is z = alpha(t_0) x_known + sigma(t_0) noise at each token's starting level
    t_0 (see `ddim.noised`): sigma(1) * noise for tokens starting at level 1, which is the plain
    noise of diffusers-style samplers when sigma(1) = 1 (the built-in schedules).

    Args:
      denoise: (z [N, *tokens, C], levels [N, *tokens] float32, labels [N] int32 or None) ->
        prediction like z, of type `prediction`. N is B times the branches per step.
      plan: the schedule field (levels [S + 1, B, *tokens], update [B, *tokens]), compact or
        materialised (`apd.plans`).
      key: PRNG key (start noise, DDIM noise, context noise; folded in per step).
      schedule: the noise schedule the model was trained with.
      prediction: 'x', 'eps' or 'v'. 'eps' cannot step from a level where alpha = 0 (level 1 of
        the built-in schedules): a ValueError is raised before tracing when an updated token
        starts there.
      eta: DDIM stochastic coefficient in [0, 1] (0 deterministic, 1 ancestral; paper 0.25).
      x_known: [B, *tokens, C] float32, the data for tokens starting below level 1 (known tokens,
        edited images). Needed whenever the plan starts any token below 1.
      noise: like x_known, standard normal start noise; default drawn from `key`.
      channels: C, needed only when neither x_known nor noise gives it.
      labels: [B] int32 in [0, num_classes] (num_classes = the null label), or None.
      num_classes: the number of classes of a class-conditional model (0 = unconditional).
      cfg_scale: classifier-free guidance scale w_c (needs labels and num_classes > 0).
      input_guidance: input guidance scale w_i.
      context_level: 'match' or a level in [0, 1] for input guidance's noisier context.
    Returns:
      x: [B, *tokens, C] float32, the samples (known tokens exactly x_known).
    """
    plans.validate(plan)
    checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)
    shape = inputs.data_shape(plan, x_known, noise, channels)
    inputs.check_start(plan, x_known)
    inputs.check_prediction_start(plan, prediction, schedule)
    branches = inputs.guidance_branches(cfg_scale, input_guidance, labels, num_classes)
    labels = inputs.check_labels(labels, plan.shape[0], num_classes)
    inputs.check_scalar("eta", eta, 0.0, 1.0)
    inputs.check_scalar("cfg_scale", cfg_scale)
    inputs.check_scalar("input_guidance", input_guidance)
    match = isinstance(context_level, str)
    if match:
        checks.check_choice("context_level", context_level, ("match",))
    else:
        inputs.check_scalar("context_level", context_level, 0.0, 1.0)
    return _sample(
        plan,
        key,
        None if x_known is None else jnp.asarray(x_known, jnp.float32),
        None if noise is None else jnp.asarray(noise, jnp.float32),
        labels,
        inputs.f32(eta),
        inputs.f32(cfg_scale),
        inputs.f32(input_guidance),
        None if match else inputs.f32(context_level),
        denoise=denoise,
        schedule=schedule,
        prediction=prediction,
        num_classes=num_classes,
        branches=branches,
        shape=shape,
    )


def sample_cost(
    plan: plans.Plan, *, cfg_scale: float | Array = 0.0, input_guidance: float | Array = 0.0
) -> Cost:
    """The network work of `sample` with this plan and guidance (branches as `guidance.is_off`)."""
    count = guidance.Branches(
        cfg=not guidance.is_off(cfg_scale), input=not guidance.is_off(input_guidance)
    ).count
    return Cost(plan.steps, plan.steps * count, plan.shape[0] * count)


@functools.partial(
    jax.jit,
    static_argnames=(
        "denoise",
        "schedule",
        "prediction",
        "num_classes",
        "branches",
        "shape",
    ),
)
def _sample(
    plan: plans.Plan,
    key: Array,
    x_known: Array | None,
    noise: Array | None,
    labels: Array | None,
    eta: Array,
    cfg_scale: Array,
    input_scale: Array,
    level: Array | None,
    *,
    denoise: Denoise,
    schedule: Schedule,
    prediction: str,
    num_classes: int,
    branches: guidance.Branches,
    shape: tuple[int, ...],
) -> Array:
    key_start, key_steps = jax.random.split(key)
    if noise is None:
        noise = jax.random.normal(key_start, shape, jnp.float32)
    x = jnp.zeros(shape, jnp.float32) if x_known is None else x_known
    z0 = ddim.noised(x, plan.at(0), noise, schedule)
    update = plan.update

    def step(z: Array, k: Array) -> tuple[Array, None]:
        t, s = plan.at(k), plan.at(k + 1)
        key_ddim, key_context = jax.random.split(jax.random.fold_in(key_steps, k))
        pred = guidance.guided_prediction(
            denoise,
            z,
            t,
            update,
            labels,
            key_context,
            branches=branches,
            num_classes=num_classes,
            cfg_scale=cfg_scale,
            input_scale=input_scale,
            level=level,
            schedule=schedule,
        )
        x_hat, eps_hat = corruption.to_x_eps(pred, z, t, schedule, prediction)
        step_noise = jax.random.normal(key_ddim, z.shape, jnp.float32)
        z_next = ddim.ddim_step(z, x_hat, eps_hat, t, s, step_noise, eta, schedule)
        return jnp.where(update[..., None], z_next, z), None

    z, _ = jax.lax.scan(step, z0, jnp.arange(plan.steps))
    return z
