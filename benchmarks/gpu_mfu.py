"""bf16 training-step MFU of the 60M U-Net (64x64x3) and DiT-B/2 (32x32x4 latents) on one GPU.

    python benchmarks/gpu_mfu.py [--steps=20] [--out=FILE.json]

MFU = (FLOPs of one jitted training step, from XLA's cost analysis) / step time / the chip's
dense bf16 peak (datasheet value for known chips; the measured bf16 matmul rate is printed beside
it). Prints a table and writes JSON. Used by benchmarks/gpu_check.sh.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from apd.training import loop
from apd.training import mesh as mesh_lib
from experiments import fashion_mnist

# Dense bf16 peak FLOP/s per chip (datasheets, without sparsity).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

MODELS = [
    ("unet-60m 64x64x3", "unet-60m", (64, 64, 3), 64),
    ("dit-b/2 32x32x4", "dit-b/2", (32, 32, 4), 128),
]


def datasheet_peak(kind: str) -> float | None:
    for name, peak in PEAKS.items():
        if name in kind:
            return peak
    return None


def matmul_rate(n: int = 8192) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def measure(size, image_shape, batch_size, steps):
    config = fashion_mnist.get_config()
    config.model.name = size
    config.model.options.update({"dtype": "bfloat16"})
    config.data.global_batch_size = batch_size
    run = loop.build(config, mesh_lib.make(-1, 1), image_shape, 1000)
    state = run.init()
    rng = np.random.default_rng(0)
    batch = loop.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, 1000, batch_size).astype(np.int32),
        },
        run.batch_sharding,
    )
    cost = run.train_step.lower(state, batch).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    for _ in range(3):
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    return seconds, flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="gpu_mfu.json")
    args = parser.parse_args()
    device = jax.devices()[0]
    kind = device.device_kind
    peak = datasheet_peak(kind)
    measured = matmul_rate()
    print(f"device: {kind} ({device.platform}); bf16 matmul measured {measured / 1e12:.0f} TFLOP/s")
    if peak is None:
        peak = measured
        print("unknown chip: MFU is relative to the measured matmul rate")
    rows = []
    print(f"{'model':20s} {'batch':>5s} {'step ms':>8s} {'img/s':>8s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for label, size, shape, batch_size in MODELS:
        seconds, flops = measure(size, shape, batch_size, args.steps)
        row = {
            "model": label,
            "batch": batch_size,
            "step_ms": seconds * 1e3,
            "images_per_sec": batch_size / seconds,
            "tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / peak,
        }
        rows.append(row)
        print(
            f"{label:20s} {batch_size:5d} {row['step_ms']:8.1f} {row['images_per_sec']:8.0f} "
            f"{row['tflops']:8.1f} {row['mfu']:6.1%}"
        )
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(
            {"device": kind, "peak": peak, "matmul_measured": measured, "models": rows}, f, indent=2
        )


if __name__ == "__main__":
    main()
