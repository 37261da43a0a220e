"""Adaptive sampling's network calls, and FID against synchronous DDIM at the same mean calls.

    python benchmarks/adaptive_calls.py --workdir=W [--num=1000] [--steps=100] [--min_steps=N]
        [--reestimate_every=10] [--align=start] [--batch=64] [--eta=0.25] [--labels=random]
        [--seed=0] [--feature_dir=DIR] [--out=FILE.json]
    python benchmarks/adaptive_calls.py --combine A.json B.json ...

W is a Fashion-MNIST training run (`apd.train`) with an uncertainty head
(`python -m apd.train_uncertainty --workdir=W`); the script stops with one line saying what is
missing otherwise. With the run's EMA parameters at its latest checkpoint and the same labels
and seed throughout:

1. --num images adaptively (`run_sampler.Sampler.adaptive`: budget (--min_steps, --steps),
   the head's calibrated difficulty range, re-estimation every --reestimate_every steps, a pool
   of --batch slots): M = the mean network calls per image, and the forward passes of the run
   (pool steps x batch, the idle slots at the end included).
2. --num images with synchronous DDIM at round(M) steps (the same mean calls per image), and at
   --steps steps (n_max: what every image cost before the adaptive pool), in chunks of --batch
   (one row when round(M) = --steps).
3. FID_FMNIST and KID of each set against the test split, with the evaluation's feature
   network and scores (`apd.evaluation.protocol.fmnist_features`, `Features.scores`; the
   network is trained into --feature_dir on first use, about three minutes on two CPU cores).

Prints a table and writes JSON (`report.write`). FID from a few hundred images is biased
upwards (KID is not); compare the rows with each other, at one --num.

--combine reads the JSON of several runs (one per training seed, the same flags otherwise) and
prints, for adaptive sampling, synchronous DDIM at its mean calls and synchronous DDIM at n_max,
the mean and 95% t-interval over the runs of calls per image, FID_FMNIST and KID, and of the
paired differences adaptive minus synchronous at equal calls (the same model and labels).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import report

from apd import cache, run_sampler, runs
from apd.data import fashion_mnist
from apd.evaluation import protocol


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="training run with an uncertainty head")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="summarise earlier runs")
    parser.add_argument("--num", type=int, default=1000, help="images per sampler")
    parser.add_argument("--steps", type=int, default=100, help="n_max, the most steps per pixel")
    parser.add_argument("--min_steps", type=int, default=None, help="n_min (default 2 steps/5)")
    parser.add_argument("--reestimate_every", type=int, default=10, help="0: only at the start")
    parser.add_argument("--align", default="start", choices=["start", "end"])
    parser.add_argument("--batch", type=int, default=64, help="pool slots and chunk size")
    parser.add_argument("--eta", type=float, default=0.25, help="DDIM eta")
    parser.add_argument("--labels", default="random", help="random|null|class ids like 0,1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kid_subsets", type=int, default=100, help="as evaluate.kid_subsets")
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="KID subset size")
    parser.add_argument(
        "--feature_dir",
        default=os.path.join(cache.root(), "features", "fashion_mnist"),
        help="Fashion-MNIST feature network (as apd.evaluate's --feature_dir)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "adaptive_calls.json"),
    )
    args = parser.parse_args()
    if (args.workdir is None) == (args.combine is None):
        parser.error(
            "give either --workdir (a run to measure) or --combine (results to summarise)."
        )
    for name in ("num", "steps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.min_steps is not None and not 1 <= args.min_steps <= args.steps:
        parser.error(f"--min_steps must lie in [1, --steps={args.steps}]; got {args.min_steps}.")
    if args.reestimate_every < 0:
        parser.error(f"--reestimate_every must be >= 0; got {args.reestimate_every}.")
    return parser, args


def load(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[runs.Run, run_sampler.Sampler, dict]:
    """The run, a sampler over it and its head's record; a clear one-line error for a workdir
    without a checkpoint, a non-Fashion-MNIST run, or a run without a (calibrated) head."""
    try:
        run = runs.load(args.workdir)
        if run.config.data.name != "fashion_mnist":
            raise ValueError(
                f"{args.workdir} is a {run.config.data.name!r} run; FID_FMNIST needs a "
                "Fashion-MNIST run."
            )
        sampler = run_sampler.Sampler(run, batch=min(args.batch, args.num))
        head = sampler.uncertainty_head()
        run_sampler.difficulty_range(head)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    return run, sampler, head.info


ROLES = ("adaptive", "synchronous at equal calls", "synchronous at n_max")


def roles(record: dict) -> dict[str, dict]:
    """A result's rows by role (the equal-calls row is the n_max row when M rounds to n_max)."""
    rows = {row["sampler"]: row for row in record["rows"]}
    adaptive = rows["adaptive"]
    n_max = record["settings"]["budget"][1]
    matched = max(1, round(adaptive["calls_per_image"]))
    return {
        ROLES[0]: adaptive,
        ROLES[1]: rows[f"synchronous_{matched}"],
        ROLES[2]: rows[f"synchronous_{n_max}"],
    }


def combine(paths: list[str]) -> None:
    """Prints the mean and 95% t-interval over the results in `paths` (see the module doc)."""
    from apd.sweeps import table

    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
    budgets = {tuple(r["settings"]["budget"]) for r in records}
    if len(budgets) != 1:
        raise SystemExit(
            f"the results have different budgets {sorted(budgets)}; combine like runs."
        )
    by_role = [roles(r) for r in records]

    def cell(values: list[float], digits: int) -> str:
        entry = table.aggregate(values, None)
        error = "" if entry["error"] is None else f" ± {entry['error']:.{digits}f}"
        return f"{entry['mean']:.{digits}f}{error}"

    print(f"{len(records)} runs, budget {budgets.pop()}: mean ± 95% t-interval over the runs")
    print("| sampler | calls / image | FID_FMNIST | KID |")
    print("|---|---|---|---|")
    for role in ROLES:
        rows = [r[role] for r in by_role]
        print(
            f"| {role} | {cell([r['calls_per_image'] for r in rows], 1)} | "
            f"{cell([r['fid_fmnist'] for r in rows], 2)} | {cell([r['kid'] for r in rows], 4)} |"
        )
    adaptive, equal = ROLES[0], ROLES[1]
    print(
        f"| adaptive - synchronous at equal calls | - | "
        f"{cell([r[adaptive]['fid_fmnist'] - r[equal]['fid_fmnist'] for r in by_role], 2)} | "
        f"{cell([r[adaptive]['kid'] - r[equal]['kid'] for r in by_role], 4)} |"
    )


def main() -> None:
    parser, args = parse_args()
    if args.combine:
        combine(args.combine)
        return
    run, sampler, head_info = load(parser, args)
    labels = run_sampler.resolve_labels(args.labels, run.num_classes, args.num, args.seed)
    min_steps = args.min_steps
    if min_steps is None:
        min_steps = run_sampler.default_min_steps(args.steps)
    batch = sampler.batch

    t0 = time.perf_counter()
    adaptive = sampler.adaptive(
        args.num,
        steps=args.steps,
        min_steps=min_steps,
        align=args.align,
        reestimate_every=args.reestimate_every,
        labels=labels,
        seed=args.seed,
        eta=args.eta,
    )
    adaptive_seconds = time.perf_counter() - t0
    calls = adaptive.extras["network_calls"]
    mean_calls = float(calls.mean())
    matched = max(1, round(mean_calls))

    samples = {"adaptive": (adaptive.images, adaptive_seconds)}
    chunks = math.ceil(args.num / batch)
    synchronous_steps = sorted({matched, args.steps})  # one row when M rounds to n_max
    for steps in synchronous_steps:
        name = f"synchronous_{steps}"
        t0 = time.perf_counter()
        images = sampler.generate(
            args.num, steps=steps, labels=labels, seed=args.seed, eta=args.eta
        ).images
        samples[name] = (images, time.perf_counter() - t0)

    features = protocol.fmnist_features(
        args.feature_dir, "test", run.config.data.path or fashion_mnist.DEFAULT_PATH
    )
    pool_steps = adaptive.network_calls
    rows = [
        {
            "sampler": "adaptive",
            "calls_per_image": mean_calls,
            "calls_per_image_min": int(calls.min()),
            "calls_per_image_max": int(calls.max()),
            "forward_passes": pool_steps * batch,
            "pool_steps": pool_steps,
            "mean_steps_per_pixel": float(adaptive.extras["steps_per_pixel"].mean()),
        },
    ]
    rows += [
        {
            "sampler": f"synchronous_{steps}",
            "calls_per_image": float(steps),
            "forward_passes": chunks * steps * batch,
        }
        for steps in synchronous_steps
    ]
    for row in rows:
        images, seconds = samples[row["sampler"]]
        scores = features.scores(images, batch, args.kid_subsets, args.kid_subset_size)
        row.update(fid_fmnist=scores["fid"], kid=scores["kid"], seconds=seconds)

    print(
        f"{run.directory} (step {run.step}, {run.description['model']['name']}): {args.num} "
        f"images, batch {batch}, budget ({min_steps}, {args.steps}), re-estimation every "
        f"{args.reestimate_every}, align {args.align}"
    )
    print(
        f"{'sampler':24s}{'calls/image':>13s}{'forward passes':>16s}{'FID_FMNIST':>12s}"
        f"{'KID':>10s}{'s':>9s}"
    )
    for row in rows:
        print(
            f"{row['sampler']:24s}{row['calls_per_image']:13.1f}{row['forward_passes']:16d}"
            f"{row['fid_fmnist']:12.2f}{row['kid']:10.4f}{row['seconds']:9.1f}"
        )
    print(
        f"adaptive: {int(calls.min())}..{int(calls.max())} calls per image; "
        f"{rows[0]['mean_steps_per_pixel']:.1f} steps per pixel on average"
    )
    record = {
        "run": {
            "workdir": run.directory,
            "step": run.step,
            "model": run.description["model"],
        },
        "head": {
            "steps_done": head_info.get("steps_done"),
            "eval": head_info.get("eval"),
            "calibration": head_info.get("calibration"),
        },
        "settings": {
            "budget": [min_steps, args.steps],
            "batch": batch,
            "feature_network": features.name,
            "feature_sha256": features.sha256,
            "reference": features.reference_record,
        },
        "rows": rows,
        "calls_per_image_histogram": np.bincount(calls, minlength=args.steps + 1).tolist(),
    }
    report.write(args.out, record, args)


if __name__ == "__main__":
    main()
