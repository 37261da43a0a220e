"""bf16 training-step MFU of the 60M U-Net (64x64x3) and DiT-B/2 (32x32x4 latents) on one GPU.

    python benchmarks/gpu_mfu.py [--steps=20] [--scale=1,4] [--variants=default,...]
                                 [--trace-dir=DIR] [--out=FILE.json]

Each model runs at its base batch (U-Net 64, DiT 128) times every factor in --scale, in every
variant that concerns it: `default` is apd as configured (on GPU with bf16: cuDNN fused
attention, convolutions writing bf16), `explicit-attention` swaps in `layers.explicit_attention`
(two matmuls, float32 softmax), `f32-conv-output` asks XLA for float32 convolution outputs (U-Net
only; XLA then runs those convolutions wholly in float32), `bf16-activations` keeps the DiT's
activations in bf16 (`DiT(activation_dtype="bfloat16")`). The step
is apd's real jitted training step (`apd.training.builder.build`: level sampling, noising,
forward, backward, AdamW, EMA), compiled once; only jax, flax, optax and ml_collections are
needed.

FLOPs per step come from XLA's cost analysis of the *lowered* (unoptimised) program with explicit
attention, lowered for the host CPU: after GPU compilation, matrix products and convolutions become
cuBLAS/cuDNN custom calls that the compiled cost analysis does not count (about 8% of the true
FLOPs are left), and the GPU backend gives no cost analysis of the lowered program.
MFU = FLOPs / step time / the chip's dense bf16 datasheet peak (the measured bf16 matmul rate is
printed beside it). With --trace-dir, a jax.profiler trace of 3 steps of each model's first
variant at its largest batch is written there as trace_<model>.xplane.pb.gz. Prints a table and
writes JSON after every row. Used by benchmarks/gpu_check.sh.
"""

import argparse
import contextlib
import glob
import gzip
import os
import shutil
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import report

from apd.models import layers
from apd.training import builder
from apd.training import mesh as mesh_lib
from experiments import fashion_mnist

# Dense bf16 peak FLOP/s per chip (datasheets, without sparsity).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

MODELS = [  # label, size, image shape, base batch
    ("dit-b/2 32x32x4", "dit-b/2", (32, 32, 4), 128),
    ("unet-60m 64x64x3", "unet-60m", (64, 64, 3), 64),
]

# name -> (context manager that switches apd's code to it, the models it concerns, model options)
VARIANTS = {
    "default": (contextlib.nullcontext, ("dit-b/2", "unet-60m"), {}),
    "explicit-attention": (
        lambda: mock.patch.object(layers, "attention", layers.explicit_attention),
        ("dit-b/2", "unet-60m"),
        {},
    ),
    # bf16 convolutions with a float32 output (what apd asked of XLA before conv_output_dtype).
    "f32-conv-output": (
        lambda: mock.patch.object(layers, "conv_output_dtype", lambda dtype: jnp.float32),
        ("unet-60m",),
        {},
    ),
    # The DiT's residual stream, q/k/v and MLP hidden in bf16 (DiT(activation_dtype=...)).
    "bf16-activations": (
        contextlib.nullcontext,
        ("dit-b/2",),
        {"activation_dtype": "bfloat16"},
    ),
}


def datasheet_peak(kind: str) -> float | None:
    for name, peak in PEAKS.items():
        if name in kind:
            return peak
    return None


def matmul_rate(n: int = 8192) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def setup(size, image_shape, batch_size, devices=None, options=None):
    config = fashion_mnist.get_config()
    config.model.name = size
    config.model.options.update({"dtype": "bfloat16", **(options or {})})
    config.data.global_batch_size = batch_size
    run = builder.build(config, mesh_lib.make(-1, 1, devices), image_shape, 1000)
    rng = np.random.default_rng(0)
    batch = builder.global_batch(
        {
            "image": rng.uniform(-1, 1, (batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, 1000, batch_size).astype(np.int32),
        },
        run.batch_sharding,
    )
    return run, batch


def step_flops(size, image_shape, batch_size) -> float:
    """FLOPs of one step, counted on the lowered program with explicit attention.

    Lowered for the host CPU: jax's GPU backend returns no cost analysis for unoptimised programs.
    """
    with VARIANTS["explicit-attention"][0]():
        run, batch = setup(size, image_shape, batch_size, jax.devices("cpu")[:1])
        cost = run.train_step.lower(run.abstract_state, batch).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def measure(size, image_shape, batch_size, variant, steps, trace_to=None):
    with VARIANTS[variant][0]():
        run, batch = setup(size, image_shape, batch_size, options=VARIANTS[variant][2])
        state = run.init()
        t0 = time.perf_counter()
        step = run.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    if trace_to:
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _ in range(3):
                    state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
            found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
            if found:
                with open(found[0], "rb") as src, gzip.open(trace_to, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return seconds, compile_s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", default="1,4", help="batch multipliers, comma-separated")
    parser.add_argument(
        "--variants", default="default", help=f"comma-separated, of {list(VARIANTS)}"
    )
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--out", default="gpu_mfu.json")
    args = parser.parse_args()
    try:
        scales = [int(v) for v in args.scale.split(",")]
        if min(scales) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--scale takes positive integers separated by commas; got {args.scale!r}")
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"unknown --variants {unknown}; expected some of {list(VARIANTS)}")
    import flax
    import optax

    versions = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}
    device = jax.devices()[0]
    kind = device.device_kind
    peak = datasheet_peak(kind)
    measured = matmul_rate()
    print(f"device: {kind} ({device.platform}); {versions}")
    print(f"bf16 matmul 8192^3 (random operands) measured {measured / 1e12:.0f} TFLOP/s")
    if peak is None:
        peak = measured
        print("unknown chip: MFU is relative to the measured matmul rate")
    result = {
        "device": kind,
        "versions": versions,
        "peak": peak,
        "matmul_measured": measured,
        "models": [],
    }
    print(
        f"{'model':18s} {'variant':18s} {'batch':>5s} {'compile s':>9s} {'step ms':>8s} "
        f"{'img/s':>7s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    for label, size, shape, base_batch in MODELS:
        for scale in scales:
            batch_size = base_batch * scale
            flops = step_flops(size, shape, batch_size)
            for variant in variants:
                if size not in VARIANTS[variant][1]:
                    continue
                trace_to = None
                if args.trace_dir and scale == max(scales) and variant == variants[0]:
                    name = size.replace("/", "")
                    trace_to = os.path.join(args.trace_dir, f"trace_{name}.xplane.pb.gz")
                try:
                    seconds, compile_s = measure(
                        size, shape, batch_size, variant, args.steps, trace_to
                    )
                except Exception as e:  # one failing case (memory, compiler) keeps the others
                    print(f"{label:18s} {variant:18s} {batch_size:5d} failed: {e!r}"[:600])
                    result["models"].append(
                        {"model": label, "variant": variant, "batch": batch_size, "error": repr(e)}
                    )
                    continue
                row = {
                    "model": label,
                    "variant": variant,
                    "batch": batch_size,
                    "compile_s": compile_s,
                    "step_ms": seconds * 1e3,
                    "images_per_sec": batch_size / seconds,
                    "gflop_per_step": flops / 1e9,
                    "tflops": flops / seconds / 1e12,
                    "mfu": flops / seconds / peak,
                }
                result["models"].append(row)
                print(
                    f"{label:18s} {variant:18s} {batch_size:5d} {compile_s:9.1f} "
                    f"{row['step_ms']:8.1f} {row['images_per_sec']:7.0f} {row['tflops']:8.1f} "
                    f"{row['mfu']:6.1%}",
                    flush=True,
                )
                report.write(args.out, result, args)  # after every row: a timeout keeps them


if __name__ == "__main__":
    main()
