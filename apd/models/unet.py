"""ADM-style U-Net (Dhariwal & Nichol 2021) with a noise level per pixel (paper §3.1).

Every residual block modulates its normalised features with a per-location FiLM (scale, shift)
computed from the level map, average pooled to the block's resolution. The conditioning MLP runs
once on a table of levels (`conditioning.LevelTable`); each pixel interpolates an r-dim feature
from it, and each block projects that feature to its 2C FiLM parameters (`FiLM`). With
`cond_rank=0` each block instead projects the full E-dim embedding at every pixel: the classic
ADM conditioning, kept as the naive per-token baseline.

Layout: conv_in; per resolution level l (channels base * multipliers[l]) res_blocks[l] residual
blocks, each followed by self-attention where l is in attn_levels, then a stride-2 conv
downsample (not after the last level); the middle: ResBlock, then middle_blocks times
(attention, ResBlock); the decoder mirrors the encoder with res_blocks[l] + 1 blocks per level,
each taking one encoder activation as skip (concatenated, or with skip='add' added after a 1x1
projection where the widths differ), then nearest-neighbour x2 upsampling and a conv (computed
folded, `layers.upsample_conv`); out:
GroupNorm, SiLU (the features), conv to z's channels (zero initialised).

Each GroupNorm with what follows it (affine or FiLM, SiLU) is one fused `layers.GroupNorm` call
(`layers.norm_modulate`: float32 statistics and modulation, a hand-written backward pass). With
`activation_dtype=bfloat16` the feature maps between layers (convolution and attention outputs,
the residual stream, the skips) are bf16; statistics, FiLM parameters and the output stay
float32. `remat` names the rematerialisation policy of the ResBlocks and AttentionBlocks
(`layers.REMAT_POLICIES`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from apd import checks
from apd.models import conditioning, layers
from apd.models.layers import Conv, Dense, Dtype, GroupNorm, SelfAttention, zeros

Array = jax.Array

SKIPS = ("concat", "add")


class FiLM(nn.Module):
    """Per-location (scale, shift) from per-location conditioning features.

    [B, h, w, F] -> two [B, h, w, C]; a [B, 1, 1, F] (per-sample) input gives [B, 1, 1, C]. Two
    projections rather than one of width 2C split in two: the split's backward pass would pad
    and add two per-pixel [B, h, w, 2C] arrays in every block.
    """

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: Array) -> tuple[Array, Array]:
        scale = Dense(self.channels, dtype=self.dtype, name="scale")(cond)
        return scale, Dense(self.channels, dtype=self.dtype, name="shift")(cond)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm * (1 + scale) + shift -> SiLU -> dropout ->
    conv3x3 (zero init), plus a 1x1-projected skip where the width changes. The output (and the
    convolutions' outputs) in `activation_dtype`."""

    channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array, train: bool) -> Array:
        act = self.activation_dtype
        h = GroupNorm(self.norm_groups)(x, silu=True)
        h = Conv(self.channels, dtype=self.dtype, out_dtype=act)(h)
        scale, shift = FiLM(self.channels, dtype=self.dtype)(cond)
        h = GroupNorm(self.norm_groups, affine=False)(h, scale, shift, silu=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.channels, dtype=self.dtype, out_dtype=act, kernel_init=zeros)(h)
        if x.shape[-1] != self.channels:
            x = Dense(self.channels, dtype=self.dtype, out_dtype=act, name="skip_proj")(x)
        return (x + h).astype(act)


class AttentionBlock(nn.Module):
    """Residual self-attention over the pixels of a feature map (output projection zero init)."""

    head_dim: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        B, H, W, C = x.shape
        h = GroupNorm(self.norm_groups)(x).reshape(B, H * W, C)
        h = SelfAttention(
            max(C // self.head_dim, 1),
            dtype=self.dtype,
            activation_dtype=self.activation_dtype,
            out_init=zeros,
        )(h)
        return (x + h.reshape(B, H, W, C)).astype(self.activation_dtype)


class UNet(nn.Module):
    """The U-Net backbone.

    Attributes:
      base: channels of the first level.
      multipliers: channel multiplier per resolution level.
      res_blocks: residual blocks per level in the encoder (the decoder has one more).
      middle_blocks: (attention, ResBlock) pairs after the middle's first ResBlock.
      attn_levels: levels (0 = full resolution) with self-attention after each ResBlock.
      head_dim: channels per attention head.
      dropout: dropout rate inside residual blocks (active only with train=True).
      skip: 'concat' (ADM) or 'add' (about half the decoder cost on CPU).
      num_classes: classes for conditioning (0: unconditional); label num_classes is null.
      emb_dim: width of the level/class embedding MLP (default 4 * base).
      cond_rank: width r of the per-pixel conditioning features; 0 projects the full embedding
        in every block at every pixel (the naive baseline).
      level_nodes: nodes K of the level table.
      norm_groups: GroupNorm groups (gcd with the channel count).
      dtype: operand dtype of matmuls and convolutions (float32 or bfloat16); parameters,
        normalisation statistics, modulation and output are float32.
      activation_dtype: dtype of the feature maps between layers: float32 (default) or
        bfloat16 (halves the memory traffic of the element-wise work, for GPUs); normalisation
        statistics, FiLM parameters and the output stay float32 either way.
      remat: rematerialisation policy of the blocks, a name in `layers.REMAT_POLICIES`: 'none'
        (default), 'dots', 'projections' or 'full'.
    """

    base: int = 128
    multipliers: tuple[int, ...] = (1, 2, 3, 3)
    res_blocks: tuple[int, ...] = (1, 2, 2, 2)
    middle_blocks: int = 1
    attn_levels: tuple[int, ...] = (2, 3)
    head_dim: int = 64
    dropout: float = 0.0
    skip: str = "concat"
    num_classes: int = 0
    emb_dim: int | None = None
    cond_rank: int = 16
    level_nodes: int = 129
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    activation_dtype: Dtype = jnp.float32
    remat: str = "none"

    def setup(self) -> None:
        checks.check_choice("skip connection", self.skip, SKIPS)
        layers.check_activation_dtype(self.activation_dtype)
        checks.check_choice("remat policy", self.remat, layers.REMAT_POLICIES)
        if len(self.res_blocks) != len(self.multipliers):
            raise ValueError(
                f"res_blocks {self.res_blocks} needs one entry per multiplier {self.multipliers}."
            )
        self.level_table = conditioning.LevelTable(
            emb_dim=self.emb_dim or 4 * self.base,
            rank=self.cond_rank,
            num_classes=self.num_classes,
            num_nodes=self.level_nodes,
            dtype=self.dtype,
        )

    def conditioning(
        self, levels: Array, labels: Array | None, image_shape: tuple[int, int]
    ) -> list[Array]:
        """Per-location conditioning features at each resolution level.

        Args:
          levels: [B, H, W] or [B, 1, 1] float32 in [0, 1].
          labels: [B] int32 in [0, num_classes], or None (null label).
          image_shape: (H, W) of the data.
        Returns:
          One [B, H / 2^l, W / 2^l, r] (or [B, 1, 1, r]) float32 array per level l, each the
          interpolated table at the level map average pooled to that resolution.
        """
        table = self.level_table(
            conditioning.resolve_labels(labels, levels.shape[0], self.num_classes)
        )
        H, W = image_shape
        return [
            conditioning.interpolate(table, conditioning.pool_levels(levels, (H >> l, W >> l)))
            for l in range(len(self.multipliers))
        ]

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
          z: [B, H, W, C] float32 noisy data; H and W divisible by 2^(levels - 1).
          levels: [B, H, W] (per pixel) or [B, 1, 1] (per sample) float32 in [0, 1].
          labels: [B] int32 in [0, num_classes] (num_classes = null), or None (all null).
          train: enables dropout (needs a 'dropout' rng).
          return_features: also return the final features.
        Returns:
          prediction [B, H, W, C] float32; with return_features also features
          [B, H, W, base] float32 (the input of the output convolution).
        """
        conditioning.check_inputs(z, levels, labels, self.num_classes)
        _, H, W, C = z.shape
        factor = 2 ** (len(self.multipliers) - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"image size {(H, W)} must be divisible by {factor} for "
                f"{len(self.multipliers)} resolution levels."
            )
        conds = self.conditioning(jnp.asarray(levels, jnp.float32), labels, (H, W))
        widths = [self.base * m for m in self.multipliers]
        act = self.activation_dtype
        res_cls = layers.remat_block(ResBlock, self.remat, static_argnums=(3,))
        attn_cls = layers.remat_block(AttentionBlock, self.remat)
        count = {"res": 0, "attn": 0}  # explicit block names: see `layers.remat_block`

        def res_block(h: Array, level: int) -> Array:
            name = f"ResBlock_{count['res']}"
            count["res"] += 1
            block = res_cls(
                widths[level], self.dropout, self.norm_groups, self.dtype, act, name=name
            )
            return block(h, conds[level], train)

        def attend(h: Array) -> Array:
            name = f"AttentionBlock_{count['attn']}"
            count["attn"] += 1
            return attn_cls(self.head_dim, self.norm_groups, self.dtype, act, name=name)(h)

        h = Conv(self.base, dtype=self.dtype, out_dtype=act, name="conv_in")(z.astype(jnp.float32))
        skips = [h]
        for level, width in enumerate(widths):
            for _ in range(self.res_blocks[level]):
                h = res_block(h, level)
                if level in self.attn_levels:
                    h = attend(h)
                skips.append(h)
            if level < len(widths) - 1:
                h = Conv(width, strides=2, dtype=self.dtype, out_dtype=act)(h)
                skips.append(h)

        deepest = len(widths) - 1
        h = res_block(h, deepest)
        for _ in range(self.middle_blocks):
            h = res_block(attend(h), deepest)

        for level in reversed(range(len(widths))):
            for _ in range(self.res_blocks[level] + 1):
                skip = skips.pop()
                if self.skip == "concat":
                    h = jnp.concatenate([h, skip], axis=-1)
                elif skip.shape[-1] == h.shape[-1]:
                    h = h + skip
                else:
                    h = h + Dense(h.shape[-1], dtype=self.dtype, out_dtype=act)(skip)
                h = res_block(h, level)
                if level in self.attn_levels:
                    h = attend(h)
            if level:
                h = Conv(widths[level], upsample=True, dtype=self.dtype, out_dtype=act)(h)

        features = GroupNorm(self.norm_groups)(h, silu=True).astype(jnp.float32)
        out = Conv(C, dtype=self.dtype, kernel_init=zeros, name="conv_out")(features)
        return (out, features) if return_features else out
