"""The accelerator check: training-step MFU, memory and time by kernel family, per model x variant.

    python benchmarks/gpu_mfu.py [--models=unet-60m,unet-620m,dit-b/2,dit-xl/2]
        [--variants=auto | VARIANT,...] [--steps=10] [--scale=1] [--profile]
        [--trace-dir=DIR] [--tiny] [--out=FILE.json]

Models (label: size, data shape, per-chip batch): unet-60m and unet-620m at 64x64x3 (ImageNet 64
pixels; 64x64x3 latents are the same tensor shape), batch 256 and 64; dit-b/2 and dit-xl/2 at
32x32x4 latents, batch 512 and 256 (times --scale). A variant is a precision policy, then
optionally '+' a remat policy (`layers.REMAT_POLICIES`) and '+' code switches:

  precision  f32 (float32 operands), bf16 (bf16 operands, float32 activations: apd's default
             bf16 path), bf16-act (bf16 operands and activations between layers, float32
             statistics and modulation: `activation_dtype="bfloat16"`)
  remat      none (default), dots, projections, full
  switches   explicit-attention (`layers.explicit_attention` instead of cuDNN's fused
             attention), f32-conv-output (bf16 convolutions asked for float32 outputs: apd's
             convolutions before `layers.conv_output_dtype`)

e.g. `bf16-act+full` or `bf16+f32-conv-output`. `--variants=auto` (default) runs each model's
list in `AUTO`, chosen so that the whole check (compilation included) fits in about 8 minutes
on one H200. The step is apd's real jitted training step (`apd.training.builder.build`: level
sampling, noising, forward, backward, AdamW, EMA, the state donated), compiled once per model
and variant; only jax, flax, optax and ml_collections are needed.

FLOPs per step come from XLA's cost analysis of the *lowered* (unoptimised) program with explicit
attention, lowered for the host CPU: after GPU compilation, matrix products and convolutions become
cuBLAS/cuDNN custom calls that the compiled cost analysis does not count, and the GPU backend
gives no cost analysis of the lowered program. Each row reports MFU against the chip's dense
bf16 datasheet peak (`PEAKS`; none on an unknown chip or a CPU) and against the bf16 matmul rate
measured in the same process (8192^3, random operands), the step time, the compiled memory
(`memory_analysis()`: arguments + outputs - aliased + temporaries) and the device's peak bytes
in use where the runtime reports them. With --profile, 3 more steps of every row run under
`jax.profiler` and the device's kernels are summed by family (`KERNEL_FAMILIES`: matmul,
convolution, attention, element-wise/reduction fusions, copies, collectives, other) in ms per
step; --trace-dir also keeps each trace as trace_<model>_<variant>.xplane.pb.gz.

--tiny runs the same check on unet-tiny and dit-tiny (16x16x3, batch 8) in f32 and bf16-act+full
on whatever backend jax has (on 2 idle CPU cores in about a minute, most of it compilation):
the check's own test, not a measurement. On a CPU the kernel families are approximate (XLA:CPU
fuses matmuls into element-wise fusions). Prints a table and writes JSON after
every row. Used by benchmarks/gpu_check.sh.
"""

import argparse
import collections
import contextlib
import glob
import gzip
import os
import re
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

MODELS = {  # label -> size, data shape, per-chip batch
    "unet-60m": ("unet-60m", (64, 64, 3), 256),
    "unet-620m": ("unet-620m", (64, 64, 3), 64),
    "dit-b/2": ("dit-b/2", (32, 32, 4), 512),
    "dit-xl/2": ("dit-xl/2", (32, 32, 4), 256),
}
TINY_MODELS = {
    "unet-tiny": ("unet-tiny", (16, 16, 3), 8),
    "dit-tiny": ("dit-tiny", (16, 16, 3), 8),
}

PRECISIONS = {
    "f32": {},
    "bf16": {"dtype": "bfloat16"},
    "bf16-act": {"dtype": "bfloat16", "activation_dtype": "bfloat16"},
}
SWITCHES = {  # name -> context manager that switches apd's code to it
    "explicit-attention": lambda: mock.patch.object(layers, "attention", layers.explicit_attention),
    "f32-conv-output": lambda: mock.patch.object(
        layers, "conv_output_dtype", lambda dtype, backend=None: jnp.dtype(jnp.float32)
    ),
}
# The default variants per model: the precision A/B on the models profiled before, the new
# bf16-activation path on the big ones, and one remat policy where memory is tight.
AUTO = {
    "unet-60m": ("bf16", "bf16-act"),
    "unet-620m": ("bf16-act", "bf16-act+dots"),
    "dit-b/2": ("bf16", "bf16-act"),
    "dit-xl/2": ("bf16-act",),
    "unet-tiny": ("f32", "bf16-act+full"),
    "dit-tiny": ("f32", "bf16-act+full"),
}

# Kernel name -> family, first match wins (cuBLAS/CUTLASS/Triton GEMMs, cuDNN convolution
# kernels (fprop/dgrad/wgrad), fused attention, XLA's fusions, copies, NCCL; XLA:CPU op names).
KERNEL_FAMILIES = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|\bdot|dot\.|xmma"),
    ("collective", r"nccl|all.?reduce|all.?gather|reduce.?scatter|collective"),
    ("copy", r"copy|memcpy|memset|transpose"),
    ("fusion", r"fusion|reduce|loop|elementwise|broadcast|convert|select|wrapped_"),
)
# Markers and enclosing spans of XLA:CPU's executor, not kernels.
_IGNORED_EVENTS = re.compile(r"ThreadpoolListener|SlinkyThreadPool|ThunkExecutor|^end: ")


def parse_variant(variant: str) -> tuple[dict, str, tuple[str, ...]]:
    """'PRECISION[+REMAT][+SWITCH...]' -> (model options, remat policy, switches)."""
    precision, *rest = variant.split("+")
    remats = [r for r in rest if r in layers.REMAT_POLICIES]
    switches = tuple(r for r in rest if r in SWITCHES)
    unknown = [r for r in rest if r not in layers.REMAT_POLICIES and r not in SWITCHES]
    if precision not in PRECISIONS or unknown or len(remats) > 1:
        raise ValueError(
            f"variant {variant!r} is not PRECISION[+REMAT][+SWITCH...] with PRECISION in "
            f"{list(PRECISIONS)}, one REMAT in {list(layers.REMAT_POLICIES)} and SWITCH in "
            f"{list(SWITCHES)}."
        )
    remat = remats[0] if remats else "none"
    return {**PRECISIONS[precision], "remat": remat}, remat, switches


@contextlib.contextmanager
def switched(switches: tuple[str, ...]):
    with contextlib.ExitStack() as stack:
        for name in switches:
            stack.enter_context(SWITCHES[name]())
        yield


def kernel_family(name: str) -> str:
    lowered = name.lower()
    return next((f for f, pattern in KERNEL_FAMILIES if re.search(pattern, lowered)), "other")


def profile_summary(xplane_path: str, steps: int) -> dict[str, float]:
    """ms per step by kernel family from a jax.profiler trace: the device planes' stream lines
    on an accelerator, XLA's executor threads on a CPU."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    if planes:
        lines = [ln for p in planes for ln in p.lines if ln.name.startswith("Stream")]
        lines = lines or [ln for p in planes for ln in p.lines if ln.name == "XLA Ops"]
    else:
        lines = [
            ln
            for p in data.planes
            if p.name == "/host:CPU"
            for ln in p.lines
            if ln.name.startswith("tf_XLAPjRtCpuClient")
        ]
    totals = collections.Counter()
    for line in lines:
        for event in line.events:
            if not _IGNORED_EVENTS.search(event.name):
                totals[kernel_family(event.name)] += event.duration_ns / 1e6 / steps
    return {family: round(ms, 3) for family, ms in totals.most_common()}


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
    config.model.options.update(options or {})
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
    with SWITCHES["explicit-attention"]():
        run, batch = setup(size, image_shape, batch_size, jax.devices("cpu")[:1])
        cost = run.train_step.lower(run.abstract_state, batch).cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def measure(size, image_shape, batch_size, variant, steps, profile=False, trace_to=None):
    """Compiles and times the step; returns a dict of seconds, memory and the profile."""
    options, _, switches = parse_variant(variant)
    with switched(switches):
        run, batch = setup(size, image_shape, batch_size, options=options)
        state = run.init()
        t0 = time.perf_counter()
        step = run.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    m = step.memory_analysis()
    compiled_bytes = None
    if m is not None:
        compiled_bytes = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            - m.alias_size_in_bytes
            + m.temp_size_in_bytes
        )
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    stats = jax.devices()[0].memory_stats() or {}
    out = {
        "seconds": seconds,
        "compile_s": compile_s,
        "compiled_bytes": compiled_bytes,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "loss": float(metrics["loss"]),
    }
    if profile or trace_to:
        traced = 3
        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp):
                for _ in range(traced):
                    state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
            found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
            if found:
                out["profile_ms"] = profile_summary(found[0], traced)
                if trace_to:
                    with open(found[0], "rb") as src, gzip.open(trace_to, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=None, help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument(
        "--variants", default="auto", help="'auto' or PRECISION[+REMAT][+SWITCH...],..."
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scale", type=int, default=1, help="per-chip batch multiplier")
    parser.add_argument("--profile", action="store_true", help="time by kernel family")
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny models: the check's own test")
    parser.add_argument("--out", default="gpu_mfu.json")
    args = parser.parse_args()
    table = TINY_MODELS if args.tiny else MODELS
    labels = args.models.split(",") if args.models else list(table)
    if unknown := [m for m in labels if m not in table]:
        parser.error(f"unknown --models {unknown}; expected some of {list(table)}")
    if args.scale < 1 or args.steps < 1:
        parser.error(f"--scale and --steps must be positive; got {args.scale}, {args.steps}")
    variants = {m: AUTO[m] if args.variants == "auto" else args.variants.split(",") for m in labels}
    for vs in variants.values():
        for v in vs:
            try:
                parse_variant(v)
            except ValueError as e:
                parser.error(str(e))
    import flax
    import optax

    versions = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}
    device = jax.devices()[0]
    kind = device.device_kind
    peak = datasheet_peak(kind)
    measured = matmul_rate(1024 if args.tiny else 8192)
    print(f"device: {kind} ({device.platform}); {versions}")
    print(f"bf16 matmul (random operands) measured {measured / 1e12:.3f} TFLOP/s")
    if peak is None:
        print("no datasheet peak for this chip: MFU only against the measured matmul rate")
    result = {
        "device": kind,
        "platform": device.platform,
        "versions": versions,
        "peak": peak,
        "matmul_measured": measured,
        "rows": [],
    }
    print(
        f"{'model':10s} {'variant':24s} {'batch':>5s} {'compile s':>9s} {'step ms':>9s} "
        f"{'img/s':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'MFU/mm':>6s} {'mem GiB':>7s} "
        f"{'peak GiB':>8s}  profile ms/step"
    )
    for label in labels:
        size, shape, base_batch = table[label]
        batch_size = base_batch * args.scale
        flops = step_flops(size, shape, batch_size)
        for variant in variants[label]:
            trace_to = None
            if args.trace_dir:
                name = f"{label}_{variant}".replace("/", "").replace("+", "_")
                trace_to = os.path.join(args.trace_dir, f"trace_{name}.xplane.pb.gz")
            try:
                m = measure(size, shape, batch_size, variant, args.steps, args.profile, trace_to)
            except Exception as e:  # one failing case (memory, compiler) keeps the others
                print(f"{label:10s} {variant:24s} {batch_size:5d} failed: {e!r}"[:600])
                result["rows"].append(
                    {"model": label, "variant": variant, "batch": batch_size, "error": repr(e)}
                )
                report.write(args.out, result, args)
                continue
            seconds = m.pop("seconds")
            row = {
                "model": label,
                "size": size,
                "image_shape": list(shape),
                "variant": variant,
                "batch": batch_size,
                "step_ms": seconds * 1e3,
                "images_per_sec": batch_size / seconds,
                "gflop_per_step": flops / 1e9,
                "tflops": flops / seconds / 1e12,
                "mfu": None if peak is None else flops / seconds / peak,
                "mfu_vs_measured_matmul": flops / seconds / measured,
                **m,
            }
            result["rows"].append(row)

            def gib(v):
                return "-" if v is None else f"{v / 2**30:.2f}"

            profile = ", ".join(f"{k} {v:.1f}" for k, v in row.get("profile_ms", {}).items())
            mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print(
                f"{label:10s} {variant:24s} {batch_size:5d} {row['compile_s']:9.1f} "
                f"{row['step_ms']:9.1f} {row['images_per_sec']:7.0f} {row['tflops']:8.3f} "
                f"{mfu:>6s} {row['mfu_vs_measured_matmul']:6.1%} "
                f"{gib(row['compiled_bytes']):>7s} {gib(row['peak_bytes_in_use']):>8s}  {profile}",
                flush=True,
            )
            report.write(args.out, result, args)  # after every row: a timeout keeps them


if __name__ == "__main__":
    main()
