"""A small head that predicts a frozen backbone's own per-pixel error (uncertainty guidance).

It reads the backbone's final features (`return_features=True`) and the level map and predicts
each pixel's log squared error, log ||prediction - target||^2 averaged over channels. The
features are behind a stop_gradient: only the head trains.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from apd.models import conditioning
from apd.models.layers import Conv, Dense, Dtype, GroupNorm

Array = jax.Array


class UncertaintyHead(nn.Module):
    """Features [B, h, w, F] and levels -> log squared error [B, h*patch, w*patch].

    Each feature cell is embedded together with its level's sinusoidal features, refined by
    `depth` residual 3x3-conv layers, and mapped to patch x patch pixel values; each pixel then
    adds a learned function of its own level (the levels inside a DiT patch differ).

    Attributes:
      hidden: width of the head.
      depth: residual conv layers.
      patch: pixels per feature cell along each axis (1 for the U-Net, p for a DiT).
      level_dim: width of the sinusoidal level features.
      norm_groups: GroupNorm groups.
      dtype: operand dtype of matmuls and convolutions.
    """

    hidden: int = 64
    depth: int = 2
    patch: int = 1
    level_dim: int = 32
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Array, levels: Array) -> Array:
        """Predicts per-pixel log squared errors.

        Args:
          features: [B, h, w, F] float32 backbone features.
          levels: [B, h*patch, w*patch] or [B, 1, 1] float32 in [0, 1].
        Returns:
          [B, h*patch, w*patch] float32 predicted log squared error.
        """
        B, h, w, _ = features.shape
        p = self.patch
        levels = jnp.asarray(levels, jnp.float32)
        cell_levels = conditioning.pool_levels(levels, (h, w))
        x = Dense(self.hidden, dtype=self.dtype, name="features_in")(
            jax.lax.stop_gradient(features)
        )
        x = x + Dense(self.hidden, dtype=self.dtype, name="levels_in")(
            conditioning.sinusoidal_embedding(cell_levels, self.level_dim)
        )
        for _ in range(self.depth):
            x = x + Conv(self.hidden, dtype=self.dtype)(GroupNorm(self.norm_groups)(x, silu=True))
        x = Dense(p * p, dtype=self.dtype, name="out")(GroupNorm(self.norm_groups)(x, silu=True))
        cells = x.reshape(B, h, w, p, p).transpose(0, 1, 3, 2, 4).reshape(B, h * p, w * p)
        pixel = Dense(1, dtype=self.dtype, name="pixel_level")(
            conditioning.sinusoidal_embedding(levels, self.level_dim)
        )
        return cells + pixel[..., 0]
