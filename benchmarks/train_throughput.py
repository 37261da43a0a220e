"""Training throughput: images/s, achieved FLOP/s against the measured matmul peak, input wait.

    python benchmarks/train_throughput.py [--devices=1] [--steps=10] [--out=FILE.json]

1. The machine's matmul peak, measured here: float32 x float32 and bfloat16 operands with float32
   accumulation (the fast path on CPUs with AMX-BF16), square matrices, best of several runs.
2. The jitted training step (apd.training.loop.build: level sampling, noising, forward, backward,
   Adam, EMA) of each model below: its FLOPs from XLA's cost analysis, the median step time, and
   the FLOP utilisation against the peak of the precision it runs in.
3. The real training loop (apd.training.loop.train_and_evaluate on Fashion-MNIST) for a few dozen
   steps: the fraction of wall time the host spends waiting for input, from its metrics.

Prints a table and writes JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import time

_parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_parser.add_argument("--devices", type=int, default=1, help="host devices (XLA CPU devices)")
_parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
_parser.add_argument("--loop_steps", type=int, default=60, help="steps of the real loop")
_parser.add_argument(
    "--out",
    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_throughput.json"),
)
ARGS = _parser.parse_args()
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={ARGS.devices}"
    + (" --xla_cpu_multi_thread_eigen=false" if ARGS.devices > 1 else "")
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apd.training import loop  # noqa: E402
from apd.training import mesh as mesh_lib  # noqa: E402
from apd.training import metrics as metrics_lib  # noqa: E402
from experiments import fashion_mnist  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def matmul_peak(dtype, n: int = 2048, reps: int = 7) -> float:
    """Best GFLOP/s of an n x n x n matmul with `dtype` operands, float32 accumulation."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


# (label, model size, model options, image shape, global batch)
MODELS = [
    ("unet-small fmnist f32", "unet-small", {}, (28, 28, 1), 64),
    ("unet-small fmnist bf16", "unet-small", {"dtype": "bfloat16"}, (28, 28, 1), 64),
    (
        "unet-60m shape, base 32, 32px f32",
        "unet-60m",
        {"base": 32, "norm_groups": 8},
        (32, 32, 3),
        32,
    ),
    (
        "unet-60m shape, base 32, 32px bf16",
        "unet-60m",
        {"base": 32, "norm_groups": 8, "dtype": "bfloat16"},
        (32, 32, 3),
        32,
    ),
]


def time_step(size, options, image_shape, batch_size, steps):
    config = fashion_mnist.get_config()
    config.model.name = size
    config.model.options.update(options)
    config.data.global_batch_size = batch_size
    mesh = mesh_lib.make(-1, 1)
    run = loop.build(config, mesh, image_shape, 10)
    state = run.init()
    rng = np.random.default_rng(0)
    batch = loop.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        },
        run.batch_sharding,
    )
    compiled = run.train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"]) * (mesh.devices.size if mesh.devices.size > 1 else 1)
    state, _ = run.train_step(state, batch)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    return float(np.median(times)), flops, num_params


def real_loop(steps: int) -> dict:
    """input_wait_fraction and images/s of the real loop's last logging interval."""
    config = fashion_mnist.get_config()
    if not os.path.isdir(FMNIST):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        import helpers

        config.data.path = helpers.write_fake_fashion_mnist(tempfile.mkdtemp(), 2048, 64)
    config.total_steps = steps
    config.log_every_steps = steps // 3
    config.checkpoint.every_steps = 10 * steps
    with tempfile.TemporaryDirectory() as workdir:
        loop.train_and_evaluate(config, workdir)
        records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    last = [r for r in records if "input_wait_fraction" in r][-1]
    return {k: last[k] for k in ("input_wait_fraction", "images_per_sec", "steps_per_sec")}


def main():
    peaks = {"float32": matmul_peak(jnp.float32), "bfloat16": matmul_peak(jnp.bfloat16)}
    rows = []
    for label, size, options, image_shape, batch_size in MODELS:
        seconds, flops, num_params = time_step(size, options, image_shape, batch_size, ARGS.steps)
        precision = options.get("dtype", "float32")
        achieved = flops / seconds / 1e9
        rows.append(
            {
                "model": label,
                "params_m": num_params / 1e6,
                "batch": batch_size,
                "step_ms": seconds * 1e3,
                "images_per_sec": batch_size / seconds,
                "gflop_per_step": flops / 1e9,
                "gflops": achieved,
                "precision": precision,
                "peak_gflops": peaks[precision],
                "utilisation": achieved / peaks[precision],
            }
        )
    loop_stats = real_loop(ARGS.loop_steps)

    print(f"\ndevices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(
        f"matmul peak (2048^3, float32 accumulation): float32 {peaks['float32']:.0f} GFLOP/s, "
        f"bfloat16 operands {peaks['bfloat16']:.0f} GFLOP/s\n"
    )
    header = f"{'model':38s} {'params':>7s} {'batch':>5s} {'step ms':>8s} {'img/s':>7s} "
    header += f"{'GFLOP/step':>10s} {'GFLOP/s':>8s} {'util':>6s}"
    print(header)
    for r in rows:
        print(
            f"{r['model']:38s} {r['params_m']:6.2f}M {r['batch']:5d} {r['step_ms']:8.1f} "
            f"{r['images_per_sec']:7.1f} {r['gflop_per_step']:10.2f} {r['gflops']:8.1f} "
            f"{r['utilisation']:6.1%}"
        )
    print(
        f"\nreal loop (Fashion-MNIST, default config, {ARGS.loop_steps} steps): input wait "
        f"{loop_stats['input_wait_fraction']:.2%} of wall time, "
        f"{loop_stats['images_per_sec']:.1f} images/s"
    )
    with open(ARGS.out, "w", encoding="utf-8") as f:
        json.dump(
            {"devices": jax.device_count(), "peaks": peaks, "models": rows, "loop": loop_stats},
            f,
            indent=2,
        )
    print(f"wrote {ARGS.out}")


if __name__ == "__main__":
    main()
