"""Shared by the benchmark scripts: what each records beside its numbers (the command that
reproduces them, every flag's value, defaults included, and the machine; `write(path, record,
args)` adds these and writes the JSON) and `median_seconds`, the plain timing loop."""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax


def command() -> str:
    """`python benchmarks/NAME.py ...` as it was run, without the --out flag."""
    script = os.path.join("benchmarks", os.path.basename(sys.argv[0]))
    flags, skip = [], False
    for flag in sys.argv[1:]:
        if skip:
            skip = False
        elif flag == "--out":
            skip = True
        elif not flag.startswith("--out="):
            flags.append(flag)
    return " ".join(["python", script, *flags])


def median_seconds(fn, *args, reps: int) -> float:
    """Median wall time of `fn(*args)` (blocked until ready) over `reps` calls after one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def write(path: str, record: dict, args: argparse.Namespace) -> None:
    """Writes {"command", "args", "machine", **record} to `path` as indented JSON."""
    flags = {k: v for k, v in vars(args).items() if k != "out"}
    full = {"command": command(), "args": flags, "machine": machine(), **record}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2)
    print(f"wrote {path}")
