"""Training throughput: images/s, achieved FLOP/s against the measured matmul peak, input wait.

    python benchmarks/train_throughput.py [--devices=2] [--steps=10] [--out=FILE.json]

The process gets `--devices` XLA host devices (`--xla_force_host_platform_device_count`, with
XLA's Eigen pool off as in `launch/quickstart.sh`: apd's setting for CPU hosts).

1. The machine's matmul peak, measured here for float32 x float32 and for bfloat16 operands with
   float32 accumulation, square matrices, best of several runs: once on one device (XLA's
   matmul library spreads one product over every core) and once split over all devices; the
   larger of the two is the machine's peak.
2. The jitted training step (apd.training.builder.build: level sampling, noising, forward, backward,
   Adam, EMA) of each model below, side by side on a 1-device mesh and on a data-parallel mesh
   over all devices: its FLOPs from XLA's cost analysis (per device, times the devices), the
   median step time, and the FLOP utilisation against the machine's peak for the precision it
   runs in.
3. The real training loop (apd.training.loop.train_and_evaluate on Fashion-MNIST, the default
   config's mesh over all devices) for a few dozen steps: the fraction of wall time the host
   spends waiting for input, from its metrics.

Prints a table and writes JSON.
"""

import os
import sys
import tempfile
import time

import host

_parser = host.parser(__doc__, "train_throughput.json")
_parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
_parser.add_argument("--loop_steps", type=int, default=60, help="steps of the real loop")
ARGS = _parser.parse_args()
host.use_host_devices(ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from apd.training import builder, loop  # noqa: E402
from apd.training import mesh as mesh_lib  # noqa: E402
from apd.training import metrics as metrics_lib  # noqa: E402
from experiments import fashion_mnist  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


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


def time_step(size, options, image_shape, batch_size, steps, devices):
    config = fashion_mnist.get_config()
    config.model.name = size
    config.model.options.update(options)
    config.data.global_batch_size = batch_size
    mesh = mesh_lib.make(-1, 1, devices)
    run = builder.build(config, mesh, image_shape, 10)
    state = run.init()
    rng = np.random.default_rng(0)
    batch = builder.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        },
        run.batch_sharding,
    )
    compiled = run.train_step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost["flops"]) * mesh.devices.size
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
    all_devices = jax.devices()
    meshes = sorted({1, len(all_devices)})
    measured = {
        precision: {n: report.matmul_peak(dtype, all_devices[:n]) for n in meshes}
        for precision, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    }
    peaks = {precision: max(by_mesh.values()) for precision, by_mesh in measured.items()}
    rows = []
    for label, size, options, image_shape, batch_size in MODELS:
        precision = options.get("dtype", "float32")
        for n in meshes:
            seconds, flops, num_params = time_step(
                size, options, image_shape, batch_size, ARGS.steps, all_devices[:n]
            )
            achieved = flops / seconds / 1e9
            rows.append(
                {
                    "model": label,
                    "devices": n,
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

    print(f"\nhost devices: {len(all_devices)} x {all_devices[0].device_kind}")
    print("matmul peak (2048^3, float32 accumulation), GFLOP/s:")
    for precision, by_mesh in measured.items():
        cells = ", ".join(f"{by_mesh[n]:.0f} on {n} device(s)" for n in meshes)
        print(f"  {precision:9s} {cells} -> peak {peaks[precision]:.0f}")
    header = f"\n{'model':38s} {'dev':>3s} {'params':>7s} {'batch':>5s} {'step ms':>8s} "
    header += f"{'img/s':>7s} {'GFLOP/step':>10s} {'GFLOP/s':>8s} {'util':>6s}"
    print(header)
    for r in rows:
        print(
            f"{r['model']:38s} {r['devices']:3d} {r['params_m']:6.2f}M {r['batch']:5d} "
            f"{r['step_ms']:8.1f} {r['images_per_sec']:7.1f} {r['gflop_per_step']:10.2f} "
            f"{r['gflops']:8.1f} {r['utilisation']:6.1%}"
        )
    print(
        f"\nreal loop (Fashion-MNIST, default config, {len(all_devices)} devices, "
        f"{ARGS.loop_steps} steps): input wait {loop_stats['input_wait_fraction']:.2%} of wall "
        f"time, {loop_stats['images_per_sec']:.1f} images/s"
    )
    record = {
        "devices": len(all_devices),
        "peaks_measured": {p: {str(n): v for n, v in m.items()} for p, m in measured.items()},
        "peaks": peaks,
        "models": rows,
        "loop": loop_stats,
    }
    report.write(ARGS.out, record, ARGS)


if __name__ == "__main__":
    main()
