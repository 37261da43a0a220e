"""DiT (Peebles & Xie 2023) with a noise level per token and adaLN-single modulation.

Tokens are p x p patches; a patch's level is the mean of its pixels' levels (average pooling of
the level map). Modulation follows PixArt-alpha's "adaLN-single" (as in Wan 2.2): the
(level, label) conditioning is tabulated (`conditioning.LevelTable`), interpolated per token to an
r-dim feature, and projected ONCE per token to 6D modulation parameters; block b adds its own
learned [6, D] table (shift, scale, gate for attention and MLP). The shared projection and the
gate rows of every table start at zero, so every block starts as the identity (adaLN-Zero's
gates). The final layer has its own (shift, scale) projection of the token features and its own
table, and a zero-initialised output projection; tokens are unpatchified to z's shape.

With modulation='per_block' each block instead projects the full-width conditioning vector of
every token to its 6D parameters (DiT's adaLN-Zero on per-token levels: the naive baseline).

The shared modulation is split once into six [B, N, D] arrays that every block reads (slicing a
[B, N, 6, D] tensor in every block made the backward pass sum twelve padded copies of it); a
per-sample level gives [B, 1, D] arrays, broadcast over tokens by the same code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.models import conditioning, layers
from apd.models.layers import Dense, Dtype, SelfAttention, to_rank, zeros

Array = jax.Array

MODULATIONS = ("single", "per_block")


def patchify(x: Array, patch: int) -> Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches in row-major order."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // patch, patch, W // patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(x: Array, patch: int, grid: tuple[int, int]) -> Array:
    """[B, h*w, p*p*C] -> [B, h*p, w*p, C], the inverse of `patchify`."""
    B, _, F = x.shape
    h, w = grid
    C = F // (patch * patch)
    x = x.reshape(B, h, w, patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, h * patch, w * patch, C)


def sincos_position_embedding(grid: tuple[int, int], dim: int) -> np.ndarray:
    """[h*w, dim] float32 fixed 2-D sin/cos position embedding (MAE / DiT), half per axis."""
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64))
    parts = []
    for coord in (ys.T.reshape(-1), xs.T.reshape(-1)):
        args = coord[:, None] * omega[None, :]
        parts += [np.sin(args), np.cos(args)]
    emb = np.concatenate(parts, axis=1)
    return np.pad(emb, ((0, 0), (0, dim - emb.shape[1]))).astype(np.float32)


def _gate_zero_table_init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    """[6, D] table: shift and scale rows N(0, 1/D), gate rows (2 and 5) zero."""
    table = jax.random.normal(key, shape, dtype) * shape[-1] ** -0.5
    return table.at[jnp.array([2, 5])].set(0.0)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """LayerNorm (no affine, float32 statistics, eps 1e-6) of x [B, N, D], then
    * (1 + scale) + shift ([B, N|1, D], float32); the result in x's dtype.

    One `layers.norm_modulate`: its hand-written backward divides by the standard deviation once
    per element, which keeps XLA from re-fusing the residual stream's gradient of every later
    block into each consumer, and saves x rather than xhat.
    """
    return layers.norm_modulate(x, 1.0 + scale, shift, eps=1e-6)


class DiTBlock(nn.Module):
    """Pre-norm transformer block, modulated per token by (shift, scale, gate) x 2.

    mod: with modulation='single', the six shared per-token modulation arrays (shift1, scale1,
    gate1, shift2, scale2, gate2), each [B, N or 1, D] float32, to which the block adds its own
    [6, D] table; with 'per_block', a 1-tuple holding the conditioning vector [B, N or 1, D]
    (after its SiLU), which the block projects to its six arrays itself.
    """

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    modulation: str = "single"
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mod: tuple[Array, ...], train: bool) -> Array:
        D = self.width
        if self.modulation == "single":
            table = self.param("table", _gate_zero_table_init, (6, D))
            mod = tuple(m + to_rank(table[i], m.ndim) for i, m in enumerate(mod))
        else:
            ada = Dense(6 * D, dtype=self.dtype, kernel_init=zeros, name="ada_ln")(mod[0])
            mod = tuple(jnp.split(ada, 6, axis=-1))
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        act = self.activation_dtype
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = SelfAttention(self.num_heads, dtype=self.dtype, activation_dtype=act)(
            modulate(x, shift1, scale1)
        )
        x = (x + gate1 * drop(h)).astype(act)
        h = Dense(int(self.mlp_ratio * D), dtype=self.dtype, out_dtype=act, name="mlp_in")(
            modulate(x, shift2, scale2)
        )
        h = Dense(D, dtype=self.dtype, out_dtype=act, name="mlp_out")(nn.gelu(h, approximate=True))
        return (x + gate2 * drop(h)).astype(act)


class DiT(nn.Module):
    """The DiT backbone.

    Attributes:
      width: token width D.
      depth: number of blocks.
      num_heads: attention heads.
      patch: patch side p (H and W must be divisible by it).
      mlp_ratio: MLP hidden width / D.
      dropout: dropout rate on the attention and MLP outputs (train=True only).
      num_classes: classes for conditioning (0: unconditional); label num_classes is null.
      cond_rank: width r of the per-token conditioning features (modulation='single').
      modulation: 'single' (shared projection + per-block table) or 'per_block' (naive).
      level_nodes: nodes K of the level table.
      dtype: operand dtype of matmuls (float32 or bfloat16); parameters, normalisation,
        modulation and outputs are float32.
      activation_dtype: dtype of the token activations between the blocks' matmuls (the
        residual stream, q/k/v, the MLP hidden): float32 (default), or bfloat16 to halve the
        memory traffic of the element-wise work where it is memory-bound (GPUs).
        Normalisation statistics and modulation are computed in float32 either way.
      remat: rematerialisation policy of the blocks, a name in `layers.REMAT_POLICIES`: 'none'
        (default), 'dots', 'projections' or 'full'.
    """

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    patch: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: int = 0
    cond_rank: int = 64
    modulation: str = "single"
    level_nodes: int = 129
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32
    remat: str = "none"

    def setup(self) -> None:
        checks.check_choice("modulation", self.modulation, MODULATIONS)
        layers.check_activation_dtype(self.activation_dtype)
        checks.check_choice("remat policy", self.remat, layers.REMAT_POLICIES)
        single = self.modulation == "single"
        self.level_table = conditioning.LevelTable(
            emb_dim=self.width,
            rank=self.cond_rank if single else 0,
            num_classes=self.num_classes,
            num_nodes=self.level_nodes,
            dtype=self.dtype,
        )
        self.shared_modulation = (
            Dense(6 * self.width, dtype=self.dtype, kernel_init=zeros) if single else None
        )
        self.final_modulation = Dense(2 * self.width, dtype=self.dtype, kernel_init=zeros)

    def modulation_features(
        self, levels: Array, labels: Array | None, image_shape: tuple[int, int]
    ) -> tuple[tuple[Array, ...], tuple[Array, Array]]:
        """Per-token modulation inputs for the blocks and for the final layer.

        Args:
          levels: [B, H, W] or [B, 1, 1] float32 in [0, 1].
          labels: [B] int32 in [0, num_classes], or None (null label).
          image_shape: (H, W) of the data.
        Returns:
          (blocks, final), arrays [B, n, D] float32 with n the number of patches, or 1 for a
          per-sample level: blocks are the six shared modulation arrays (shift, scale, gate for
          attention, then for the MLP) before each block adds its table (modulation='single'),
          or a 1-tuple with the conditioning vector (per_block); final is the final layer's
          (shift, scale) before its table.
        """
        H, W = image_shape
        token_levels = conditioning.pool_levels(levels, (H // self.patch, W // self.patch))
        table = self.level_table(
            conditioning.resolve_labels(labels, levels.shape[0], self.num_classes)
        )
        features = conditioning.interpolate(table, token_levels)
        features = features.reshape(levels.shape[0], -1, features.shape[-1])
        final = tuple(jnp.split(self.final_modulation(features), 2, axis=-1))
        if self.shared_modulation is None:
            return (features,), final
        return tuple(jnp.split(self.shared_modulation(features), 6, axis=-1)), final

    @nn.compact
    def __call__(
        self,
        z: Array,
        levels: Array,
        labels: Array | None = None,
        train: bool = False,
        return_features: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Predicts from noisy data and its level map.

        Args:
          z: [B, H, W, C] float32 noisy data; H and W divisible by the patch size.
          levels: [B, H, W] (per pixel) or [B, 1, 1] (per sample) float32 in [0, 1].
          labels: [B] int32 in [0, num_classes] (num_classes = null), or None (all null).
          train: enables dropout (needs a 'dropout' rng).
          return_features: also return the final features.
        Returns:
          prediction [B, H, W, C] float32; with return_features also features
          [B, H/p, W/p, D] float32 (the final layer's modulated tokens).
        """
        conditioning.check_inputs(z, levels, labels, self.num_classes)
        B, H, W, C = z.shape
        p = self.patch
        if H % p or W % p:
            raise ValueError(f"image size {(H, W)} must be divisible by the patch size {p}.")
        grid = (H // p, W // p)
        block_mod, final_mod = self.modulation_features(
            jnp.asarray(levels, jnp.float32), labels, (H, W)
        )
        x = Dense(self.width, dtype=self.dtype, name="patch_embed")(
            patchify(z.astype(jnp.float32), p)
        )
        x = x + jnp.asarray(sincos_position_embedding(grid, self.width))[None]
        x = x.astype(self.activation_dtype)
        block = layers.remat_block(DiTBlock, self.remat, static_argnums=(3,))
        for i in range(self.depth):
            x = block(
                self.width,
                self.num_heads,
                self.mlp_ratio,
                self.dropout,
                self.modulation,
                self.dtype,
                self.activation_dtype,
                name=f"DiTBlock_{i}",
            )(x, block_mod, train)
        final_table = self.param("final_table", nn.initializers.zeros, (2, self.width))
        shift, scale = (m + to_rank(final_table[i], m.ndim) for i, m in enumerate(final_mod))
        features = modulate(x, shift, scale).astype(jnp.float32)
        out = Dense(p * p * C, dtype=self.dtype, kernel_init=zeros, name="out")(features)
        out = unpatchify(out, p, grid)
        return (out, features.reshape(B, *grid, self.width)) if return_features else out
