"""Eager input checks shared by the public API.

Public functions call these before any work. A check inspects values only when they are concrete
(a NumPy array or a committed jax.Array): under `jax.jit` the values are tracers and only shapes are
checked, so the same functions stay jit-compatible.
"""

import numbers
from collections.abc import Sequence

import jax
import numpy as np


def is_concrete(x) -> bool:
    """True when `x` holds values that can be read on the host (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_levels(levels, name: str = "levels") -> None:
    """Raises ValueError if a concrete level array has values outside [0, 1] or NaNs."""
    if not is_concrete(levels):
        return
    arr = np.asarray(levels)
    if arr.size == 0:
        return
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        bad = arr[~((arr >= 0.0) & (arr <= 1.0))].ravel()[0]
        raise ValueError(
            f"{name} must lie in [0, 1] (0 = clean, 1 = pure noise); got a value {bad!r} "
            f"(min {lo!r}, max {hi!r}) in an array of shape {arr.shape}."
        )


def check_level_shape(levels_shape: Sequence[int], x_shape: Sequence[int]) -> None:
    """Levels carry one value per token: x's shape without its trailing channel axis.

    Size-1 axes broadcast, so a per-sample level [B, 1, 1] serves x [B, H, W, C].
    """
    levels_shape, x_shape = tuple(levels_shape), tuple(x_shape)
    tokens = x_shape[:-1]
    ok = len(levels_shape) == len(tokens) and all(
        lv in (1, xv) for lv, xv in zip(levels_shape, tokens, strict=True)
    )
    if not ok:
        raise ValueError(
            f"levels of shape {levels_shape} do not match data of shape {x_shape}: expected one "
            f"level per token, shape {tokens} (x without its channel axis; size-1 axes broadcast)."
        )


def check_mask(
    mask,
    shape: Sequence[int] | int,
    what: str,
    *,
    form: str = "a pixel mask [B, H, W]",
    zero: str = "hole",
    one: str = "known pixel",
    optional: bool = False,
) -> None:
    """Raises ValueError unless `mask` is a binary mask: 1 = `one`, 0 = `zero`.

    Args:
      mask: array-like of any numeric or bool dtype; its values are checked only when concrete.
      shape: the exact shape, or an int n: any shape of at least n axes.
      what: the mask's name in messages, e.g. "encode: known".
      form: the expected layout in messages, e.g. "[B, *tokens]".
      zero, one: what 0 and 1 mean, in messages.
      optional: None passes (and the shape message says so).
    """
    if optional and mask is None:
        return
    actual = tuple(np.shape(mask))
    if isinstance(shape, numbers.Integral):
        ok, expected = len(actual) >= shape, f"{form} of at least {shape} axes"
    else:
        ok, expected = actual == tuple(shape), f"{form} = {tuple(shape)}"
    if not ok:
        raise ValueError(
            f"{what} must be {expected} (1 = {one}, 0 = {zero})"
            f"{' or None' if optional else ''}; got shape {actual}."
        )
    if is_concrete(mask):
        arr = np.asarray(mask)
        bad = arr[(arr != 0) & (arr != 1)]
        if bad.size:
            raise ValueError(
                f"{what} must hold only 0 ({zero}) and 1 ({one}); got a value "
                f"{bad.ravel()[0].item()!r}."
            )


def check_int(what: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int; ValueError naming `what` unless it is an integer (not a bool) in
    [lo, hi] (either bound None: open)."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{what} must be an integer{bounds}; got {value!r}.")
    return int(value)


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    """Raises ValueError naming the bad value and the valid choices."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; expected one of {sorted(choices)}.")


def as_grid(grid: int | Sequence[int]) -> tuple[int, ...]:
    """The token grid as a tuple: n -> (n, n), (h, w) -> (h, w); ValueError if not positive ints."""
    dims = (grid, grid) if isinstance(grid, numbers.Integral) else grid
    ok = isinstance(dims, Sequence) and len(dims) >= 1
    ok = ok and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in dims)
    if not ok or min(dims) < 1:
        raise ValueError(
            f"grid must be a positive int n (an n x n token grid) or a non-empty tuple of positive "
            f"ints such as (h, w); got {grid!r}."
        )
    return tuple(int(n) for n in dims)
