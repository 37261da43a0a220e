"""Diagnostics of a training level sampler: the paper's Fig. 3 (histograms of tbar and spread).

    python -m apd.levels --sampler=asyncpatch --delta_max=0.3 --grid=32 --n=20000 --out=DIR
    python -m apd.levels --sampler=all --out=DIR

Writes DIR/levels_NAME.png (histograms of the image mean level and of the spread, and example
level maps, 0 = black = clean) and DIR/levels_NAME.json (the summary statistics of
`apd.levels.stats.summarize`, with the sampler, its resolved parameters, grid, n and seed).
Sampler parameters are passed as `--param=value` (lists comma-separated: `--patch_sizes=1,2,4`);
`--sampler=all` draws every sampler with its defaults into one comparison figure.
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import jax
import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from apd import checks
from apd.levels import samplers, stats

_LIST_PARAMS = {"patch_sizes": int, "patch_probs": float}
_EXAMPLES = 6


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m apd.levels",
        allow_abbrev=False,
        description=__doc__.split("\n\n")[0],
        epilog="Sampler parameters: "
        + "; ".join(
            f"{name}: " + (", ".join(f"--{p}" for p in params) or "none")
            for name, params in samplers.DEFAULTS.items()
        ),
    )
    parser.add_argument("--sampler", required=True, help=f"one of {[*samplers.NAMES, 'all']}")
    parser.add_argument("--grid", default="32", help="token grid: n (n x n) or h,w (default 32)")
    parser.add_argument("--n", type=int, default=20000, help="number of level maps (default 20000)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument(
        "--chunk", type=int, default=4096, help="maps drawn per call (default 4096)"
    )
    return parser


def _parse_grid(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
        return checks.as_grid(sizes[0] if len(sizes) == 1 else sizes)
    except ValueError:
        raise ValueError(f"--grid must be n or comma-separated sizes h,w; got {text!r}.") from None


def _parse_value(name: str, sampler: str, text: str) -> object:
    """Converts a command-line string to the type of a sampler parameter."""
    if name in _LIST_PARAMS:
        return tuple(_LIST_PARAMS[name](v) for v in text.split(",") if v.strip())
    default = samplers.DEFAULTS.get(sampler, {}).get(name)
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text  # an unknown parameter: `resolve_params` names it and lists the valid ones


def _parse_params(extra: Sequence[str], sampler: str) -> dict[str, object]:
    params = {}
    for arg in extra:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"sampler parameters take the form --name=value; got {arg!r}.")
        name, text = arg[2:].split("=", 1)
        try:
            params[name] = _parse_value(name, sampler, text)
        except ValueError:
            raise ValueError(f"--{name} for sampler {sampler!r}: cannot parse {text!r}.") from None
    return params


def draw_stats(
    name: str, params: dict, grid: tuple[int, ...], n: int, seed: int, chunk: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-image statistics of n maps (drawn in chunks of one compiled shape) and example maps.

    Returns (`stats.per_image` arrays of length n, examples [<= 6, *grid] sorted by mean level).
    """
    chunk = max(1, min(chunk, n))

    @jax.jit
    def draw(key):
        levels = samplers.sample(name, key, chunk, grid, **params)
        return stats.per_image(levels), levels[:_EXAMPLES]

    key = jax.random.key(seed)
    parts, examples = [], None
    for i in range(math.ceil(n / chunk)):
        per_image, first = draw(jax.random.fold_in(key, i))
        parts.append({k: np.asarray(v) for k, v in per_image.items()})
        if examples is None:
            examples = np.asarray(first)
    per_image = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    order = np.argsort(examples.reshape(examples.shape[0], -1).mean(axis=1))
    return per_image, examples[order]


def _as_image(level_map: np.ndarray) -> np.ndarray:
    """A level map of any rank as a 2-D image: 1-D maps as one row, leading axes sliced at 0."""
    if level_map.ndim == 1:
        return level_map[None, :]
    return level_map.reshape(-1, *level_map.shape[-2:])[0]


def _histograms(ax_mean, ax_spread, per_image: dict[str, np.ndarray], title: str) -> None:
    bins = np.linspace(0.0, 1.0, 41)
    ax_mean.hist(per_image["mean"], bins=bins, density=True, color="tab:blue")
    ax_mean.axhline(1.0, color="k", lw=0.8, ls="--")
    ax_mean.set(title=f"{title}: image mean level", xlim=(0, 1))
    ax_spread.hist(per_image["spread"], bins=bins, density=True, color="tab:orange")
    ax_spread.set(title=f"{title}: spread (max - min)", xlim=(0, 1))


def _show_map(ax, level_map: np.ndarray) -> None:
    ax.imshow(_as_image(level_map), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set(xticks=[], yticks=[], xlabel=f"mean {level_map.mean():.2f}")


def plot_one(name: str, per_image: dict[str, np.ndarray], examples: np.ndarray, path: str) -> None:
    fig = plt.figure(figsize=(12, 6.5), layout="constrained")
    grid = fig.add_gridspec(2, _EXAMPLES, height_ratios=(1.4, 1))
    _histograms(fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:]), per_image, name)
    for i, level_map in enumerate(examples):
        _show_map(fig.add_subplot(grid[1, i]), level_map)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(results: dict[str, tuple[dict, np.ndarray]], path: str) -> None:
    rows = 5  # mean histogram, spread histogram, three example maps
    fig, axes = plt.subplots(rows, len(results), figsize=(3.2 * len(results), 13), squeeze=False)
    for col, (name, (per_image, examples)) in enumerate(results.items()):
        _histograms(axes[0, col], axes[1, col], per_image, name)
        picks = np.linspace(0, len(examples) - 1, rows - 2).round().astype(int)
        for row, i in enumerate(picks, start=2):
            _show_map(axes[row, col], examples[i])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    matplotlib.use("Agg")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        grid = _parse_grid(args.grid)
        if args.n < 1:
            raise ValueError(f"--n must be a positive number of level maps; got {args.n}.")
        if args.sampler == "all":
            if extra:
                raise ValueError(
                    f"--sampler=all draws every sampler with its defaults; got parameters {extra}."
                )
            jobs = {name: {} for name in samplers.NAMES}
        else:
            jobs = {args.sampler: _parse_params(extra, args.sampler)}
        resolved = {name: samplers.resolve_params(name, grid, **p) for name, p in jobs.items()}
    except ValueError as e:
        parser.error(str(e))

    os.makedirs(args.out, exist_ok=True)
    results, summaries = {}, {}
    for name, params in jobs.items():
        results[name] = draw_stats(name, params, grid, args.n, args.seed, args.chunk)
        summaries[name] = {
            "sampler": name,
            "params": resolved[name],
            "grid": list(grid),
            "n": args.n,
            "seed": args.seed,
            "summary": stats.summarize(results[name][0]),
        }

    stem = os.path.join(args.out, f"levels_{args.sampler}")
    if args.sampler == "all":
        plot_all(results, stem + ".png")
        record = summaries
    else:
        plot_one(args.sampler, *results[args.sampler], stem + ".png")
        record = summaries[args.sampler]
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {stem}.png and {stem}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
