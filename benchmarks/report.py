"""Shared by the benchmark scripts: what each records beside its numbers (the command that
reproduces them, every flag's value, defaults included, and the machine; `write(path, record,
args)` adds these and writes the JSON), `median_seconds`, the plain timing loop, and
`matmul_peak`, the machine's measured matmul rate that FLOP utilisations are quoted against."""

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


def matmul_peak(dtype, devices, n: int = 2048, reps: int = 7) -> float:
    """Best GFLOP/s of n x n x n matmuls with `dtype` operands and float32 accumulation, one per
    device of `devices`, all at once."""
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(list(devices), ("data",)), PartitionSpec("data"))
    a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
    f = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * len(devices) * n**3 / min(times) / 1e9


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
