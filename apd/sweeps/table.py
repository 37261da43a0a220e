"""A sweep's table: every metric of every point, over training seeds where the sweep has them.

Each run's value of a metric is its evaluation summary's mean over evaluation seeds
(`results.json`, `summary[NAME].mean`). Runs that differ only in the swept key `seed` form a
group; a group's entry is the mean over its runs with a 95% Student-t interval
(mean +- t(0.975, n - 1) s / sqrt(n), s the sample standard deviation over runs). A group of one
run reports that run's spread over evaluation seeds (the summary's std) instead.

Metric names are those of the summaries: `EVALUATOR/METRIC` (generation),
`EVALUATOR/SETTING/METRIC` (likelihood paths) and `EVALUATOR/SETTING/METHOD/METRIC` (inpainting
families and methods). To these each run adds `inpainting/mean/METHOD/METRIC` for the quality
metrics (FAMILY_MEAN_METRICS) of a method evaluated on two or more mask families: the mean over
the families, per evaluation seed (so its interval over training seeds is that of the runs'
family means, not a combination of the families' intervals). table.md has one table per METRIC:
a row per group and method (`apd`, the model's own plan, is the group's row; another method M is
the row `M on GROUP`), a column per evaluator setting.

Methods evaluated on the same runs (sampling settings, RePaint on the synchronous model) are also
compared in pairs: a group's `paired` entries are, per run, a method's value minus the default
method's (apd for inpainting, ddim for generation) on that run, aggregated over the runs the same
way. The trained models' spread cancels in a paired difference, so its interval answers "does
this setting change the result on these models" far more tightly than two overlapping groups.
"""

import math
from collections.abc import Sequence
from typing import Any

from apd.evaluation import protocol
from apd.sweeps import hyper

DEFAULT_METHOD = "apd"
FAMILY_MEAN = "mean"  # the column of the mean over mask families
FAMILY_MEAN_METRICS = ("fid", "kid", "psnr", "ssim", "lpips")


def t_quantile(df: int, p: float = 0.975) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (exact for integer df: the
    closed-form CDF of Abramowitz & Stegun 26.7.3-4, inverted by bisection)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1; got {df!r}.")
    if not 0.5 < p < 1.0:
        raise ValueError(f"p must be in (0.5, 1); got {p!r}.")
    target = 2.0 * p - 1.0  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    total, term = 1.0, 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...)
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def aggregate(values: Sequence[float], eval_std: float | None) -> dict[str, Any]:
    """A group's entry of one metric from its runs' values (means over evaluation seeds)."""
    n = len(values)
    mean = math.fsum(values) / n
    entry: dict[str, Any] = {"mean": mean, "n": n, "values": list(values)}
    if n > 1:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(n - 1) * std / math.sqrt(n)
        entry |= {"std": std, "ci95": [mean - half, mean + half], "error": half}
    else:
        entry |= {"std": None, "ci95": None, "eval_std": eval_std, "error": eval_std}
    return entry


def split_name(metric: str) -> tuple[str, str, str]:
    """Summary name -> (column, method, metric): 'inpainting/wide/repaint/fid' -> ('wide',
    'repaint', 'fid'); 'generation/fid' -> ('generation', 'apd', 'fid'); 'generation/ddim_cfg2/
    fid' -> ('generation', 'ddim_cfg2', 'fid'); 'likelihood/raster/bits_per_dim' -> ('raster',
    'apd', 'bits_per_dim')."""
    parts = metric.split("/")
    if len(parts) == 2:
        return parts[0], DEFAULT_METHOD, parts[1]
    if len(parts) == 3 and parts[0] == "generation":
        return parts[0], parts[1], parts[2]
    if len(parts) == 3:
        return parts[1], DEFAULT_METHOD, parts[2]
    return parts[1], "/".join(parts[2:-1]), parts[-1]


def with_family_means(summary: dict[str, dict]) -> dict[str, dict]:
    """The summary with `inpainting/mean/METHOD/METRIC` added for each inpainting method and
    metric of FAMILY_MEAN_METRICS on two or more families with the same evaluation seeds."""
    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name, entry in summary.items():
        parts = name.split("/")
        if (
            len(parts) == 4
            and parts[0] == "inpainting"
            and parts[1] != FAMILY_MEAN
            and parts[3] in FAMILY_MEAN_METRICS
        ):
            families.setdefault((parts[2], parts[3]), []).append(entry)
    out = dict(summary)
    for (method, metric), entries in families.items():
        seeds = entries[0]["seeds"]
        if len(entries) < 2 or any(e["seeds"] != seeds for e in entries):
            continue
        pairs = [
            (seed, math.fsum(e["values"][i] for e in entries) / len(entries))
            for i, seed in enumerate(seeds)
        ]
        out[f"inpainting/{FAMILY_MEAN}/{method}/{metric}"] = protocol.summary_entry(pairs)
    return out


def baseline_name(metric: str) -> str | None:
    """The same metric of the evaluator's default method, which another method of the same run is
    paired with: 'inpainting/wide/apd_ig1/psnr' -> 'inpainting/wide/apd/psnr', 'generation/
    ddim_cfg2/fid' -> 'generation/fid'; None for a default method's own metric, or one that a
    difference says nothing about (calls, the known pixels' error)."""
    column, method, name = split_name(metric)
    if method == DEFAULT_METHOD or name not in FAMILY_MEAN_METRICS:
        return None
    parts = metric.split("/")
    if parts[0] == "generation":
        return f"generation/{name}"
    if parts[0] == "inpainting":
        return f"inpainting/{column}/{DEFAULT_METHOD}/{name}"
    return None


def paired_differences(
    summaries: Sequence[dict[str, dict]], metric_names: Sequence[str]
) -> dict[str, dict]:
    """Per metric of a non-default method: the aggregate over the runs (their summaries, each
    with family means) of its value minus its baseline's on the same run. Settings compared on
    the same trained models differ by much less than the models do; pairing removes the models'
    spread from the interval."""
    out = {}
    for metric in metric_names:
        base = baseline_name(metric)
        if base is None:
            continue
        diffs = [
            s[metric]["mean"] - s[base]["mean"] for s in summaries if metric in s and base in s
        ]
        if diffs:
            out[metric] = aggregate(diffs, None)
    return out


def build(runs: Sequence[Any], results: dict[str, dict]) -> dict[str, Any]:
    """table.json: the groups of the sweep's runs (`plan.Run`s, in sweep order) with every metric
    of the runs that have results (run name -> results.json)."""
    key_labels = hyper.labels(k for r in runs for k in r.point)
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = hyper.run_name(run.group, key_labels) if run.group else "all"
        group = groups.setdefault(
            label,
            {
                "name": label,
                "overrides": run.group,
                "runs": [],
                "seeds": [],
                "steps": [],  # the evaluated steps of its runs, each once
                "missing": [],
            },
        )
        if run.name not in results:
            group["missing"].append(run.name)
            continue
        group["runs"].append(run.name)
        group["seeds"].append(run.point.get("seed", run.config.seed))
        step = results[run.name]["step"]
        if step not in group["steps"]:
            group["steps"].append(step)
    summaries = {name: with_family_means(record["summary"]) for name, record in results.items()}
    metric_names: list[str] = []
    for summary in summaries.values():
        metric_names += [m for m in summary if m not in metric_names]
    for group in groups.values():
        group["metrics"] = {}
        for metric in metric_names:
            entries = [summaries[name].get(metric) for name in group["runs"]]
            entries = [e for e in entries if e is not None]
            if entries:
                eval_std = entries[0].get("std") if len(entries) == 1 else None
                group["metrics"][metric] = aggregate([e["mean"] for e in entries], eval_std)
        group["paired"] = paired_differences(
            [summaries[name] for name in group["runs"]], metric_names
        )
    first = next(iter(results.values()), None)
    seeded = any(len(g["runs"]) > 1 for g in groups.values())
    steps = {r["step"] for r in results.values()}
    return {
        "groups": list(groups.values()),
        "metrics": metric_names,
        # The evaluated step when every run has the same one; else None (each group's "steps").
        "step": steps.pop() if len(steps) == 1 else None,
        "evaluate": None if first is None else first["provenance"]["evaluate"],
        "features": None if first is None else first["provenance"].get("features"),
        "interval": "95% t-interval over training seeds" if seeded else "std over evaluation seeds",
    }


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    digits = 2 if abs(entry["mean"]) >= 1 else 4
    out = f"{entry['mean']:.{digits}f}"
    if entry.get("error") is not None:
        out += f" ± {entry['error']:.{digits}f}"
    return out


def _caption(table: dict[str, Any]) -> str:
    ev = table["evaluate"] or {}
    if table["step"] is not None or not table["groups"]:
        parts = [f"Step {table['step']}"]
    else:
        steps = [
            f"{g['name']} {'/'.join(str(n) for n in g['steps'])}"
            for g in table["groups"]
            if g.get("steps")
        ]
        parts = ["Steps " + ", ".join(steps)]
    if "seeds" in ev:
        parts.append(f"evaluation seeds {list(ev['seeds'])}")
    evaluators = ev.get("evaluators", ())
    if "generation" in evaluators:
        parts.append(f"{ev['generation']['num_samples']} generated samples")
    if "inpainting" in evaluators:
        inp = ev["inpainting"]
        parts.append(f"{inp['num_images']} test images per mask family")
    if "steps" in ev:
        parts.append(f"DDIM {ev['steps']} steps (eta {ev.get('eta')})")
    if "inpainting" in evaluators and "repaint" in ev["inpainting"].get("methods", ()):
        inp = ev["inpainting"]
        parts.append(
            f"RePaint {inp['repaint_steps']} steps, jump {inp['repaint_jump']}, resample "
            f"{inp['repaint_resample']}"
        )
    if "likelihood" in evaluators:
        parts.append(f"bits/dim of {ev['likelihood']['num_images']} test images")
    features = (table.get("features") or {}).get("name")
    if features:
        parts.append(f"FID features {features}")
    seeded = table["interval"].startswith("95%")
    spread = (
        "mean ± 95% t-interval half-width over training seeds (each run: its mean over "
        "evaluation seeds); a group with one run: ± std over evaluation seeds"
        if seeded
        else "mean ± std over evaluation seeds"
    )
    return f"{spread}. " + "; ".join(parts) + "."


def markdown(table: dict[str, Any], plots: Sequence[str] = ()) -> str:
    """table.md: one table per metric, the paired differences, then the plots."""
    lines = [_caption(table), ""]
    lines += _metric_tables(table, table["metrics"], "metrics", "run", "")
    paired = [n for n in table["metrics"] if any(n in g.get("paired", {}) for g in table["groups"])]
    if paired:
        lines += [
            "Paired differences: each method minus the default method (apd; generation: ddim) "
            "on the same runs, mean ± 95% t-interval over training seeds (a group with one run: "
            "its difference).",
            "",
        ]
        lines += _metric_tables(table, paired, "paired", "method minus default", ", paired")
    missing = [name for g in table["groups"] for name in g["missing"]]
    if missing:
        lines += [f"Not evaluated yet: {', '.join(missing)}.", ""]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines)


def _metric_tables(
    table: dict[str, Any], names: Sequence[str], entries: str, first: str, suffix: str
) -> list[str]:
    """One markdown table per METRIC of `names`: a row per group and method (the default method
    is the group's row), a column per evaluator setting, the cells from each group's `entries`
    ('metrics' or 'paired')."""
    by_metric: dict[str, tuple[list[str], list[str]]] = {}  # metric -> (columns, methods)
    for name in names:
        column, method, metric = split_name(name)
        columns, methods = by_metric.setdefault(metric, ([], []))
        columns += [column] if column not in columns else []
        methods += [method] if method not in methods else []
    lines = []
    for metric, (columns, methods) in by_metric.items():
        header = [first, *(f"{c} {metric}" for c in columns)]
        rows = []
        for group in table["groups"]:
            for method in methods:
                cells = [
                    _cell(group.get(entries, {}).get(_metric_name(table, c, method, metric)))
                    for c in columns
                ]
                if all(c == "-" for c in cells):
                    continue
                label = (
                    group["name"] if method == DEFAULT_METHOD else f"{method} on {group['name']}"
                )
                if len(group["runs"]) > 1:
                    label += f" (n={len(group['runs'])})"
                rows.append("| " + " | ".join([label, *cells]) + " |")
        lines += [f"{metric}{suffix}:", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "|".join("---" for _ in header) + "|", *rows, ""]
    return lines


def _metric_name(table: dict[str, Any], column: str, method: str, metric: str) -> str | None:
    for name in table["metrics"]:
        if split_name(name) == (column, method, metric):
            return name
    return None
