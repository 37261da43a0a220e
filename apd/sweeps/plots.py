"""The sweep's plots, from table.json (`apd.sweeps.table.build`).

- `fid_generation_vs_inpainting.png`: generation FID (x) against inpainting FID (y), one panel
  per mask family, one point per group and inpainting method with error bars (the table's
  interval), labelled; lower-left is better at both. An inpainting method other than the
  model's own plan (e.g. RePaint) sits at its model's generation FID. A panel `mean` plots the
  mean over families (`apd.sweeps.table.with_family_means`). When the groups differ in one
  numeric key (delta_max), a line joins the model's own points in the key's order: the
  trade-off curve.
- `vs_LABEL.png`, one per key swept over two or more values (except `seed`): each metric
  pattern (fnmatch over the summary names, e.g. `inpainting/*/apd/fid`) in a panel against the
  key's values, a line per matching metric and per combination of the other swept keys that the
  key does not determine.
"""

import fnmatch
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from apd.sweeps import hyper
from apd.sweeps.table import DEFAULT_METHOD, split_name

DEFAULT_METRICS = (
    "generation/fid",
    "generation/kid",
    "inpainting/*/apd/fid",
    "inpainting/*/apd/psnr",
    "likelihood/*/bits_per_dim",
)


def write_all(table: dict[str, Any], out_dir: str, metrics: Sequence[str]) -> list[str]:
    """Writes every plot that the table has data for; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "fid_generation_vs_inpainting.png")
    if fid_scatter(table, path):
        written.append(path)
    key_labels = hyper.labels(_swept_keys(table))
    for key in _swept_keys(table):
        values = {repr(g["overrides"][key]) for g in table["groups"] if key in g["overrides"]}
        if key == "seed" or len(values) < 2:
            continue
        path = os.path.join(out_dir, f"vs_{key_labels[key]}.png")
        if against_key(table, key, metrics, path):
            written.append(path)
    return written


def _swept_keys(table: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for group in table["groups"]:
        keys += [k for k in group["overrides"] if k not in keys]
    return keys


def _error(entry: dict[str, Any]) -> float:
    return entry["error"] if entry.get("error") is not None else 0.0


def fid_scatter(table: dict[str, Any], path: str) -> bool:
    families: list[str] = []
    methods: list[str] = []
    for name in table["metrics"]:
        if name.startswith("inpainting/") and name.endswith("/fid"):
            column, method, _ = split_name(name)
            families += [column] if column not in families else []
            methods += [method] if method not in methods else []
    groups = [g for g in table["groups"] if "generation/fid" in g["metrics"]]
    if not families or not groups:
        return False
    curve = _curve(groups)
    cols = min(3, len(families))
    rows = math.ceil(len(families) / cols)
    fig = Figure(figsize=(4.6 * cols, 4.0 * rows), layout="constrained")
    markers = "osD^v<>pX"
    for i, family in enumerate(families):
        ax = fig.add_subplot(rows, cols, i + 1)
        for g_index, group in enumerate(groups):
            gen = group["metrics"]["generation/fid"]
            for m_index, method in enumerate(methods):
                entry = group["metrics"].get(f"inpainting/{family}/{method}/fid")
                if entry is None:
                    continue
                label = (
                    group["name"] if method == DEFAULT_METHOD else f"{method} on {group['name']}"
                )
                ax.errorbar(
                    gen["mean"],
                    entry["mean"],
                    xerr=_error(gen),
                    yerr=_error(entry),
                    fmt=markers[m_index % len(markers)],
                    color=f"C{g_index % 10}",
                    capsize=3,
                    label=label,
                )
                ax.annotate(
                    label,
                    (gen["mean"], entry["mean"]),
                    fontsize=7,
                    alpha=0.8,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        if curve is not None:
            points = [
                (g["metrics"]["generation/fid"]["mean"], g["metrics"][name]["mean"])
                for g in curve
                if (name := f"inpainting/{family}/{DEFAULT_METHOD}/fid") in g["metrics"]
            ]
            ax.plot(*zip(*points, strict=True), color="0.6", lw=1, zorder=0)
        ax.set_xlabel("generation FID")
        ax.set_ylabel(f"{family} inpainting FID")
        ax.set_title(family)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Generation against inpainting FID ({table['interval']})", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def _curve(groups: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The groups in the order of their one swept numeric key, when they have one (besides
    `seed`) and two or more values of it; else None."""
    keys = {k for g in groups for k in g["overrides"]}
    if len(keys) != 1:
        return None
    (key,) = keys
    if len(groups) < 2 or not _numeric([g["overrides"].get(key) for g in groups]):
        return None
    return sorted(groups, key=lambda g: g["overrides"][key])


def _numeric(values: list[Any]) -> bool:
    """Whether every value is a number (bools are not), so that the values order a plot axis."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _determined_by(groups: list[dict[str, Any]], key: str, other: str) -> bool:
    """Whether each value of `key` comes with a single value of `other` over the groups."""
    seen: dict[str, Any] = {}
    for group in groups:
        x = repr(group["overrides"].get(key))
        y = group["overrides"].get(other)
        if x in seen and seen[x] != y:
            return False
        seen[x] = y
    return True


def _distinguishing(names: list[str]) -> dict[str, str]:
    """Each metric name shortened to the path components in which the names differ."""
    parts = [n.split("/") for n in names]
    if len(names) == 1 or len({len(p) for p in parts}) > 1:
        return {n: (n if len(names) > 1 else "") for n in names}
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    return {n: "/".join(p[i] for i in differ) for n, p in zip(names, parts, strict=True)}


def against_key(table: dict[str, Any], key: str, patterns: Sequence[str], path: str) -> bool:
    groups = [g for g in table["groups"] if key in g["overrides"] and g["metrics"]]
    panels = []
    for pattern in patterns:
        names = [m for m in table["metrics"] if fnmatch.fnmatchcase(m, pattern)]
        names = [m for m in names if any(m in g["metrics"] for g in groups)]
        if names:
            panels.append((pattern, names))
    if not groups or not panels:
        return False
    keys = _swept_keys(table)
    others = [k for k in keys if k not in (key, "seed") and not _determined_by(groups, key, k)]
    values = []
    for group in groups:
        value = group["overrides"][key]
        values += [value] if value not in values else []
    numeric = _numeric(values)
    if numeric:
        values.sort()
    position = {repr(v): (v if numeric else i) for i, v in enumerate(values)}
    key_labels = hyper.labels(keys)
    series: dict[str, list[dict[str, Any]]] = {}
    for group in groups:
        present = {k: v for k, v in group["overrides"].items() if k in others}
        series.setdefault(hyper.run_name(present, key_labels) if present else "", []).append(group)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows), layout="constrained")
    label = key_labels[key]
    for i, (pattern, names) in enumerate(panels):
        short = _distinguishing(names)
        ax = fig.add_subplot(rows, cols, i + 1)
        for s_label, members in series.items():
            members = sorted(members, key=lambda g: position[repr(g["overrides"][key])])
            for name in names:
                points = [(g, g["metrics"][name]) for g in members if name in g["metrics"]]
                if not points:
                    continue
                if not s_label and len(series) > 1:
                    s_label = "the config's values"  # the groups that set none of `others`
                line_label = ", ".join(p for p in (short[name], s_label) if p)
                ax.errorbar(
                    [position[repr(g["overrides"][key])] for g, _ in points],
                    [e["mean"] for _, e in points],
                    yerr=[_error(e) for _, e in points],
                    marker="o",
                    capsize=3,
                    label=line_label or None,
                )
        if not numeric:
            ax.set_xticks(
                range(len(values)),
                [hyper.name_value(v) for v in values],
                rotation=30,
                ha="right",
                fontsize=8,
            )
        ax.set_xlabel(label)
        ax.set_ylabel(pattern.rsplit("/", 1)[-1])
        ax.set_title(pattern, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Metrics against {label} ({table['interval']})", fontsize=10)
    fig.savefig(path, dpi=110)
    return True
