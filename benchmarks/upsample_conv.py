"""The U-Net's upsampling layer: nearest x2 upsampling then a 3x3 convolution, computed plainly
and folded (`apd.models.layers.upsample_conv`), forward+backward, side by side in one process.

    python benchmarks/upsample_conv.py [--reps=9] [--out=FILE.json]

Plain: `jnp.repeat` twice, then the convolution apd's `Conv` runs for that precision (XLA's
convolution in float32; `conv_as_matmul` with bfloat16 operands). Folded: four 2x2 phase kernels
as one batched matmul. Prints median milliseconds and the plain/folded ratio; writes JSON.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import report

from apd.models import layers

# (batch, h, w, channels): the low-resolution input; the output is 2h x 2w with as many channels.
SHAPES = [
    (2, 32, 32, 256),  # unet-60m at 64x64, batch 2: 32 -> 64
    (2, 16, 16, 384),  # unet-60m at 64x64, batch 2: 16 -> 32
    (32, 16, 16, 64),  # unet-60m shape, base 32, 32x32, batch 32
    (32, 8, 8, 96),
    (64, 7, 7, 64),  # unet-small on Fashion-MNIST, batch 64: 7 -> 14
]


def plain(x, kernel, dtype):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if dtype == jnp.bfloat16:
        return layers.conv_as_matmul(up, kernel, dtype)
    return jax.lax.conv_general_dilated(
        up, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def timed(fn, x, kernel, dtype, reps):
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.square(fn(x, k, dtype))), argnums=(0, 1)))
    return report.median_seconds(grad, x, kernel, reps=reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "upsample_conv.json")
    )
    args = parser.parse_args()
    rows = []
    print(
        f"{'input (B, h, w, C)':20s} {'dtype':9s} {'plain ms':>9s} {'folded ms':>10s} {'ratio':>6s}"
    )
    for shape in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape)
        kernel = 0.02 * jax.random.normal(jax.random.key(1), (3, 3, shape[-1], shape[-1]))
        for dtype in (jnp.float32, jnp.bfloat16):
            a = timed(plain, x, kernel, dtype, args.reps)
            b = timed(layers.upsample_conv, x, kernel, dtype, args.reps)
            name = jnp.dtype(dtype).name
            rows.append({"shape": shape, "dtype": name, "plain_s": a, "folded_s": b})
            print(f"{shape!s:20s} {name:9s} {1e3 * a:9.1f} {1e3 * b:10.1f} {a / b:6.2f}")
    report.write(args.out, {"rows": rows}, args)


if __name__ == "__main__":
    main()
