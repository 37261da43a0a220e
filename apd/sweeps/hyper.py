"""Sweep declarations: the `get_hyper(hyper)` combinators and the names of the points.

An experiment config declares its sweep beside `get_config(arg)`, in the convention of Google's
JAX research code for XManager sweeps:

    def get_hyper(h):
        return h.product([
            h.sweep("levels.params.delta_max", [0.0, 0.25, 0.5]),
            h.sweep("seed", [0, 1, 2]),
        ])

Each combinator returns a list of points, a point being a dict {key: value}:

- `sweep(key, values)`: one point per value.
- `fixed(key, value)`: one point.
- `product([a, b, ...])`: every combination (a's points outermost); the factors' keys must differ.
- `zipit([a, b, ...])`: the i-th points of equally long sweeps merged (keys must differ).
- `chainit([a, b, ...])`: the points of a, then those of b, ... (the points may have other keys).

Keys are config paths (`levels.params.delta_max`, `seed`, `evaluate.steps`), passed to the
binaries as `--config.KEY=VALUE`, or `:NAME` for an argument of the config file's `:ARGS`
(`:sampler` -> `--config=experiments/X.py:sampler=perlin`). Values are bools, ints, floats,
strings or tuples of them (a list becomes a tuple, as config tuples expect).

A point's run name is made from its overrides, sorted by label: `delta_max=0.25,seed=1`. The
label of a key is its last path component (`:sampler` -> `sampler`), or the whole key where two
keys of the sweep share a last component. Values are written filesystem-safe (tuples joined by
`_`; characters other than letters, digits and `.+-_` become `-`); a point without overrides is
named `base`. Names depend only on the point's overrides and the sweep's keys.
"""

import difflib
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = dict[str, Any]

ARG_PREFIX = ":"
BASE_NAME = "base"
_KEY = re.compile(r"^(:[A-Za-z_]\w*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+_-]")


class Hyper:
    """The combinators `get_hyper(hyper)` receives; every method returns a list of points."""

    def sweep(self, key: str, values: Iterable[Any]) -> list[Point]:
        _check_key(key)
        if isinstance(values, str | bytes | Mapping) or not isinstance(values, Iterable):
            raise ValueError(
                f"hyper.sweep({key!r}, ...) takes a sequence of values (list, tuple, range); "
                f"got {values!r}."
            )
        values = list(values)
        if not values:
            raise ValueError(f"hyper.sweep({key!r}, ...) got no values.")
        points = [{key: check_value(key, v)} for v in values]
        seen: list[Any] = []
        for point in points:
            if point[key] in seen:
                raise ValueError(f"hyper.sweep({key!r}, ...) repeats the value {point[key]!r}.")
            seen.append(point[key])
        return points

    def fixed(self, key: str, value: Any) -> list[Point]:
        _check_key(key)
        return [{key: check_value(key, value)}]

    def product(self, sweeps: Sequence[list[Point]]) -> list[Point]:
        sweeps = _check_sweeps("product", sweeps)
        out: list[Point] = [{}]
        for factor in sweeps:
            out = [_merge("product", a, b) for a in out for b in factor]
        return out

    def zipit(self, sweeps: Sequence[list[Point]]) -> list[Point]:
        sweeps = _check_sweeps("zipit", sweeps)
        lengths = [len(s) for s in sweeps]
        if len(set(lengths)) > 1:
            raise ValueError(
                f"hyper.zipit needs sweeps of one length; got lengths {lengths} (keys "
                f"{[sorted(s[0]) for s in sweeps]})."
            )
        out = []
        for parts in zip(*sweeps, strict=True):
            point: Point = {}
            for part in parts:
                point = _merge("zipit", point, part)
            out.append(point)
        return out

    def chainit(self, sweeps: Sequence[list[Point]]) -> list[Point]:
        sweeps = _check_sweeps("chainit", sweeps)
        return [dict(p) for s in sweeps for p in s]


def expand(get_hyper, where: str) -> list[Point]:
    """Calls `get_hyper(Hyper())` and checks its result: a non-empty list of distinct points."""
    points = get_hyper(Hyper())
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ValueError(
            f"get_hyper of {where} must return a list of points (dicts), e.g. "
            f"hyper.product([...]); got {type(points).__name__}."
        )
    if not points:
        raise ValueError(f"get_hyper of {where} returned no points.")
    for i, point in enumerate(points):
        for j in range(i):
            if points[j] == point:
                raise ValueError(f"get_hyper of {where} declares the point {point} twice.")
    return points


def check_value(key: str, value: Any) -> Any:
    """A sweep value as the binaries take it: bool, int, float, str or a tuple of them."""
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(value, tuple):
        if any(isinstance(item, tuple | list) for item in value):
            raise ValueError(
                f"sweep value of {key!r}: nested sequences are not supported; got {value!r}."
            )
        return tuple(check_value(key, item) for item in value)
    if isinstance(value, bool | str):
        if isinstance(value, str) and ("\n" in value or not value):
            raise ValueError(
                f"sweep value of {key!r} must be a non-empty one-line string; got {value!r}."
            )
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"sweep value of {key!r} must be finite; got {value!r}.")
        return float(value)
    raise ValueError(
        f"sweep value of {key!r} must be a bool, int, float, str or a tuple of them; got "
        f"{value!r} ({type(value).__name__})."
    )


def is_arg(key: str) -> bool:
    """Whether a key names an argument of the config file's `:ARGS` (`:sampler`)."""
    return key.startswith(ARG_PREFIX)


def labels(keys: Iterable[str]) -> dict[str, str]:
    """key -> its label in run names: the last path component, or the whole key (`:` -> `arg.`)
    where two keys share a last component."""
    keys = sorted(set(keys))
    short = {k: k.removeprefix(ARG_PREFIX).rsplit(".", 1)[-1] for k in keys}
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {
        k: short[k] if counts[short[k]] == 1 else k.replace(ARG_PREFIX, "arg.", 1) for k in keys
    }


def run_name(point: Point, key_labels: Mapping[str, str]) -> str:
    """The point's run name: `label=value` pairs sorted by label, joined by `,`."""
    if not point:
        return BASE_NAME
    parts = sorted((key_labels[k], name_value(v)) for k, v in point.items())
    return ",".join(f"{label}={value}" for label, value in parts)


def run_names(points: Sequence[Point]) -> list[str]:
    """The run names of a sweep's points; ValueError if two points get one name."""
    key_labels = labels(k for p in points for k in p)
    names = [run_name(p, key_labels) for p in points]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise ValueError(
                f"the points {points[first[name]]} and {points[i]} get the same run name "
                f"{name!r}: make their values differ after rounding to file-name characters."
            )
        first[name] = i
    return names


def name_value(value: Any) -> str:
    """A value as written in run names."""
    if isinstance(value, tuple):
        return "_".join(name_value(v) for v in value) if value else "empty"
    return _UNSAFE.sub("-", str(value))


def cli_value(value: Any) -> str:
    """A value as `--config.KEY=VALUE` takes it (config_flags parses tuples as literals)."""
    return repr(value) if isinstance(value, tuple) else str(value)


def arg_value(key: str, value: Any) -> str:
    """A value as the config file's `:ARGS` take it (`common.parse_arg`: name=value, commas
    between arguments, booleans true/false)."""
    if isinstance(value, tuple):
        raise ValueError(f"sweep key {key!r} is a config argument: tuples are not supported.")
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "," in text or "=" in text or ":" in text:
        raise ValueError(
            f"sweep value {value!r} of config argument {key!r} must not contain ',', '=' or ':'."
        )
    return text


def closest(key: str, valid: Iterable[str]) -> str:
    """' (closest: X)' for the valid key nearest to `key`, or '' when none is near."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (closest: {match[0]!r})" if match else ""


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(
            f"sweep key {key!r} must be a config path (e.g. 'levels.params.delta_max', 'seed') "
            f"or {ARG_PREFIX}NAME for a config argument (e.g. ':sampler')."
        )


def _check_sweeps(what: str, sweeps: Any) -> list[list[Point]]:
    if not isinstance(sweeps, Sequence) or isinstance(sweeps, str) or not sweeps:
        raise ValueError(f"hyper.{what} takes a non-empty list of sweeps; got {sweeps!r}.")
    for s in sweeps:
        if not isinstance(s, list) or not s or not all(isinstance(p, dict) for p in s):
            raise ValueError(
                f"hyper.{what} takes sweeps made by hyper.sweep/fixed/product/zipit/chainit "
                f"(non-empty lists of points); got {s!r}."
            )
    return list(sweeps)


def _merge(what: str, a: Point, b: Point) -> Point:
    both = set(a) & set(b)
    if both:
        raise ValueError(f"hyper.{what}: the key(s) {sorted(both)} are swept twice.")
    return {**a, **b}
