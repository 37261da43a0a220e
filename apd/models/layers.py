"""Layers shared by the backbones: matmuls and convolutions with a selectable operand precision,
multi-head attention, normalisation fused with modulation and SiLU, rematerialisation policies.

Precision: parameters are float32. `dtype` is the operand dtype of matmuls and convolutions
(float32 or bfloat16); they always accumulate and return float32
(`preferred_element_type=float32`), so normalisation, modulation, residual sums and outputs stay
float32 whatever `dtype` is, unless a model keeps bf16 activations (`out_dtype`). Matmuls use
`matmul`, whose backward pass also multiplies in `dtype` (autodiff of a bf16 forward would
multiply the float32 cotangents in float32, losing most of the bf16 speed-up, since two of a
training step's three matmuls are in the backward pass).
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from apd import checks

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

zeros = nn.initializers.zeros
default_kernel_init = nn.initializers.lecun_normal()

# The name `checkpoint_name` gives the outputs of the layers with weights (Dense, Conv): what the
# 'projections' remat policy saves.
PROJECTION = "projection"


def _dot(a: Array, b: Array, contract: tuple[int, int], dtype: Dtype) -> Array:
    """dot_general over the leading batch axes, contracting axis contract[0] of a (-1 or -2)
    with axis contract[1] of b, operands in dtype, float32 accumulation and output."""
    batch = tuple(range(a.ndim - 2))
    dims = (((a.ndim + contract[0],), (b.ndim + contract[1],)), (batch, batch))
    return jax.lax.dot_general(
        a.astype(dtype), b.astype(dtype), dims, preferred_element_type=jnp.float32
    )


def _dot_tn(a: Array, b: Array, dtype: Dtype) -> Array:
    """a^T b: a [..., K, M], b [..., K, N] -> [..., M, N], float32 accumulation and output.

    XLA:CPU multiplies bf16 operands contracted over their leading (non-batch) axis about half as
    fast as the other layouts; written as a contraction over two axes (K and a unit axis) it takes
    the fast path (measured 150 -> 310-370 GFLOP/s for the weight gradients of a DiT-S block).
    float32 is fast either way, and slower with the unit axis (it adds a transposing copy).
    """
    if dtype == jnp.float32:
        return _dot(a, b, (-2, -2), dtype)
    batch = tuple(range(a.ndim - 2))
    k = a.ndim - 2
    dims = (((k, k + 1), (k, k + 1)), (batch, batch))
    a, b = (x.astype(dtype)[..., None, :, :] for x in (a, b))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a: Array, b: Array, dtype: Dtype, out_dtype: Dtype) -> Array:
    return _dot(a, b, (-1, -2), dtype).astype(out_dtype)


def _matmul_fwd(a: Array, b: Array, dtype: Dtype, out_dtype: Dtype):
    a, b = a.astype(dtype), b.astype(dtype)
    return _dot(a, b, (-1, -2), dtype).astype(out_dtype), (a, b)


def _matmul_bwd(dtype: Dtype, out_dtype: Dtype, res, g: Array):
    a, b = res
    g = g.astype(dtype)
    return _dot(g, b, (-1, -1), dtype), _dot_tn(a, g, dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a: Array, b: Array, dtype: Dtype = jnp.float32, out_dtype: Dtype = jnp.float32) -> Array:
    """a [..., M, K] @ b [..., K, N] -> [..., M, N] `out_dtype`, operands in `dtype` in both passes.

    a and b have the same leading batch axes; products accumulate in float32 and both gradients
    are float32 (the operands are rounded to `dtype` inside, so the bf16 copies are what the
    backward pass keeps). Returning the activations' gradient in float32 rather than rounded to
    bf16 is also faster on CPU: the element-wise gradient work after it (the transposes of pads,
    slices and concatenations) runs in native float32 instead of emulated bf16. `out_dtype`
    (float32 unless a model keeps bf16 activations) rounds the float32 accumulator on output.
    """
    return _matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), jnp.dtype(dtype), jnp.dtype(out_dtype)
    )


def to_rank(v: Array, ndim: int) -> Array:
    """Prepends size-1 axes so `v` broadcasts against an array of rank `ndim` (rank promotion is
    strict in apd's tests)."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


class Dense(nn.Module):
    """y = x @ kernel + bias over the last axis; float32 accumulation and output.

    Attributes:
      features: output width.
      use_bias: add a learned bias.
      dtype: operand dtype of the matmul (float32 or bfloat16).
      out_dtype: output dtype (float32, or bfloat16 for models that keep bf16 activations).
      kernel_init: initialiser of the [in, features] kernel.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    out_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        y = matmul(x.reshape(-1, x.shape[-1]), kernel, self.dtype, self.out_dtype)
        y = y.reshape(*x.shape[:-1], self.features)
        if self.use_bias:
            bias = self.param("bias", zeros, (self.features,), jnp.float32)
            y = y + to_rank(bias.astype(y.dtype), y.ndim)
        return checkpoint_name(y, PROJECTION)


def conv_as_matmul(x: Array, kernel: Array, dtype: Dtype) -> Array:
    """Stride-1 'SAME' convolution with an odd k x k kernel computed by one `matmul`.

    Each pixel's k horizontal taps are concatenated along channels ([B, H, W, kC]) and multiplied
    by the kernel arranged [kC, k * C_out]: the result holds each input row's contribution to
    the k output rows around it, which are summed with row shifts. XLA:CPU's bf16 convolution
    is no faster than float32, while its bf16 matmul (both passes, see `matmul`) is about twice
    as fast: a 3x3 conv at 32x32x256 and 16x16x384 ran forward+backward at 260-300 instead of
    155-185 GFLOP/s (at 64x64x128 on par).

    Args:
      x: [B, H, W, C] float32.
      kernel: [k, k, C, C_out] float32, k odd.
      dtype: operand dtype of the matmul.
    Returns:
      [B, H, W, C_out] float32.
    """
    B, H, W, C = x.shape
    k, out = kernel.shape[0], kernel.shape[-1]
    p = k // 2
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (p, p), (0, 0)))
    taps = jnp.concatenate([padded[:, :, j : j + W] for j in range(k)], axis=-1)
    weights = kernel.transpose(1, 2, 0, 3).reshape(k * C, k * out)  # [(j, c), (i, o)]
    rows = matmul(taps.reshape(-1, k * C), weights, dtype).reshape(B, H, W, k, out)
    rows = jnp.pad(rows, ((0, 0), (p, p), (0, 0), (0, 0), (0, 0)))
    return sum(rows[:, i : i + H, :, i] for i in range(k))


# Nearest x2 upsampling then a 3x3 kernel: output row phase a (even, odd) reads low-resolution
# rows i - 1 + a + u, u in {0, 1}, through the kernel taps _FOLD[a][u] (summed).
_FOLD = (((0,), (1, 2)), ((0, 1), (2,)))


def _fold_kernel(kernel: Array) -> Array:
    """[3, 3, C, C_out] -> [a, b, u, v, C, C_out]: the 2x2 kernel of each output phase (a, b)."""
    return jnp.stack(
        [
            jnp.stack(
                [
                    sum(kernel[i, j] for i in _FOLD[a][u] for j in _FOLD[b][v])
                    for u in (0, 1)
                    for v in (0, 1)
                ]
            )
            for a in (0, 1)
            for b in (0, 1)
        ]
    ).reshape(2, 2, 2, 2, *kernel.shape[2:])


def upsample_conv(x: Array, kernel: Array, dtype: Dtype) -> Array:
    """Nearest-neighbour x2 upsampling followed by a 3x3 'SAME' convolution, without upsampling.

    Each of the four output phases (row parity a, column parity b) is a 2x2 convolution of the
    low-resolution input with the 3x3 kernel's taps summed where two of them read the same
    low-resolution pixel. The four run as one batched matmul over [phase, pixels, 4C] taps:
    16 instead of 36 multiply-adds per low-resolution pixel and channel pair (2.25x fewer FLOPs,
    and the upsampled input is never written).

    Args:
      x: [B, h, w, C] float32.
      kernel: [3, 3, C, C_out] float32 (the kernel of the equivalent convolution at 2h x 2w).
      dtype: operand dtype of the matmul.
    Returns:
      [B, 2h, 2w, C_out] float32, equal to conv(repeat(repeat(x, 2, 1), 2, 2), kernel).
    """
    B, h, w, C = x.shape
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample_conv needs a 3x3 kernel; got {kernel.shape}.")
    out = kernel.shape[-1]
    kernels = _fold_kernel(kernel)  # [a, b, u, v, C, C_out]
    padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.stack(
        [
            jnp.concatenate(
                [padded[:, a + u : a + u + h, b + v : b + v + w] for u in (0, 1) for v in (0, 1)],
                axis=-1,
            ).reshape(B * h * w, 4 * C)
            for a in (0, 1)
            for b in (0, 1)
        ]
    )  # [phase (a, b), B h w, (u, v, C)]
    y = matmul(taps, kernels.reshape(4, 4 * C, out), dtype)  # [phase, B h w, C_out]
    y = y.reshape(2, 2, B, h, w, out).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(B, 2 * h, 2 * w, out)


def conv_output_dtype(dtype: Dtype, backend: str | None = None) -> jnp.dtype:
    """The dtype a convolution with `dtype` operands writes (then cast to float32).

    float32 everywhere except bf16 operands on GPU: cuDNN has no bf16-input, float32-output
    convolution, so XLA would run the whole convolution in float32 (TF32 tensor-core kernels,
    half the bf16 rate, twice the memory traffic; seen in a profile of the 60M U-Net on an H200).
    There the bf16 kernels accumulate in float32 and round the output to bf16.
    """
    backend = jax.default_backend() if backend is None else backend
    if jnp.dtype(dtype) == jnp.bfloat16 and backend == "gpu":
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


class Conv(nn.Module):
    """2-D convolution, NHWC, 'SAME' padding; float32 accumulation, output in `out_dtype`.

    With bfloat16 operands on CPU, stride-1 convolutions run as a matmul (`conv_as_matmul`); on
    GPU they write bf16 before the cast to float32 (`conv_output_dtype`).
    With `upsample`, the input is first upsampled x2 (nearest neighbour), computed folded into
    the convolution (`upsample_conv`); the parameters are those of the plain convolution.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
      strides: stride along both spatial axes.
      upsample: nearest x2 upsampling before the convolution (3x3, stride 1 only).
      dtype: operand dtype (float32 or bfloat16).
      out_dtype: output dtype (float32, or bfloat16 for models that keep bf16 activations).
      kernel_init: initialiser of the [k, k, in, features] kernel.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    upsample: bool = False
    dtype: Dtype = jnp.float32
    out_dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32
        )
        as_matmul = jnp.dtype(self.dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"
        if self.upsample:
            if self.strides != 1:
                raise ValueError(f"an upsampling Conv has stride 1; got {self.strides}.")
            y = upsample_conv(x, kernel, self.dtype)
        elif as_matmul and self.strides == 1 and k % 2:
            y = conv_as_matmul(x, kernel, self.dtype)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                kernel.astype(self.dtype),
                window_strides=(self.strides, self.strides),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                preferred_element_type=conv_output_dtype(self.dtype),
            )
        bias = self.param("bias", zeros, (self.features,), jnp.float32)
        y = y.astype(self.out_dtype) + to_rank(bias.astype(self.out_dtype), 4)
        return checkpoint_name(y, PROJECTION)


def _sum_to(g: Array, shape: tuple[int, ...]) -> Array:
    """Sums g over the axes where `shape` has size 1 (the adjoint of broadcasting to g)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape, strict=True)) if b == 1 != a)
    return jnp.sum(g, axis=axes, keepdims=True)


def _silu_and_grad(y: Array) -> tuple[Array, Array]:
    sig = jax.nn.sigmoid(y)
    return y * sig, sig * (1.0 + y * (1.0 - sig))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm_modulate(
    x: Array, gain: Array, shift: Array, axes: tuple[int, ...], eps: float, silu, center
):
    return _norm_modulate_fwd(x, gain, shift, axes, eps, silu, center)[0]


def _norm_modulate_fwd(x, gain, shift, axes, eps, silu, center):
    # Statistics, modulation and SiLU in float32; the output in x's dtype. Saved for the backward
    # pass: x itself (live anyway as the block's input or a layer's output), the per-group mean
    # (a scalar 0 when not centring) and reciprocal standard deviation (root mean square when
    # not centring), and gain and shift; xhat and the pre-activation are recomputed there from
    # them in one element-wise pass.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True) if center else jnp.zeros((), jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True) + eps)
    y = (x32 - mean) * rstd * gain + shift
    if silu:
        y = _silu_and_grad(y)[0]
    return y.astype(x.dtype), (x, mean, rstd, gain, shift)


def _norm_modulate_bwd(axes, eps, silu, center, res, dy):
    x, mean, rstd, gain, shift = res
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = dy.astype(jnp.float32)
    if silu:
        g = g * _silu_and_grad(xhat * gain + shift)[1]
    dxhat = g * gain
    mean_dxhat_xhat = jnp.mean(dxhat * xhat, axis=axes, keepdims=True)
    if center:
        dxhat = dxhat - jnp.mean(dxhat, axis=axes, keepdims=True)
    dx = (dxhat - xhat * mean_dxhat_xhat) * rstd
    return dx.astype(x.dtype), _sum_to(g * xhat, gain.shape), _sum_to(g, shift.shape)


_norm_modulate.defvjp(_norm_modulate_fwd, _norm_modulate_bwd)


def norm_modulate(
    x: Array,
    gain: Array,
    shift: Array,
    *,
    groups: int = 1,
    spatial_axes: tuple[int, ...] = (),
    eps: float = 1e-5,
    silu: bool = False,
    center: bool = True,
) -> Array:
    """Normalisation, modulation and optionally SiLU as one function with a hand-written VJP.

        y = act(xhat * gain + shift),   xhat = (x - mean) / sqrt(var + eps)

    with the mean and variance taken over `spatial_axes` and, within each of `groups` equal
    slices of the channels, over the channels: LayerNorm is groups=1 and no spatial axes,
    GroupNorm is `spatial_axes=(1, 2)` for [B, H, W, C]. With center=False the mean is not
    subtracted (xhat = x / sqrt(mean(x^2) + eps)): RMSNorm is groups=1, no spatial axes and
    center=False. gain and shift broadcast against x with
    C (or 1) channels: [C] for an affine norm, per-token [B, h, w, C] for FiLM / adaLN (1 +
    scale and shift). act is SiLU or the identity.

    Statistics, modulation and SiLU run in float32 and the result has x's dtype (bf16 with bf16
    activations). The backward pass saves x, the per-group statistics, gain and shift, and
    recomputes xhat and the pre-activation in the one element-wise pass that forms all three
    gradients: autodiff of the unfused form saves xhat, the pre-activation and the SiLU's
    sigmoid (three activation-sized arrays) and reads them in separate passes.
    The gradients of gain and shift are float32, x's in x's dtype.
    """
    C = x.shape[-1]
    if groups < 1 or C % groups:
        raise ValueError(f"groups must be a positive divisor of the channels {C}; got {groups}.")
    ndim = x.ndim
    spatial = tuple(sorted(a % ndim for a in spatial_axes))
    if any(a in (0, ndim - 1) for a in spatial):
        raise ValueError(
            f"spatial_axes must name axes between the batch and the channel axis of a rank-{ndim} "
            f"array; got {spatial_axes}."
        )

    def grouped(v: Array) -> Array:
        v = to_rank(jnp.asarray(v, jnp.float32), ndim)
        if v.shape[-1] not in (1, C):
            raise ValueError(f"gain and shift need {C} or 1 channels; got shape {v.shape}.")
        return v.reshape(*v.shape[:-1], *((groups, C // groups) if v.shape[-1] == C else (1, 1)))

    y = _norm_modulate(
        x.reshape(*x.shape[:-1], groups, C // groups),
        grouped(gain),
        grouped(shift),
        (*spatial, ndim),
        float(eps),
        bool(silu),
        bool(center),
    )
    return y.reshape(x.shape)


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, C / G) of [B, H, W, C] with gcd(groups, C) groups (any channel count
    works), float32 statistics, then either its own affine (parameters 'scale' and 'bias', as
    flax's GroupNorm) or, with affine=False, a per-location FiLM (1 + scale, shift), then
    optionally SiLU: one `norm_modulate`. The output has x's dtype.

    Attributes:
      groups: requested number of groups.
      affine: learned per-channel scale and bias.
      epsilon: added to the variance.
    """

    groups: int = 32
    affine: bool = True
    epsilon: float = 1e-5

    @nn.compact
    def __call__(
        self, x: Array, scale: Array | None = None, shift: Array | None = None, silu: bool = False
    ) -> Array:
        """x [B, H, W, C]; scale, shift: FiLM parameters broadcasting against x (affine=False
        only; float32); silu: apply SiLU after the modulation."""
        C = x.shape[-1]
        if self.affine:
            if scale is not None or shift is not None:
                raise ValueError("an affine GroupNorm takes no FiLM scale or shift.")
            gain = self.param("scale", nn.initializers.ones, (C,), jnp.float32)
            shift = self.param("bias", zeros, (C,), jnp.float32)
        else:
            gain = jnp.ones((C,), jnp.float32) if scale is None else 1.0 + scale
            shift = jnp.zeros((C,), jnp.float32) if shift is None else shift
        return norm_modulate(
            x,
            gain,
            shift,
            groups=math.gcd(self.groups, C),
            spatial_axes=(1, 2),
            eps=self.epsilon,
            silu=silu,
        )


def explicit_attention(q: Array, k: Array, v: Array, dtype: Dtype) -> Array:
    """Softmax attention as two batched matmuls in (B, heads, N, head_dim) layout.

    Args:
      q, k, v: [B, N, heads, head_dim] float32 (or bf16 activations).
      dtype: operand dtype of the two matmuls; logits and softmax are float32.
    Returns:
      [B, N, heads, head_dim] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))
    logits = matmul(q, jnp.swapaxes(k, -1, -2), dtype)
    out = matmul(jax.nn.softmax(logits, axis=-1), v, dtype, q.dtype)
    return jnp.swapaxes(out, 1, 2)


def fused_attention(q: Array, k: Array, v: Array, dtype: Dtype, implementation=None) -> Array:
    """`jax.nn.dot_product_attention` on `dtype` operands, output in q's dtype; layout as above.

    On GPU with bf16 operands, implementation="cudnn" is cuDNN's fused (flash) attention: the
    [N, N] logits never reach memory and the softmax is computed in float32 inside the kernel.
    """
    out = jax.nn.dot_product_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=implementation
    )
    return out.astype(q.dtype)


def attention(q: Array, k: Array, v: Array, dtype: Dtype) -> Array:
    """Softmax attention [B, N, heads, head_dim] -> same shape and dtype, operands in `dtype`.

    GPU with bf16 operands: cuDNN's fused attention where it supports the shapes (float32 softmax
    inside the kernel). Everywhere else, and as the fallback: `explicit_attention`, whose logits
    and softmax are float32 (XLA's own dot_product_attention would keep bf16 logits).
    """
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "gpu":
        try:
            return fused_attention(q, k, v, dtype, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # shapes cuDNN does not take
            pass
    return explicit_attention(q, k, v, dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a token axis: [B, N, D] -> [B, N, D].

    Attributes:
      num_heads: number of heads (D must be divisible by it).
      dtype: operand dtype of the matmuls.
      activation_dtype: dtype of q, k, v and the output (float32, or bfloat16 in a model that
        keeps bf16 activations).
      out_init: initialiser of the output projection (zeros in the U-Net's residual branch).
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32
    out_init: Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, N, D = x.shape
        if D % self.num_heads:
            raise ValueError(f"width {D} is not divisible by num_heads={self.num_heads}.")
        qkv = Dense(3 * D, dtype=self.dtype, out_dtype=self.activation_dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads), 3, axis=2)
        out = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.dtype).reshape(B, N, D)
        return Dense(
            D,
            dtype=self.dtype,
            out_dtype=self.activation_dtype,
            kernel_init=self.out_init,
            name="out",
        )(out)


# Rematerialisation (gradient checkpointing) of a backbone's blocks, by name. Every policy other
# than 'none' wraps each block (U-Net: ResBlock and AttentionBlock; DiT: DiTBlock) in
# `nn.remat` with a `jax.checkpoint_policies` policy saying which of the block's intermediate
# values the forward pass keeps for the backward pass; the rest is recomputed from the block's
# input during the backward pass. Values and gradients are those of 'none'.
REMAT_POLICIES = {
    # Plain autodiff: every residual the backward pass needs is kept.
    "none": None,
    # Keep the outputs of every matmul and convolution (attention's two products included);
    # recompute the element-wise work: normalisation, modulation, SiLU/GELU, softmax, casts.
    "dots": jax.checkpoint_policies.dots_saveable,
    # Keep only the outputs of the layers with weights (Dense and Conv, tagged `PROJECTION`);
    # also recompute attention's logits and softmax ([B, heads, N, N] arrays at high resolution).
    "projections": jax.checkpoint_policies.save_only_these_names(PROJECTION),
    # Keep only each block's inputs; the backward pass recomputes the whole block's forward pass
    # (about one extra forward pass per step, the least activation memory).
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_activation_dtype(dtype: Dtype) -> None:
    """Raises ValueError unless dtype is float32 or bfloat16 (the activation dtypes apd keeps)."""
    checks.check_choice("activation_dtype", jnp.dtype(dtype).name, ("float32", "bfloat16"))


def remat_block(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()):
    """The block's class under the named remat policy (`REMAT_POLICIES`); 'none' returns it as it
    is. static_argnums count `self` as 0 (e.g. a `train` flag). Callers name the blocks
    explicitly: `nn.remat` renames the class, and parameter paths must not depend on the policy.
    """
    checks.check_choice("remat policy", remat, REMAT_POLICIES)
    if remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)
