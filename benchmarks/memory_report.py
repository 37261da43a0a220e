"""Compiled memory per device of apd's real training step for the big models on a data x fsdp mesh.

    python benchmarks/memory_report.py [--models=unet-620m,dit-xl/2] [--per-chip=1,8,32]
        [--mesh=1x8] [--precision=bf16] [--out=benchmarks/memory_report.json]

For each model and per-chip batch size, builds the training step exactly as a run does
(`apd.training.builder.build`: the ImageNet 64 config of `experiments/imagenet64.py`, 1000
classes, AdamW, EMA, the state donated, parameters and optimizer state sharded over 'fsdp' by
`apd.models.partitioning`, the batch over every device), lowers and compiles it for the mesh,
never runs it, and reports `compiled.memory_analysis()` per device: arguments (the sharded
state and the batch), outputs, the part of the outputs aliased to the donated arguments,
temporaries, and their total (arguments + outputs - aliased + temporaries), with the chip sizes
that hold it. A chip "holds" the step when the total is at most 90% of its memory (the rest is
left to the runtime, cuDNN workspaces and fragmentation).

Shapes: the U-Nets at 64x64x3 (ImageNet 64 pixels; 64x64x3 latents are the same tensor shape,
hence the same memory), the DiTs at 32x32x4 (the latents of a 256x256 image; the patch-2 DiT
sees 256 tokens).

The mesh is made of fake CPU devices (`--xla_force_host_platform_device_count`, set here), so
the program is the one XLA:CPU compiles: GPU fusion and scheduling differ, and so do bf16
convolutions (a matmul on CPU, `layers.conv_as_matmul`); read the totals as estimates of the
GPU's. Remat policies do not lower XLA:CPU's peak (its scheduler computes the recomputation
early), so the compiled totals are for remat='none', and the table adds, per policy, the
residuals the backward pass keeps per device besides the parameters (the leaves of `jax.vjp` of
the model's forward pass on one device's batch, from `jax.eval_shape`: activations, and with
bf16 operands the bf16 copies of the weights that `layers.matmul` keeps): what a backend that
schedules the recomputation late saves.
"""

import argparse
import os
import sys
import time

DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import report  # noqa: E402

from apd.models import layers  # noqa: E402
from apd.training import builder  # noqa: E402
from apd.training import mesh as mesh_lib  # noqa: E402
from experiments import common, imagenet64  # noqa: E402

GiB = 2**30
CHIPS = {"16 GiB": 16, "80 GiB": 80, "141 GiB": 141}
HEADROOM = 0.9
SHAPES = {"unet": (64, 64, 3), "dit": (32, 32, 4)}
PRECISIONS = {  # name -> model options
    "f32": {},
    "bf16": {"dtype": "bfloat16"},
    "bf16-act": {"dtype": "bfloat16", "activation_dtype": "bfloat16"},
}
NUM_CLASSES = 1000


def image_shape(model: str) -> tuple[int, int, int]:
    return SHAPES["unet" if model.startswith("unet") else "dit"]


def config_for(model: str, global_batch: int, options: dict, shape=None):
    """The ImageNet 64 training config (620M settings) with the model, batch and data shape
    (default `image_shape(model)`; the level sampler's patch grids follow its side) swapped in."""
    shape = image_shape(model) if shape is None else shape
    config = imagenet64.get_config(f"size=620m,batch={global_batch}")
    config.model.name = model
    if not model.startswith("unet"):
        config.model.options.dropout = 0.0  # the DiT's configs train without dropout
    config.model.options.update(options)
    config.levels = common.level_sampler(config.levels.name, shape[0])
    return config


def compile_step(config, mesh, shape: tuple[int, int, int]):
    """The run (`builder.build`), its training step compiled for `mesh` (nothing is allocated or
    run) and the compile seconds."""
    run = builder.build(config, mesh, shape, NUM_CLASSES)
    batch = config.data.global_batch_size
    abstract_batch = {
        "image": jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=run.batch_sharding),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=run.batch_sharding),
    }
    t0 = time.perf_counter()
    compiled = run.train_step.lower(run.abstract_state, abstract_batch).compile(
        # LLVM's optimisations only lengthen compilation; buffer assignment comes before them.
        compiler_options={"xla_backend_optimization_level": 0}
    )
    return run, compiled, time.perf_counter() - t0


def memory_per_device(compiled) -> dict[str, int]:
    """`compiled.memory_analysis()` in bytes per device, with the total the device holds."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def residual_bytes(config, shape: tuple[int, int, int], per_chip: int) -> dict[str, int]:
    """Bytes of the activation residuals the backward pass keeps for one device's batch, per
    remat policy (abstract: jax.eval_shape, nothing computed)."""
    model = builder.build_model(config, NUM_CLASSES)
    z = jax.ShapeDtypeStruct((per_chip, *shape), jnp.float32)
    levels = jax.ShapeDtypeStruct((per_chip, *shape[:2]), jnp.float32)
    labels = jax.ShapeDtypeStruct((per_chip,), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(z.shape), jnp.zeros(levels.shape), None)[
            "params"
        ]
    )
    out = {}
    for remat in layers.REMAT_POLICIES:
        policy_model = model.clone(remat=remat)

        def count(p, z, levels, labels, m=policy_model, remat=remat):
            rngs = {"dropout": jax.random.key(0)}

            def loss(p):
                return jnp.sum(m.apply({"params": p}, z, levels, labels, train=True, rngs=rngs))

            # Counted while tracing (shapes are static); the parameters themselves, which the
            # backward pass also reads, are part of the state and not counted.
            inputs = {id(x) for x in jax.tree.leaves(p)}
            kept = [x for x in jax.tree.leaves(jax.vjp(loss, p)[1]) if id(x) not in inputs]
            out[remat] = sum(x.size * x.dtype.itemsize for x in kept)
            return jnp.zeros(())

        jax.eval_shape(count, params, z, levels, labels)
    return out


def fits(total: int) -> list[str]:
    return [name for name, gib in CHIPS.items() if total <= HEADROOM * gib * GiB]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="unet-620m,dit-xl/2")
    parser.add_argument("--per-chip", default="1,8,32", help="per-device batch sizes")
    parser.add_argument("--mesh", default=f"1x{DEVICES}", help="data x fsdp, e.g. 2x4")
    parser.add_argument("--precision", default="bf16", help=f"comma-separated, of {PRECISIONS}")
    parser.add_argument("--out", default="benchmarks/memory_report.json")
    args = parser.parse_args()
    try:
        per_chip = [int(v) for v in args.per_chip.split(",")]
        data, fsdp = (int(v) for v in args.mesh.split("x"))
        if min(per_chip) < 1 or min(data, fsdp) < 1:
            raise ValueError
    except ValueError:
        parser.error(
            f"--per-chip takes positive integers separated by commas and --mesh DATAxFSDP "
            f"(e.g. 1x8); got {args.per_chip!r} and {args.mesh!r}"
        )
    precisions = args.precision.split(",")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"unknown --precision {unknown}; expected some of {list(PRECISIONS)}")
    mesh = mesh_lib.make(data, fsdp)
    print(f"mesh data={data} x fsdp={fsdp} on {len(jax.devices())} {jax.devices()[0].platform}")
    header = (
        f"{'model':10s} {'precision':9s} {'per chip':>8s} {'args':>7s} {'outputs':>7s} "
        f"{'aliased':>7s} {'temps':>7s} {'total':>7s}  {'fits (GiB)':14s} "
        + " ".join(f"{'res ' + r:>14s}" for r in layers.REMAT_POLICIES)
        + f" {'compile s':>9s}"
    )
    print("per device, GiB; res POLICY: residuals kept for the backward pass (remat POLICY)")
    print(header)
    result = {"mesh": {"data": data, "fsdp": fsdp}, "headroom": HEADROOM, "rows": []}
    for model in args.models.split(","):
        shape = image_shape(model)
        for precision in precisions:
            for batch in per_chip:
                config = config_for(model, batch * data * fsdp, PRECISIONS[precision])
                _, compiled, compile_s = compile_step(config, mesh, shape)
                memory = memory_per_device(compiled)
                residuals = residual_bytes(config, shape, batch)
                row = {
                    "model": model,
                    "image_shape": list(shape),
                    "precision": precision,
                    "per_chip_batch": batch,
                    "global_batch": batch * data * fsdp,
                    "bytes": memory,
                    "residual_bytes": residuals,
                    "fits": fits(memory["total"]),
                    "compile_s": compile_s,
                }
                result["rows"].append(row)
                print(
                    f"{model:10s} {precision:9s} {batch:8d} "
                    + " ".join(
                        f"{memory[k] / GiB:7.2f}"
                        for k in ("arguments", "outputs", "aliased", "temporaries", "total")
                    )
                    + f"  {','.join(n.split()[0] for n in row['fits']) or 'none':14s} "
                    + " ".join(f"{residuals[r] / GiB:14.2f}" for r in layers.REMAT_POLICIES)
                    + f" {compile_s:9.1f}",
                    flush=True,
                )
                report.write(args.out, result, args)  # after every row: an interruption keeps them


if __name__ == "__main__":
    main()
