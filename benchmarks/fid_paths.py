"""FID's trace term two ways, side by side in one process, at Inception's feature dimension:
`frechet.fid_from_stats` (scipy's square root of the D x D product, what the reference FID code
does) against `frechet.fid_from_features` (an N x N eigenproblem when the N samples are at most
D, what `apd.evaluate` uses), for the sample counts of apd's evaluations, with the two values.

    python benchmarks/fid_paths.py [--dim=2048] [--samples=64,160,500] [--reps=3]

The features are random (the cost depends on the shapes only): the reference statistics from
`--reference` vectors, each sample set from N. Timed per call (median of --reps, both paths
alternating in each round); the statistics of the samples are counted in the sqrtm path's time
as `apd.evaluate` computed them before. Prints a table and writes JSON.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import report

from apd.evaluation import frechet

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--dim", type=int, default=2048, help="feature dimension D")
_parser.add_argument("--samples", default="64,160,500", help="sample counts N")
_parser.add_argument("--reference", type=int, default=5000, help="reference feature vectors")
_parser.add_argument("--reps", type=int, default=3, help="timed rounds")
_parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fid_paths.json")
)


def main(args):
    rng = np.random.default_rng(0)
    d = args.dim
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    mu2, sigma2 = frechet.stats_from_features(rng.normal(size=(args.reference, d)) @ mixing)
    rows = []
    for n in (int(v) for v in args.samples.split(",")):
        features = rng.normal(size=(n, d)) @ mixing + 0.1
        paths = {
            "sqrtm": lambda f=features: frechet.fid_from_stats(
                *frechet.stats_from_features(f), mu2, sigma2
            ),
            "eigen": lambda f=features: frechet.fid_from_features(f, mu2, sigma2),
        }
        times = {k: [] for k in paths}
        values = {}
        for _ in range(args.reps):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                values[name] = fn()
                times[name].append(time.perf_counter() - t0)
        sqrtm_s, eigen_s = (statistics.median(times[k]) for k in ("sqrtm", "eigen"))
        rows.append(
            {
                "samples": n,
                "dim": d,
                "sqrtm_s": sqrtm_s,
                "eigen_s": eigen_s,
                "speedup": sqrtm_s / eigen_s,
                "fid_sqrtm": values["sqrtm"],
                "fid_eigen": values["eigen"],
                "relative_difference": abs(values["sqrtm"] - values["eigen"]) / values["sqrtm"],
            }
        )
    print(f"\n{'N':>5s} {'D':>5s} {'sqrtm s':>8s} {'eigen s':>8s} {'ratio':>7s} {'rel diff':>9s}")
    for r in rows:
        print(
            f"{r['samples']:5d} {r['dim']:5d} {r['sqrtm_s']:8.2f} {r['eigen_s']:8.3f} "
            f"{r['speedup']:6.1f}x {r['relative_difference']:9.1e}"
        )
    report.write(args.out, {"rows": rows}, args)


if __name__ == "__main__":
    main(_parser.parse_args())
