"""The latent stage's costs on the clip-art demo, side by side in one process: training images/s
of the pixel U-Net (`experiments/clipart.py`, 64 x 64 x 3) and of the latent U-Net
(`experiments/clipart_latent.py`, 16 x 16 x 3 latents), the autoencoder's training step
(`experiments/clipart_autoencoder.py`) and its encoder's throughput (what `apd.encode` runs),
each with its FLOPs (XLA's cost analysis) and its utilisation of the machine's measured matmul
peak.

    python benchmarks/latent_vs_pixel.py [--devices=2] [--rounds=5] [--out=FILE.json]

The steps run in rounds, one of each per round, so a busy machine slows them alike; the table
gives each one's median and the ratios of medians. Inputs are random arrays of the configs'
shapes (the costs do not depend on the values); the parameters are each config's initial ones.
Prints a table and writes JSON.
"""

import statistics
import time

import host

_parser = host.parser(__doc__, "latent_vs_pixel.json")
_parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one call of each)")
_parser.add_argument("--encode_batch", type=int, default=64, help="images per encoder call")
ARGS = _parser.parse_args()
host.use_host_devices(ARGS.devices)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402

from apd.training import builder, tasks  # noqa: E402
from apd.training import mesh as mesh_lib  # noqa: E402
from experiments import clipart, clipart_autoencoder, clipart_latent  # noqa: E402

NUM_CLASSES = 22


def _flops(compiled, devices: int) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) * devices


def training_step(config, image_shape, mesh):
    """(step() -> blocks, FLOPs per step, batch) of a config's jitted training step."""
    task = tasks.get(config)
    run = task.build(config, mesh, image_shape, NUM_CLASSES)
    batch_size = config.data.global_batch_size
    rng = np.random.default_rng(0)
    batch = builder.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
        },
        run.batch_sharding,
    )
    holder = {"state": run.init()}
    flops = _flops(run.train_step.lower(holder["state"], batch).compile(), mesh.devices.size)

    def step():
        holder["state"], metrics = run.train_step(holder["state"], batch)
        jax.block_until_ready(metrics)

    return step, flops, batch_size


def encoder(config, mesh, batch_size: int):
    """(call() -> blocks, FLOPs per call, batch) of the autoencoder's encoder (all known)."""
    task = tasks.get(config)
    run = task.build(config, mesh, (64, 64, 3), NUM_CLASSES)
    state = run.init()
    variables = {"params": state.ema_params}
    sharding = mesh_lib.batch_sharding(mesh)
    x = jax.device_put(
        np.random.default_rng(1).uniform(-1, 1, (batch_size, 64, 64, 3)).astype(np.float32),
        sharding,
    )
    fn = jax.jit(lambda v, x: run.model.apply(v, x, method="encode"))
    flops = _flops(fn.lower(variables, x).compile(), mesh.devices.size)
    return (lambda: jax.block_until_ready(fn(variables, x))), flops, batch_size


def main():
    devices = jax.devices()
    mesh = mesh_lib.make(-1, 1, devices)
    peak = max(report.matmul_peak(jnp.float32, devices[:n]) for n in sorted({1, len(devices)}))
    pixel = clipart.get_config()
    latent = clipart_latent.get_config("latents=unused")
    autoencoder = clipart_autoencoder.get_config()
    subjects = {
        "pixel U-Net step (64x64x3)": training_step(pixel, (64, 64, 3), mesh),
        "latent U-Net step (16x16x3)": training_step(latent, (16, 16, 3), mesh),
        "autoencoder step (ae-f4-small)": training_step(autoencoder, (64, 64, 3), mesh),
        "encoder (apd.encode)": encoder(autoencoder, mesh, ARGS.encode_batch),
    }
    for fn, _, _ in subjects.values():  # warm-up
        fn()
    times = {name: [] for name in subjects}
    for _ in range(ARGS.rounds):
        for name, (fn, _, _) in subjects.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, (_, flops, batch) in subjects.items():
        seconds = statistics.median(times[name])
        rows.append(
            {
                "subject": name,
                "batch": batch,
                "ms": seconds * 1e3,
                "images_per_sec": batch / seconds,
                "gflop_per_image": flops / batch / 1e9,
                "gflops": flops / seconds / 1e9,
                "utilisation": flops / seconds / 1e9 / peak,
            }
        )
    by_name = {r["subject"]: r for r in rows}
    ratio = (
        by_name["latent U-Net step (16x16x3)"]["images_per_sec"]
        / by_name["pixel U-Net step (64x64x3)"]["images_per_sec"]
    )
    print(f"\n{len(devices)} host devices; float32 matmul peak {peak:.0f} GFLOP/s")
    print(
        f"{'subject':32s} {'batch':>5s} {'ms':>8s} {'img/s':>8s} {'GFLOP/img':>9s} "
        f"{'GFLOP/s':>8s} {'util':>6s}"
    )
    for r in rows:
        print(
            f"{r['subject']:32s} {r['batch']:5d} {r['ms']:8.1f} {r['images_per_sec']:8.1f} "
            f"{r['gflop_per_image']:9.3f} {r['gflops']:8.1f} {r['utilisation']:6.1%}"
        )
    print(f"latent / pixel training images/s: {ratio:.2f}x")
    report.write(
        ARGS.out,
        {"devices": len(devices), "peak_gflops": peak, "rows": rows, "latent_over_pixel": ratio},
        ARGS,
    )


if __name__ == "__main__":
    main()
