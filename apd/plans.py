"""Sampling plans: schedule fields giving every token its own level at every sampling step.

A plan is the discrete form of method.md §7's schedule field tau(u) in [0, 1]^N:

  levels  [S + 1, B, *tokens] float32 in [0, 1]: the level of each token before step 0, after
          step 0, ..., after step S - 1 (S steps, one network call each). Non-increasing along the
          step axis; size-1 axes broadcast (the synchronous plan is [S + 1, 1, 1, 1]).
  update  [B, *tokens] bool: False marks a known token, which the sampler never changes (its level
          is constant; at level 0 it is the given data bit for bit).

Step k moves token i from levels[k, i] to levels[k + 1, i]; every updated token ends at level 0.
Tokens whose level does not change in a step are left exactly as they are.

Two forms, one interface (`plan.at(k)`, `plan.levels`, `plan.steps`, `plan.shape`):

  compact       the standard plans (synchronous, inpaint, edit, autoregressive) store no level
                field. Token i's level after k steps is

                    level_i(k) = clip(scale_i * ramp[clip(k - start_i, 0, n)], 0, 1)

                with ramp [n + 1] non-increasing to ramp[n] = 0 (1 - j / n for the standard
                plans), scale [B, *tokens] the token's level before it starts moving, start
                [B, *tokens] int32 the step at which it starts (size-1 axes broadcast). `at(k)`
                computes one step's map inside the sampler's scan, so memory is
                O(B * tokens + n), not O(S * B * tokens).
  materialised  `levels` stored as an array: user fields (`from_array`) and `adaptive`.

`plan.levels` materialises a compact plan on demand (for plotting and statistics); the sampler
never does. Both forms give the same level maps bit for bit, so the sampler returns the same
samples for a compact plan and for `from_array(plan.levels, plan.update)`.

Constructors (pure; `grid` is an int n for an n x n token grid or a tuple such as (h, w)):

  synchronous(steps, batch, grid)            tau_i(u) = 1 - u.
  inpaint(mask, steps)                       known tokens (mask 1) at 0 throughout, not updated;
                                             the others 1 -> 0 linearly.
  edit(strength, steps)                      token i: strength_i -> 0 linearly; strength 0 kept.
  autoregressive(grid, batch, patches, ...)  groups (patches of a K x K grid) generated in order,
                                             each 1 -> 0 over its own window of steps.
  adaptive(uncertainty_fn, budget, start)    tokens with low difficulty take fewer, larger steps
                                             (one estimate at the start; the rule's two parts,
                                             `adaptive_counts` and `adaptive_advance`, also
                                             drive `run_sampler.Sampler.adaptive`, which
                                             re-estimates while sampling).
  from_array(levels, update=None)            a user-supplied field, validated.

`validate(plan)` raises ValueError naming the first offending step and token (compact plans are
checked without materialising their field).
`python -m apd.plans show --plan=NAME --out=FILE.png` draws a plan's level maps at a few steps.
"""

import argparse
import dataclasses
import functools
import math
import numbers
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from apd import checks

Array = jax.Array
Grid = tuple[int, ...]

ORDERS = ("raster", "random")
ALIGNS = ("end", "start")
# Plan kinds whose updated tokens all start at level 1 by construction.
STARTS_AT_NOISE = ("synchronous", "inpaint", "autoregressive")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["stored", "update", "scale", "start", "ramp"],
    meta_fields=["num_steps", "kind"],
)
@dataclasses.dataclass(frozen=True)
class Plan:
    """A schedule field, materialised (`stored`) or compact (`scale`, `start`, `ramp`, steps).

    `Plan(levels, update)` is a materialised plan. Compact plans come from the constructors.
    A pytree, so a plan passes through `jax.jit`: its arrays are traced; the step count S and
    `kind` (the constructor's name) are static.

    Attributes:
      stored: [S + 1, B, *tokens] float32 (size-1 axes broadcast), or None for a compact plan.
      update: [B, *tokens] bool.
      scale: compact only: [B, *tokens] float32 in [0, 1] (size-1 axes broadcast).
      start: compact only: [B, *tokens] int32 (size-1 axes broadcast).
      ramp: compact only: [n + 1] float32, non-increasing, ramp[n] = 0.
      num_steps: compact only: S.
      kind: 'synchronous', 'inpaint', 'edit', 'autoregressive', 'adaptive' or 'array'.
    """

    stored: Array | None
    update: Array
    scale: Array | None = None
    start: Array | None = None
    ramp: Array | None = None
    num_steps: int | None = None
    kind: str = "array"

    @property
    def compact(self) -> bool:
        """True when the level field is computed per step rather than stored."""
        return self.stored is None

    @property
    def steps(self) -> int:
        """S, the number of sampling steps (network calls)."""
        if self.compact:
            return self.num_steps
        return self.stored.shape[0] - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """(B, *tokens), the token shape of the samples."""
        return tuple(self.update.shape)

    @property
    def levels(self) -> Array:
        """[S + 1, B, *tokens] float32 (size-1 axes broadcast); materialised if compact."""
        if not self.compact:
            return self.stored
        ndim = len(self.shape)
        k = jnp.arange(self.steps + 1, dtype=jnp.int32).reshape(self.steps + 1, *(1,) * ndim)
        return self._compact_levels(k)

    def at(self, step: int | Array) -> Array:
        """The level map after `step` steps, [B, *tokens] float32; `step` may be traced."""
        if self.compact:
            k = jnp.asarray(step, jnp.int32).reshape((1,) * (1 + len(self.shape)))
            return jnp.broadcast_to(self._compact_levels(k)[0], self.shape)
        return jnp.broadcast_to(
            jax.lax.dynamic_index_in_dim(self.stored, step, keepdims=False), self.shape
        )

    def _compact_levels(self, k: Array) -> Array:
        """clip(scale * ramp[clip(k - start, 0, n)], 0, 1) for step indices k [K, 1, ..., 1].

        The outer clip is the identity on valid plans; it also keeps the product out of XLA's
        fused multiply-adds with the schedule's arithmetic in the sampler, so `at(k)` inside a
        compiled sampler equals the row of the materialised field bit for bit.
        """
        index = jnp.clip(k - self.start[None], 0, self.ramp.shape[0] - 1)
        return jnp.clip(self.scale[None] * jnp.take(self.ramp, index, mode="clip"), 0.0, 1.0)


def _compact(kind: str, update: Array, scale: Array, start: Array, ramp: Array, steps: int) -> Plan:
    return Plan(None, update, scale, start.astype(jnp.int32), ramp, steps, kind)


# ---------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------


def synchronous(steps: int, batch: int, grid: int | Sequence[int]) -> Plan:
    """Ordinary diffusion: every token at level 1 - k / S after k steps.

    Returns:
      A compact plan: levels [S + 1, 1, 1, ...] (broadcast over batch and tokens), update all
      True [B, *grid].
    """
    steps = checks.check_int("steps", steps, lo=1)
    batch = checks.check_int("batch", batch, lo=1)
    grid = checks.as_grid(grid)
    ones = (1,) * (1 + len(grid))
    return _compact(
        "synchronous",
        jnp.ones((batch, *grid), bool),
        jnp.ones(ones, jnp.float32),
        jnp.zeros(ones, jnp.int32),
        _ramp(steps),
        steps,
    )


def inpaint(mask: Array, steps: int) -> Plan:
    """Zero-shot inpainting: the known tokens stay clean, the others go 1 -> 0 linearly.

    Args:
      mask: [B, *tokens], 1 (or True) = known, 0 = to generate.
      steps: S >= 1.
    Returns:
      A compact plan: levels [S + 1, B, *tokens] = (1 - mask) * (1 - k / S); update =
      (mask == 0).
    """
    steps = checks.check_int("steps", steps, lo=1)
    known = _check_mask(mask)
    unknown = (~known).astype(jnp.float32)
    start = jnp.zeros((1,) * unknown.ndim, jnp.int32)
    return _compact("inpaint", ~known, unknown, start, _ramp(steps), steps)


def edit(strength: Array, steps: int) -> Plan:
    """Editing with a per-token strength map ("differential diffusion").

    The sampler starts each token from the image noised to its strength; strength 0 keeps the token
    exactly.

    Args:
      strength: [B, *tokens] float in [0, 1].
      steps: S >= 1.
    Returns:
      A compact plan: levels [S + 1, B, *tokens] = strength * (1 - k / S); update =
      (strength > 0).
    """
    steps = checks.check_int("steps", steps, lo=1)
    checks.check_levels(strength, "edit strength")
    strength = jnp.asarray(strength, jnp.float32)
    if strength.ndim < 2:
        raise ValueError(
            f"edit strength must be [B, *tokens] (at least 2 axes); got shape {strength.shape}."
        )
    start = jnp.zeros((1,) * strength.ndim, jnp.int32)
    return _compact("edit", strength > 0, strength, start, _ramp(steps), steps)


def autoregressive(
    grid: int | Sequence[int],
    batch: int,
    patches: int,
    steps_per_group: int,
    *,
    order: str | Array = "raster",
    overlap: int = 0,
    key: Array | None = None,
) -> Plan:
    """Patch-by-patch generation: groups of tokens denoised one after another (or overlapping).

    The token grid is cut into K patches per axis (K^d groups; token i of an axis of length n lies
    in patch floor(i * K / n)). The group generated r-th (its rank) starts at step r * stride,
    stride = steps_per_group - overlap, and goes 1 -> 0 linearly over steps_per_group steps:

        level(k) = clip(1 - (k - r * stride) / steps_per_group, 0, 1),
        S = (K^d - 1) * stride + steps_per_group.

    overlap = 0 is the paper's setting (group k pure noise before its window, clean after; raster
    over 8 x 8 patches at 16 steps each: 1024 steps); overlap > 0 is a rolling window in which a
    group starts `overlap` steps before the previous one finishes.

    Args:
      grid: the token grid.
      batch: B >= 1.
      patches: K, patches per axis, in [1, min(grid)].
      steps_per_group: steps of each group's window, >= 1.
      order: 'raster' (row-major patch index), 'random' (a permutation per sample, from `key`), or
        an int array [K^d] or [B, K^d], a permutation: order[r] is the group generated r-th.
      overlap: steps shared by consecutive windows, in [0, steps_per_group - 1].
      key: PRNG key, required for order='random' only.
    Returns:
      A compact plan: levels [S + 1, 1 or B, *grid] (1 when the order is shared by the batch),
      update all True.
    """
    grid = checks.as_grid(grid)
    batch = checks.check_int("batch", batch, lo=1)
    patches = checks.check_int("patches (K, patches per axis)", patches, lo=1, hi=min(grid))
    steps_per_group = checks.check_int("steps_per_group", steps_per_group, lo=1)
    overlap = checks.check_int("overlap", overlap, lo=0, hi=steps_per_group - 1)
    groups = patches ** len(grid)

    if isinstance(order, str):
        checks.check_choice("autoregressive order", order, ORDERS)
        if order == "raster":
            order = jnp.arange(groups, dtype=jnp.int32)[None]
        else:
            if key is None:
                raise ValueError("autoregressive order='random' needs a PRNG key; got key=None.")
            keys = jax.random.split(key, batch)
            order = jax.vmap(lambda k: jax.random.permutation(k, groups))(keys)
    order = _check_order(order, groups, batch)
    rank = jnp.argsort(order, axis=1)  # [Bo, G]: rank[b, g] = position of group g in the order

    stride = steps_per_group - overlap
    steps = (groups - 1) * stride + steps_per_group
    token_rank = jnp.take(rank, _group_index(grid, patches), axis=1)  # [Bo, *grid]
    return _compact(
        "autoregressive",
        jnp.ones((batch, *grid), bool),
        jnp.ones((1,) * (1 + len(grid)), jnp.float32),
        token_rank * stride,
        _ramp(steps_per_group),
        steps,
    )


def adaptive_counts(difficulty: Array, remaining: Array, budget: tuple[int, int]) -> Array:
    """The adaptive rule's step counts: how many more steps each token takes to reach level 0.

    A token of difficulty d in [0, 1] (0 = easy) is given n(d) = n_min + (n_max - n_min) d steps
    for the whole way from its start level; with a fraction `remaining` of that way still ahead,

        count = max(1, round(n(d) * remaining))     (0 where remaining = 0: the token is done).

    At the start (remaining 1) a token gets n(d) steps; recomputed midway with a new difficulty,
    the count covers only what is left (`adaptive_advance` then moves the token linearly to 0).
    Traceable.

    Args:
      difficulty: [B, *tokens] float32 in [0, 1].
      remaining: [B, *tokens] float32 in [0, 1]: the current level over the start level (the
        current level itself for tokens that start at 1); 0 for done or known tokens.
      budget: (n_min, n_max), ints, 1 <= n_min <= n_max.
    Returns:
      [B, *tokens] int32, >= 1 where remaining > 0, else 0.
    """
    n_min, n_max = budget
    n = n_min + (n_max - n_min) * jnp.asarray(difficulty, jnp.float32)
    count = jnp.maximum(jnp.round(n * remaining), 1.0).astype(jnp.int32)
    return jnp.where(remaining > 0, count, 0)


def adaptive_advance(levels: Array, counts: Array, align: str = "start") -> tuple[Array, Array]:
    """One step of the adaptive rule: each moving token goes a 1/count share of the way to 0.

    A token with count r > 0 moves from level t to t (r - 1) / r (exactly 0 when r = 1) and its
    count falls by one; a token with r = 0 is done and stays. align='start': every token with
    r > 0 moves (easy tokens finish early). align='end': a token moves only once its count has
    reached its image's largest count, so all tokens of an image finish at its last step (hard
    tokens start first; the others wait at their start level, seeing cleaner context). Either
    way an image's remaining steps are the largest count among its tokens. Traceable.

    Args:
      levels: [B, *tokens] float32 in [0, 1].
      counts: [B, *tokens] int32 >= 0 (`adaptive_counts`), 0 exactly where the token is done.
      align: 'start' or 'end'.
    Returns:
      (levels after the step, counts after the step), shaped like the inputs.
    """
    if align == "start":
        moves = counts > 0
    else:
        axes = tuple(range(1, counts.ndim))
        moves = (counts > 0) & (counts >= jnp.max(counts, axis=axes, keepdims=True))
    r = jnp.maximum(counts, 1).astype(jnp.float32)
    moved = levels * (r - 1.0) / r
    return jnp.where(moves, moved, levels), counts - moves.astype(counts.dtype)


def adaptive(
    uncertainty_fn: Callable[[Array], Array],
    budget: tuple[int, int],
    start: Array,
    *,
    align: str = "end",
) -> Plan:
    """A fixed uncertainty-guided schedule: one difficulty estimate, at the start (method.md §7).

    `uncertainty_fn(start)` gives each token a difficulty d_i in [0, 1] (0 = easy; e.g.
    `difficulty_from_log_error` of an uncertainty head's output); token i takes
    n_i = `adaptive_counts` = round(n_min + (n_max - n_min) d_i) steps, and the field follows
    `adaptive_advance` step by step (align: 'end' or 'start', per image). This is the rule of
    `run_sampler.Sampler.adaptive` with no re-estimation, as one materialised plan for a fixed
    batch: the plan has S = max_i n_i steps over the updated tokens of the whole batch, and the
    network runs on the whole batch at every step, so S, not the mean n_i, is its cost (an image
    that finishes early waits, clean, for the others). `Sampler.adaptive` runs the same rule
    with re-estimation and continuous batching, where a finished image stops costing calls.

    Eager: S depends on the difficulty values, so this runs outside `jax.jit`.

    Args:
      uncertainty_fn: start levels [B, *tokens] -> difficulty [B, *tokens] in [0, 1].
      budget: (n_min, n_max), 1 <= n_min <= n_max.
      start: [B, *tokens] float32 in [0, 1], the levels at step 0 (ones for generation, 1 - mask
        for inpainting, a strength map for editing). Tokens starting at 0 are known (not updated).
      align: 'end' or 'start'.
    Returns:
      A materialised plan: levels [S + 1, B, *tokens]; update = (start > 0).
    """
    checks.check_choice("adaptive align", align, ALIGNS)
    n_min, n_max = check_budget(budget)
    checks.check_levels(start, "adaptive start levels")
    start = jnp.asarray(start, jnp.float32)
    difficulty = jnp.asarray(uncertainty_fn(start), jnp.float32)
    if difficulty.shape != start.shape:
        raise ValueError(
            f"uncertainty_fn must return one difficulty per token, shape {start.shape}; got shape "
            f"{difficulty.shape}."
        )
    checks.check_levels(difficulty, "difficulty (uncertainty_fn output)")

    update = start > 0
    counts = adaptive_counts(difficulty, update.astype(jnp.float32), (n_min, n_max))
    steps = max(int(jnp.max(counts)), 1)
    levels = [start]
    for _ in range(steps):
        level, counts = adaptive_advance(levels[-1], counts, align)
        levels.append(level)
    return Plan(jnp.stack(levels), update, kind="adaptive")


def check_budget(budget) -> tuple[int, int]:
    """An adaptive budget (n_min, n_max) with 1 <= n_min <= n_max, as two ints."""
    if not (isinstance(budget, Sequence) and len(budget) == 2):
        raise ValueError(f"adaptive budget must be a pair (n_min, n_max); got {budget!r}.")
    n_min = checks.check_int("adaptive budget n_min", budget[0], lo=1)
    return n_min, checks.check_int("adaptive budget n_max", budget[1], lo=n_min)


def difficulty_from_log_error(
    log_error: Array,
    update: Array,
    *,
    low: float | None = None,
    high: float | None = None,
) -> Array:
    """Maps an uncertainty head's predicted log squared error to a difficulty in [0, 1].

    With `low` and `high` (a calibrated absolute range): clip((log_error - low) / (high - low)).
    A trained head records such a range in its head.json (`calibration`, written by
    `apd.train_uncertainty`), and `run_sampler.Sampler.adaptive` uses it by default. Without:
    min-max over each image's updated tokens (its easiest token 0, hardest 1), so every image's
    hardest token gets difficulty 1 and n_max steps.

    Args:
      log_error: [B, *tokens] float32.
      update: [B, *tokens] bool, the tokens to be generated.
      low, high: both or neither, low < high.
    Returns:
      [B, *tokens] float32 in [0, 1] (0 on tokens not updated).
    """
    log_error = jnp.asarray(log_error, jnp.float32)
    update = jnp.broadcast_to(jnp.asarray(update, bool), log_error.shape)
    if (low is None) != (high is None) or (low is not None and not low < high):
        raise ValueError(
            f"difficulty_from_log_error takes both low < high or neither; got low={low!r}, "
            f"high={high!r}."
        )
    if low is None:
        axes = tuple(range(1, log_error.ndim))
        lo = jnp.min(jnp.where(update, log_error, jnp.inf), axis=axes, keepdims=True)
        hi = jnp.max(jnp.where(update, log_error, -jnp.inf), axis=axes, keepdims=True)
        scaled = (log_error - lo) / jnp.where(hi > lo, hi - lo, 1.0)
    else:
        scaled = (log_error - low) / (high - low)
    return jnp.where(update, jnp.clip(scaled, 0.0, 1.0), 0.0)


def from_array(levels: Array, update: Array | None = None) -> Plan:
    """A plan from a user-supplied level field, validated.

    Args:
      levels: [S + 1, B, *tokens] float in [0, 1] (size-1 axes broadcast against `update`).
      update: [B, *tokens] bool; default levels[0] > 0 (tokens starting clean are known), with the
        shape of levels[0] (so pass it when levels has size-1 axes).
    Returns:
      The plan; ValueError (from `validate`) if it is not a valid schedule field.
    """
    levels = jnp.asarray(levels, jnp.float32)
    if levels.ndim < 3:
        raise ValueError(
            f"plan levels must be [S + 1, B, *tokens] (at least 3 axes); got shape {levels.shape}."
        )
    if update is None:
        update = levels[0] > 0
    plan = Plan(levels, jnp.asarray(update))
    validate(plan)
    return plan


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate(plan: Plan) -> None:
    """Raises ValueError if `plan` is not a valid schedule field.

    Checks, in order: shapes (levels [S + 1, ...] with S >= 1 broadcasting to update [B, *tokens],
    update boolean), every level finite and in [0, 1], non-increasing along the steps, final level
    0 for updated tokens, constant levels for known tokens. Each message names the first offending
    step and token (its index in [B, *tokens]) and value. Values are checked only when concrete.

    A compact plan is checked without materialising its field: its levels are non-increasing and
    in [0, 1] when its ramp is non-increasing and in [0, 1] and its scale lies in [0, 1]; the
    endpoint conditions then need only the maps at steps 0 and S (a known token whose level
    changes is reported at step S).
    """
    update = plan.update
    if jnp.ndim(update) < 1 or jnp.result_type(update) != jnp.bool_:
        raise ValueError(
            f"plan update must be a boolean array [B, *tokens]; got dtype "
            f"{jnp.result_type(update)} and shape {jnp.shape(update)}."
        )
    if plan.compact:
        _validate_compact(plan)
        return
    levels = plan.stored
    shape = tuple(jnp.shape(update))
    lshape = tuple(jnp.shape(levels))
    broadcasts = len(lshape) == len(shape) + 1 and _fits(lshape[1:], shape)
    if not broadcasts or lshape[0] < 2:
        raise ValueError(
            f"plan levels of shape {lshape} do not fit update of shape {shape}: expected "
            f"[S + 1, {', '.join(map(str, shape))}] with S >= 1 (size-1 axes broadcast)."
        )
    if not jnp.issubdtype(jnp.result_type(levels), jnp.floating):
        raise ValueError(f"plan levels must be floating point; got {jnp.result_type(levels)}.")
    if not (checks.is_concrete(levels) and checks.is_concrete(update)):
        return

    lv = np.broadcast_to(np.asarray(levels), (lshape[0], *shape))
    up = np.asarray(update)
    _first_bad(~((lv >= 0.0) & (lv <= 1.0)), lv, "levels must lie in [0, 1] (finite)")
    _first_bad(
        np.concatenate([np.zeros_like(lv[:1], bool), lv[1:] > lv[:-1]]),
        lv,
        "levels must be non-increasing along the steps (a token's level never rises)",
    )
    _first_bad(
        (up & (lv[-1] != 0.0))[None],
        lv[-1:],
        "updated tokens must end at level 0",
        offset=lshape[0] - 1,
    )
    _first_bad(
        np.concatenate([np.zeros_like(lv[:1], bool), ~up[None] & (lv[1:] != lv[:1])]),
        lv,
        "known tokens (update False) must keep a constant level",
    )


def _validate_compact(plan: Plan) -> None:
    shape = plan.shape
    steps = plan.num_steps
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"a compact plan needs num_steps S >= 1; got {steps!r}.")
    for name, value, kind in (
        ("scale", plan.scale, jnp.floating),
        ("start", plan.start, jnp.integer),
    ):
        if value is None or jnp.ndim(value) != len(shape) or not _fits(jnp.shape(value), shape):
            raise ValueError(
                f"compact plan {name} of shape {jnp.shape(value)} does not fit update of shape "
                f"{shape}: expected [{', '.join(map(str, shape))}] (size-1 axes broadcast)."
            )
        if not jnp.issubdtype(jnp.result_type(value), kind):
            raise ValueError(
                f"compact plan {name} must be {kind.__name__}; got {jnp.result_type(value)}."
            )
    ramp = plan.ramp
    if ramp is None or jnp.ndim(ramp) != 1 or jnp.shape(ramp)[0] < 2:
        raise ValueError(
            f"compact plan ramp must be [n + 1] with n >= 1; got shape {jnp.shape(ramp)}."
        )
    if not jnp.issubdtype(jnp.result_type(ramp), jnp.floating):
        raise ValueError(f"compact plan ramp must be floating point; got {jnp.result_type(ramp)}.")
    leaves = (plan.update, plan.scale, plan.start, ramp)
    if not all(checks.is_concrete(leaf) for leaf in leaves):
        return

    r = np.asarray(ramp)
    bad = np.flatnonzero(~((r >= 0.0) & (r <= 1.0)) | np.concatenate([[False], r[1:] > r[:-1]]))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"invalid plan: the compact ramp must lie in [0, 1] (finite) and be non-increasing; "
            f"ramp[{j}] = {float(r[j])!r}" + (f" after {float(r[j - 1])!r}." if j else ".")
        )
    scale = np.broadcast_to(np.asarray(plan.scale), shape)
    bad = np.argwhere(~((scale >= 0.0) & (scale <= 1.0)))
    if bad.size:
        token = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"invalid plan: the compact scale (a token's level before it moves) must lie in "
            f"[0, 1] (finite); got {float(scale[token])!r} at token {token} (index into "
            f"[B, *tokens])."
        )
    # Levels are now non-increasing, so the endpoint maps decide the rest.
    first, last = np.asarray(plan.at(0)), np.asarray(plan.at(steps))
    update = np.asarray(plan.update)
    _first_bad(
        (update & (last != 0.0))[None], last[None], "updated tokens must end at level 0", steps
    )
    _first_bad(
        (~update & (last != first))[None],
        last[None],
        "known tokens (update False) must keep a constant level (it changes by the last step)",
        steps,
    )


def _fits(got: Sequence[int], shape: Sequence[int]) -> bool:
    """True when an array of shape `got` broadcasts to `shape` with the same number of axes."""
    return len(got) == len(shape) and all(g in (1, n) for g, n in zip(got, shape, strict=True))


def _first_bad(bad: np.ndarray, values: np.ndarray, what: str, offset: int = 0) -> None:
    """Raises naming the first (step, token) where `bad` [S', B, *tokens] is True."""
    if not bad.any():
        return
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    step, token = index[0] + offset, index[1:]
    raise ValueError(
        f"invalid plan: {what}; level {float(values[index])!r} at step {step}, token {token} "
        f"(index into [B, *tokens])."
    )


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _ramp(steps: int) -> Array:
    """[S + 1] float32: 1 - k / S, exactly 1 at k = 0 and 0 at k = S."""
    return 1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps


def _group_index(grid: Grid, patches: int) -> Array:
    """[*grid] int32: the row-major index of the patch holding each token."""
    index = jnp.zeros(grid, jnp.int32)
    for axis, n in enumerate(grid):
        shape = [1] * len(grid)
        shape[axis] = n
        patch = (jnp.arange(n, dtype=jnp.int32) * patches) // n
        index = index * patches + patch.reshape(shape)
    return index


def _check_mask(mask: Array) -> Array:
    """A 0/1 or boolean mask [B, *tokens] -> bool, True = known."""
    checks.check_mask(mask, 2, "inpaint mask", form="[B, *tokens]", zero="generate", one="known")
    return jnp.asarray(mask) != 0


def _check_order(order: Array, groups: int, batch: int) -> Array:
    """An order [G] or [B, G] -> int32 [1 or B, G], checked to be permutations of range(G)."""
    order = jnp.asarray(order)
    if order.ndim == 1:
        order = order[None]
    if order.ndim != 2 or order.shape[1] != groups or order.shape[0] not in (1, batch):
        raise ValueError(
            f"autoregressive order must be 'raster', 'random' or a permutation array of shape "
            f"[{groups}] or [{batch}, {groups}] (K^d groups); got shape {order.shape}."
        )
    if not jnp.issubdtype(order.dtype, jnp.integer):
        raise ValueError(f"autoregressive order must hold integers; got dtype {order.dtype}.")
    if checks.is_concrete(order):
        arr = np.asarray(order)
        ok = np.sort(arr, axis=1) == np.arange(groups)[None]
        if not ok.all():
            row = int(np.argwhere(~ok)[0, 0])
            raise ValueError(
                f"autoregressive order row {row} is not a permutation of range({groups}): "
                f"{arr[row].tolist()!r}."
            )
    return order.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Command line: python -m apd.plans show --plan=NAME --out=FILE.png
# ---------------------------------------------------------------------------------------------


def _demo_plan(args: argparse.Namespace) -> Plan:
    """The plan the `show` command draws, for a one-image batch."""
    grid = checks.as_grid(args.grid)
    coords = jnp.meshgrid(*(jnp.linspace(-1.0, 1.0, n) for n in grid), indexing="ij")
    radius = jnp.sqrt(sum(jnp.square(c) for c in coords)) / math.sqrt(len(grid))
    if args.plan == "synchronous":
        return synchronous(args.steps, 1, grid)
    if args.plan == "inpaint":
        known = jnp.max(jnp.stack([jnp.abs(c) for c in coords]), axis=0) > 0.5  # centre box unknown
        return inpaint(known[None], args.steps)
    if args.plan == "edit":
        return edit(jnp.clip(1.0 - radius, 0.0, 1.0)[None], args.steps)
    if args.plan == "autoregressive":
        key = jax.random.key(args.seed) if args.order == "random" else None
        return autoregressive(
            grid,
            1,
            args.patches,
            args.steps_per_group,
            order=args.order,
            overlap=args.overlap,
            key=key,
        )
    # adaptive: tokens far from the centre are easy.
    difficulty = jnp.clip(1.0 - radius, 0.0, 1.0)[None]
    return adaptive(
        lambda start: difficulty,
        (max(1, args.steps // 4), args.steps),
        jnp.ones((1, *grid), jnp.float32),
        align=args.align,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`show`: writes a PNG strip of a plan's level maps (white = noise), one column per step."""
    parser = argparse.ArgumentParser(prog="python -m apd.plans", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="draw a plan's level maps at a few steps")
    show.add_argument(
        "--plan",
        required=True,
        choices=["synchronous", "inpaint", "edit", "autoregressive", "adaptive"],
    )
    show.add_argument("--grid", type=int, default=32, help="tokens per side")
    show.add_argument("--steps", type=int, default=16, help="steps (not autoregressive)")
    show.add_argument("--patches", type=int, default=4, help="autoregressive: K patches per side")
    show.add_argument("--steps-per-group", type=int, default=4, help="autoregressive window")
    show.add_argument("--order", default="raster", choices=list(ORDERS))
    show.add_argument("--overlap", type=int, default=0)
    show.add_argument("--align", default="end", choices=list(ALIGNS), help="adaptive alignment")
    show.add_argument("--seed", type=int, default=0, help="random autoregressive order")
    show.add_argument("--columns", type=int, default=8, help="number of steps shown")
    show.add_argument("--out", required=True, help="output PNG path")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        plan = _demo_plan(args)
    except ValueError as err:
        parser.error(str(err))
    shown = np.unique(np.linspace(0, plan.steps, max(2, args.columns)).round().astype(int))
    fig, axes = plt.subplots(1, len(shown), figsize=(1.6 * len(shown), 1.9), squeeze=False)
    for ax, step in zip(axes[0], shown, strict=True):
        level_map = np.asarray(plan.at(int(step))[0])
        ax.imshow(level_map.reshape(level_map.shape[0], -1), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(f"step {step}/{plan.steps}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{args.plan} plan: level per token (white = noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
