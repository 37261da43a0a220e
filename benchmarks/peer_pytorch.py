"""apd against the PyTorch peers: one training step (forward, backward, AdamW) of the same model.

  U-Net  apd `unet-60m` with 2 res blocks per level vs diffusers UNet2DModel built the same way
         (channels 128/256/384/384, attention at 16x16 and 8x8 with 64-dim heads, FiLM
         scale-shift, concatenated skips), 64x64x3.
  DiT    apd `dit-s/2` (1000 classes) vs diffusers DiTTransformer2DModel (DiT-S/2: width 384,
         depth 12, 6 heads, adaLN-Zero, 1000 classes), 32x32x4.

apd gets a per-pixel level map (its normal input), the peers one timestep per sample. Both run
float32 and bf16 (apd: bf16 matmul/conv operands with float32 accumulation; torch: CPU autocast
to bfloat16). Variants run round-robin in one process; the table reports medians, and each apd
variant's ratio to the torch variant of the same precision and the fastest apd variant's ratio to
the fastest torch variant, for medians and for minima (the least disturbed repetition on a shared
machine). JSON goes next to this script.

    pip install torch==2.13.0 diffusers==0.42.1   # the CPU wheel; never an unpinned torch
    python benchmarks/peer_pytorch.py [--reps 9] [--only unet|dit]
"""

import os

# Idle OpenMP threads of torch must not spin while JAX runs (and the other way round).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import report
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from apd import models

LR = 1e-4


def torch_unet() -> torch.nn.Module:
    return UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 384, 384),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
        norm_num_groups=32,
        resnet_time_scale_shift="scale_shift",
    )


def torch_dit() -> torch.nn.Module:
    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        num_layers=12,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


BACKBONES = {
    "unet": {
        "apd": ("unet-60m", {"res_blocks": (2, 2, 2, 2)}),
        "torch": torch_unet,
        "shape": (64, 64, 3),
        "batch": 2,
        "classes": False,
    },
    "dit": {
        "apd": ("dit-s/2", {"num_classes": 1000}),
        "torch": torch_dit,
        "shape": (32, 32, 4),
        "batch": 4,
        "classes": True,
    },
}


def round_robin(runs: dict, reps: int) -> dict:
    """Times each callable `reps` times, interleaved, with a pause between callables so that
    neither framework's idle threads spin into the other's timing; label -> list of seconds."""
    times = {label: [] for label in runs}
    for _ in range(reps):
        for label, run in runs.items():
            time.sleep(0.2)
            t0 = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - t0)
    return times


def count(params) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(params))


def apd_step(name, overrides, dtype, shape, batch, classes):
    H, W, C = shape
    keys = jax.random.split(jax.random.key(0), 4)
    model = models.build(name, dtype=dtype, **overrides)
    z = jax.random.normal(keys[0], (batch, H, W, C))
    target = jax.random.normal(keys[1], (batch, H, W, C))
    levels = jax.random.uniform(keys[2], (batch, H, W))
    labels = jnp.arange(batch, dtype=jnp.int32) if classes else None
    params = jax.jit(lambda: model.init(keys[3], z, levels, labels)["params"])()
    optimizer = optax.adamw(LR)
    state = [params, optimizer.init(params)]

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            return jnp.mean(jnp.square(model.apply({"params": p}, z, levels, labels) - target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run():
        state[0], state[1], loss = step(*state)
        jax.block_until_ready(loss)

    return run, count(params)


def torch_step(make, bf16, shape, batch, classes):
    H, W, C = shape
    torch.manual_seed(0)
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    x = torch.randn(batch, C, H, W)
    target = torch.randn(batch, C, H, W)
    t = torch.rand(batch) * 1000
    extra = {"class_labels": torch.arange(batch)} if classes else {}

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, **extra).sample
        loss = torch.mean(torch.square(out.float() - target))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--only", choices=list(BACKBONES), default=None)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "peer_pytorch.json")
    )
    args = parser.parse_args()
    results = {}
    for backbone, spec in BACKBONES.items():
        if args.only and backbone != args.only:
            continue
        common = (spec["shape"], spec["batch"], spec["classes"])
        runs, sizes = {}, {}
        for label, dtype in (("apd float32", jnp.float32), ("apd bf16", jnp.bfloat16)):
            runs[label], sizes["apd"] = apd_step(*spec["apd"], dtype, *common)
        for label, bf16 in (("torch float32", False), ("torch bf16 autocast", True)):
            runs[label], sizes["torch"] = torch_step(spec["torch"], bf16, *common)
        # Compile and warm up: two discarded round-robin passes (jit compiles again for the
        # updated state, and each framework's first call after the other's is slow once).
        round_robin(runs, 2)
        times = round_robin(runs, args.reps)
        medians = {label: statistics.median(ts) for label, ts in times.items()}
        minima = {label: min(ts) for label, ts in times.items()}
        ratios = {}
        for stat, values in (("median", medians), ("min", minima)):
            best_apd = min(values["apd float32"], values["apd bf16"])
            best_torch = min(values["torch float32"], values["torch bf16 autocast"])
            ratios[stat] = {
                "apd float32 / torch float32": values["apd float32"] / values["torch float32"],
                "apd bf16 / torch bf16 autocast": values["apd bf16"]
                / values["torch bf16 autocast"],
                "best apd / best torch": best_apd / best_torch,
            }
        results[backbone] = {
            "params": sizes,
            "shape": [spec["batch"], *spec["shape"]],
            "median_s": medians,
            "min_s": minima,
            "ratios": ratios,
            "times_s": times,
        }
        H, W, C = spec["shape"]
        print(
            f"\n{backbone}: batch {spec['batch']}, {H}x{W}x{C}, training step (fwd+bwd+AdamW), "
            f"{args.reps} reps; params apd {sizes['apd'] / 1e6:.1f}M, torch "
            f"{sizes['torch'] / 1e6:.1f}M"
        )
        print(f"{'variant':<22} {'median ms':>10} {'min ms':>8}")
        for label in runs:
            print(f"{label:<22} {1e3 * medians[label]:>10.0f} {1e3 * minima[label]:>8.0f}")
        print(f"{'time ratio':<32} {'medians':>8} {'minima':>7}")
        for label in ratios["median"]:
            print(f"{label:<32} {ratios['median'][label]:>8.2f} {ratios['min'][label]:>7.2f}")
    print()
    record = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    report.write(args.out, record, args)


if __name__ == "__main__":
    main()
