"""Cost of per-token level conditioning: forward+backward step time, side by side.

For the U-Net (unet-60m at 64x64x3, batch 2) and DiT-S/2 (32x32x4, batch 4), four variants:
  per-sample          apd's conditioning with a [B, 1, 1] level
  per-token           apd's conditioning with a [B, H, W] level map
  naive per-token     the full-width modulation projected in every block at every token
                      (U-Net cond_rank=0; DiT modulation='per_block', i.e. adaLN-Zero)
  classic per-sample  the naive model with a [B, 1, 1] level: ADM's / DiT's usual conditioning
Each step is jax.grad of a squared error over the parameters (jitted). Variants run round-robin
so that load from other processes hits them alike; the table gives the median and the minimum
over repetitions, the ratio of medians to apd's per-sample level, the median of the per-round
ratios, and XLA's own count of floating-point operations and bytes accessed for the compiled step
(load-independent). Results also go to a JSON file next to this script.

    python benchmarks/conditioning.py [--reps 9] [--dtype float32|bfloat16] [--only unet|dit]
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import report

from apd import models

BACKBONES = {
    "unet": ("unet-60m", (64, 64, 3), 2, {"cond_rank": 0}),
    "dit": ("dit-s/2", (32, 32, 4), 4, {"modulation": "per_block"}),
}
VARIANTS = (  # label, naive model?, per-token map?
    ("per-sample", False, False),
    ("per-token", False, True),
    ("naive per-token", True, True),
    ("classic per-sample", True, False),
)


def make_step(model, z, levels):
    params = jax.jit(lambda: model.init(jax.random.key(1), z, levels, None)["params"])()

    @jax.jit
    def step(params):
        return jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, z, levels))))(
            params
        )

    compiled = step.lower(params).compile()
    cost = compiled.cost_analysis()
    jax.block_until_ready(compiled(params))
    return (lambda: jax.block_until_ready(compiled(params))), {
        "gflop": cost["flops"] / 1e9,
        "gbyte": cost["bytes accessed"] / 1e9,
    }


def round_robin(runs: dict, reps: int) -> dict:
    """Times each callable `reps` times, interleaved; returns label -> list of seconds."""
    times = {label: [] for label in runs}
    for _ in range(reps):
        for label, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - t0)
    return times


def summarise(times: dict, base: str) -> dict:
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": medians,
        "min_s": {k: min(v) for k, v in times.items()},
        "ratio_of_medians": {k: m / medians[base] for k, m in medians.items()},
        "median_paired_ratio": {
            k: statistics.median(a / b for a, b in zip(v, times[base], strict=True))
            for k, v in times.items()
        },
        "times_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", choices=list(BACKBONES), default=None)
    parser.add_argument("--out", default=None, help="default: conditioning_<dtype>.json here")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(__file__), f"conditioning_{args.dtype}.json")
    results = {}
    for backbone, (name, (H, W, C), batch, naive) in BACKBONES.items():
        if args.only and backbone != args.only:
            continue
        keys = jax.random.split(jax.random.key(0), 2)
        z = jax.random.normal(keys[0], (batch, H, W, C))
        token_map = jax.random.uniform(keys[1], (batch, H, W))
        runs, costs = {}, {}
        for label, is_naive, per_token in VARIANTS:
            model = models.build(name, dtype=jnp.dtype(args.dtype), **(naive if is_naive else {}))
            levels = token_map if per_token else token_map[:, :1, :1]
            t0 = time.perf_counter()
            runs[label], costs[label] = make_step(model, z, levels)
            print(f"  compiled {backbone} {label} in {time.perf_counter() - t0:.0f} s", flush=True)
        summary = summarise(round_robin(runs, args.reps), "per-sample")
        results[backbone] = {"model": name, "shape": [batch, H, W, C], "xla_cost": costs, **summary}
        print(f"\n{name}, batch {batch}, {H}x{W}x{C}, {args.dtype}, fwd+bwd, {args.reps} reps")
        print(
            f"{'variant':<20} {'median ms':>10} {'min ms':>8} {'ratio':>6} {'paired':>7} "
            f"{'GFLOP':>7} {'ratio':>6} {'GB':>6} {'ratio':>6}"
        )
        base = costs["per-sample"]
        for label, *_ in VARIANTS:
            cost = costs[label]
            print(
                f"{label:<20} {1e3 * summary['median_s'][label]:>10.0f} "
                f"{1e3 * summary['min_s'][label]:>8.0f} "
                f"{summary['ratio_of_medians'][label]:>6.3f} "
                f"{summary['median_paired_ratio'][label]:>7.3f} "
                f"{cost['gflop']:>7.1f} {cost['gflop'] / base['gflop']:>6.3f} "
                f"{cost['gbyte']:>6.2f} {cost['gbyte'] / base['gbyte']:>6.3f}",
                flush=True,
            )
    print()
    report.write(out, {"results": results}, args)


if __name__ == "__main__":
    main()
