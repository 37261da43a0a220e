"""Eager checks of the sampling API's inputs: each bad value raises a ValueError naming it."""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from apd import checks, plans
from apd.sampling import guidance
from apd.schedules import Schedule

Array = jax.Array


def f32(value) -> Array:
    """A scalar as a float32 array: Python and NumPy numbers and arrays trace alike (no retrace)."""
    return jnp.asarray(value, jnp.float32)


def check_scalar(what: str, value, lo: float = -math.inf, hi: float = math.inf) -> None:
    """A real scalar, finite and in [lo, hi] when concrete."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{what} must be a scalar; got shape {jnp.shape(value)}.")
    if isinstance(value, bool) or not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise ValueError(f"{what} must be a number; got {value!r}.")
    if checks.is_concrete(value):
        v = float(value)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"{what} must be a finite number in [{lo}, {hi}]; got {v!r}.")


def data_shape(
    plan: plans.Plan, x_known: Array | None, noise: Array | None, channels: int | None
) -> tuple[int, ...]:
    """[B, *tokens, C] from the plan and whichever of x_known, noise, channels is given."""
    given = [
        (n, jnp.shape(a)) for n, a in (("x_known", x_known), ("noise", noise)) if a is not None
    ]
    if channels is not None:
        if not (isinstance(channels, numbers.Integral) and channels >= 1):
            raise ValueError(f"channels must be a positive int; got {channels!r}.")
        given.append(("channels", (*plan.shape, int(channels))))
    if not given:
        raise ValueError("sample needs the data shape: pass x_known, noise or channels.")
    for name, shape in given:
        if tuple(shape[:-1]) != plan.shape or len(shape) != len(plan.shape) + 1:
            raise ValueError(
                f"{name} of shape {tuple(shape)} does not fit the plan: expected "
                f"{(*plan.shape, 'C')} ([B, *tokens, C] with the plan's update shape)."
            )
    shapes = {tuple(shape) for _, shape in given}
    if len(shapes) > 1:
        raise ValueError(f"x_known, noise and channels disagree on the data shape: {given}.")
    return tuple(int(n) for n in shapes.pop())


def check_start(plan: plans.Plan, x_known: Array | None) -> None:
    """Without x_known every token must start at pure noise (level 1)."""
    if x_known is not None:
        return
    start = plan.at(0)
    if not checks.is_concrete(start):
        return
    start = np.asarray(start)
    if (start < 1.0).any():
        token = tuple(int(i) for i in np.argwhere(start < 1.0)[0])
        raise ValueError(
            f"the plan starts token {token} at level {float(start[token])!r} < 1 (known or "
            f"partially noised); pass x_known [B, *tokens, C] with the data to start from."
        )


def check_prediction_start(plan: plans.Plan, prediction: str, schedule: Schedule) -> None:
    """Refuses 'eps' prediction stepping from a level where alpha = 0 (level 1, built-in schedules).

    x_hat = (z - sigma eps_hat) / alpha is undefined there and the samples would be NaN. Levels
    never rise and alpha falls with the level, so checking each updated token's start level
    suffices. A traced plan is refused by its kind when the kind starts every updated token at
    level 1 (synchronous, inpaint, autoregressive).
    """
    if prediction != "eps":
        return
    start = plan.at(0)
    if checks.is_concrete(start) and checks.is_concrete(plan.update):
        start = np.asarray(start)
        bad = np.asarray(plan.update) & (np.asarray(schedule.alpha(start)) == 0.0)
        if bad.any():
            token = tuple(int(i) for i in np.argwhere(bad)[0])
            raise eps_at_noise_error(
                f"the plan starts updated token {token} at level {float(start[token])!r}",
                "start every updated token below level 1 (e.g. plans.edit with strength < 1)",
            )
    elif plan.kind in plans.STARTS_AT_NOISE and alpha_at_noise(schedule) == 0.0:
        raise eps_at_noise_error(
            f"a {plan.kind} plan starts every updated token at level 1",
            "start every updated token below level 1 (e.g. plans.edit with strength < 1)",
        )


def alpha_at_noise(schedule: Schedule) -> float:
    """alpha(1) of the schedule, as a Python float even while a caller is being traced."""
    with jax.ensure_compile_time_eval():
        return float(schedule.alpha(jnp.float32(1.0)))


def eps_at_noise_error(where: str, fix: str | None = None) -> ValueError:
    """The error for prediction='eps' asked to step from a level where alpha = 0."""
    fix = "" if fix is None else f"{fix}, or "
    return ValueError(
        f"prediction='eps' cannot sample from a level where alpha = 0: {where}, and there "
        f"x_hat = (z - sigma * eps_hat) / alpha is undefined (the samples would be NaN). To fix "
        f"it, {fix}use a model trained with prediction 'v' or 'x'."
    )


def guidance_branches(
    cfg_scale, input_scale, labels: Array | None, num_classes: int
) -> guidance.Branches:
    """The static branch structure; classifier-free guidance needs labels and num_classes > 0."""
    if not (isinstance(num_classes, numbers.Integral) and num_classes >= 0):
        raise ValueError(f"num_classes must be an int >= 0; got {num_classes!r}.")
    branches = guidance.Branches(
        cfg=not guidance.is_off(cfg_scale), input=not guidance.is_off(input_scale)
    )
    if branches.cfg and (labels is None or num_classes == 0):
        raise ValueError(
            f"classifier-free guidance (cfg_scale={cfg_scale!r}) needs labels [B] and "
            f"num_classes > 0 (the null label); got labels={'None' if labels is None else 'set'}, "
            f"num_classes={num_classes!r}."
        )
    return branches


def check_labels(labels: Array | None, batch: int, num_classes: int) -> Array | None:
    """Labels [B] int32 in [0, num_classes] (checked when concrete and num_classes > 0)."""
    if labels is None:
        return None
    labels = jnp.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be int [B] = [{batch}]; got dtype {labels.dtype}, shape {labels.shape}."
        )
    if num_classes > 0 and checks.is_concrete(labels):
        arr = np.asarray(labels)
        bad = arr[(arr < 0) | (arr > num_classes)]
        if bad.size:
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}] ({num_classes} = null label); "
                f"got {int(bad[0])!r}."
            )
    return labels.astype(jnp.int32)
