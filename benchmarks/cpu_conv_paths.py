"""Kernel-level speeds behind apd's CPU convolution paths, side by side in one process.

    python benchmarks/cpu_conv_paths.py [--reps=7] [--out=FILE.json]

1. Matmul GFLOP/s, float32 and bfloat16 operands (float32 accumulation), XLA and, when torch is
   installed, PyTorch (2 threads), at 2048^3 and at the U-Net's three-tap shape.
2. A 3x3 'SAME' convolution at U-Net shapes with bfloat16 operands, forward and
   forward+backward GFLOP/s: apd's three-tap matmul (`layers.conv_as_matmul`), a full 9-tap
   im2col matmul, XLA's convolution with float32 output and with bfloat16 output, XLA's float32
   convolution, and torch's bf16 autocast convolution (forward) when torch is installed.
3. The weight gradient's product (a^T g over the pixel axis) in bfloat16: the form
   `layers._dot_tn` uses, a plain contraction over the leading axis, an explicit transpose, and
   8 chunks summed; the forward-layout product of the same size for reference.

Prints tables and writes JSON.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import report
from jax import lax

from apd.models import layers

BF16, F32 = jnp.bfloat16, jnp.float32
DIMS = ("NHWC", "HWIO", "NHWC")
CONV_SHAPES = [(2, 64, 64, 256), (2, 32, 32, 384), (2, 64, 64, 128)]


def torch_seconds(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def im2col(x, kernel, dtype):
    B, H, W, C = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.concatenate(
        [padded[:, i : i + H, j : j + W] for i in range(3) for j in range(3)], axis=-1
    )
    out = layers.matmul(taps.reshape(-1, 9 * C), kernel.reshape(9 * C, -1), dtype)
    return out.reshape(B, H, W, -1)


def xla_conv(out_dtype):
    def conv(x, kernel, dtype):
        y = lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            (1, 1),
            "SAME",
            dimension_numbers=DIMS,
            preferred_element_type=out_dtype,
        )
        return y.astype(F32)

    return conv


CONV_FORMS = {
    "three-tap matmul (apd)": (layers.conv_as_matmul, BF16),
    "9-tap im2col matmul": (im2col, BF16),
    "XLA conv, f32 out": (xla_conv(F32), BF16),
    "XLA conv, bf16 out": (xla_conv(None), BF16),
    "XLA conv float32": (xla_conv(F32), F32),
}


def weight_grad_forms():
    def unit(a, g):  # layers._dot_tn's bf16 form
        return layers._dot_tn(a, g, BF16)

    def plain(a, g):
        return lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    def explicit(a, g):
        return lax.dot_general(a.T, g, (((1,), (0,)), ((), ())), preferred_element_type=F32)

    def chunks(a, g):
        a8, g8 = a.reshape(8, -1, a.shape[-1]), g.reshape(8, -1, g.shape[-1])
        dims = (((1,), (1,)), ((0,), (0,)))
        return lax.dot_general(a8, g8, dims, preferred_element_type=F32).sum(0)

    def forward_layout(a, g):
        return lax.dot_general(
            a, g[: a.shape[1]], (((1,), (0,)), ((), ())), preferred_element_type=F32
        )

    return {
        "contraction over 2 axes (apd)": unit,
        "plain leading-axis contraction": plain,
        "explicit transpose": explicit,
        "8 chunks summed": chunks,
        "forward layout (reference)": forward_layout,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "cpu_conv_paths.json")
    )
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        torch = None
    record = {}

    print("matmul GFLOP/s (float32 accumulation)")
    matmuls = []
    for m, k, n in ((2048, 2048, 2048), (8192, 768, 768)):
        row = {"shape": [m, k, n]}
        for name, dtype in (("float32", F32), ("bfloat16", BF16)):
            a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
            f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
            seconds = report.median_seconds(f, a, b, reps=args.reps)
            row[f"xla {name}"] = 2 * m * k * n / seconds / 1e9
            if torch is not None:
                tdt = torch.float32 if dtype == F32 else torch.bfloat16
                ta, tb = torch.ones(m, k, dtype=tdt), torch.ones(k, n, dtype=tdt)
                seconds = torch_seconds(lambda ta=ta, tb=tb: ta @ tb, args.reps)
                row[f"torch {name}"] = 2 * m * k * n / seconds / 1e9
        matmuls.append(row)
        print("  " + ", ".join(f"{k}: {v:.0f}" if k != "shape" else str(v) for k, v in row.items()))
    record["matmul_gflops"] = matmuls

    print("\n3x3 conv GFLOP/s, forward / forward+backward")
    convs = []
    for shape in CONV_SHAPES:
        B, H, W, C = shape
        x = jax.random.normal(jax.random.key(0), shape)
        kernel = 0.02 * jax.random.normal(jax.random.key(1), (3, 3, C, C))
        flops = 2 * B * H * W * C * C * 9
        row = {"shape": list(shape)}
        for name, (fn, dtype) in CONV_FORMS.items():
            fwd = jax.jit(lambda x, k, fn=fn, dtype=dtype: fn(x, k, dtype))
            both = jax.jit(
                jax.grad(
                    lambda x, k, fn=fn, dtype=dtype: jnp.sum(jnp.square(fn(x, k, dtype))),
                    argnums=(0, 1),
                )
            )
            row[name] = [
                flops / report.median_seconds(fwd, x, kernel, reps=args.reps) / 1e9,
                3 * flops / report.median_seconds(both, x, kernel, reps=args.reps) / 1e9,
            ]
        if torch is not None:
            tx, tw = torch.randn(B, C, H, W), torch.randn(C, C, 3, 3)

            def torch_conv(tx=tx, tw=tw):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    torch.nn.functional.conv2d(tx, tw, padding=1)

            row["torch bf16 autocast (forward)"] = [
                flops / torch_seconds(torch_conv, args.reps) / 1e9
            ]
        convs.append(row)
        print(f"  {shape}")
        for name, values in row.items():
            if name != "shape":
                print(f"    {name:32s} " + " / ".join(f"{v:.0f}" for v in values))
    record["conv_gflops_fwd_fwdbwd"] = convs

    print("\nweight-gradient product a^T g, a [8192, 768], g [8192, 768], bfloat16: GFLOP/s")
    a = jax.random.normal(jax.random.key(0), (8192, 768)).astype(BF16)
    g = jax.random.normal(jax.random.key(1), (8192, 768)).astype(BF16)
    grads = {}
    for name, fn in weight_grad_forms().items():
        seconds = report.median_seconds(jax.jit(fn), a, g, reps=args.reps)
        grads[name] = 2 * 8192 * 768 * 768 / seconds / 1e9
        print(f"  {name:32s} {grads[name]:.0f}")
    record["weight_grad_gflops"] = grads

    report.write(args.out, record, args)


if __name__ == "__main__":
    main()
