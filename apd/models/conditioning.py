"""Per-token conditioning on the noise level (and the class label), shared by the backbones.

A token's level t in [0, 1] is a scalar, so everything a network computes from (t, label) alone is
a 1-D curve per sample. apd evaluates the conditioning MLP once on a table of K equally spaced
levels (`LevelTable`, cost independent of the number of tokens) and gives every token the linear
interpolation between the two nodes around its level (`interpolate`: a gather and a lerp per
token). The table's width is a small rank r; each block maps the r-dim token features to its own
modulation with one [r, 2C] (U-Net FiLM) or, once per network, [r, 6D] (DiT adaLN-single) matmul,
so a per-token level map costs about what a per-sample level costs.

A per-sample level is the same computation on a [B, 1, 1] map: size-1 token axes flow through
pooling, interpolation and modulation and broadcast against the features.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.models.layers import Dense, Dtype

Array = jax.Array


def check_inputs(z: Array, levels: Array, labels: Array | None, num_classes: int) -> None:
    """Raises ValueError for a level map or labels that do not fit z [B, H, W, C].

    levels must be [B, H, W] or [B, 1, 1] (size-1 axes broadcast) in [0, 1]; labels None or [B]
    integers in [0, num_classes], where num_classes is the null label (classifier-free guidance).
    Values are checked only when concrete.
    """
    if jnp.ndim(z) != 4:
        raise ValueError(f"z must be [B, H, W, C]; got shape {jnp.shape(z)}.")
    checks.check_level_shape(jnp.shape(levels), jnp.shape(z))
    if jnp.shape(levels)[0] != jnp.shape(z)[0]:
        raise ValueError(
            f"levels of shape {jnp.shape(levels)} need the batch size of z {jnp.shape(z)}."
        )
    checks.check_levels(levels)
    if labels is None:
        return
    if jnp.shape(labels) != jnp.shape(z)[:1] or not jnp.issubdtype(
        jnp.result_type(labels), jnp.integer
    ):
        raise ValueError(
            f"labels must be None or an integer array of shape [B] = {jnp.shape(z)[:1]}; got "
            f"shape {jnp.shape(labels)} and dtype {jnp.result_type(labels)}."
        )
    if checks.is_concrete(labels):
        arr = np.asarray(labels)
        bad = arr[(arr < 0) | (arr > num_classes)]
        if bad.size:
            raise ValueError(
                f"labels must lie in [0, {num_classes}] ({num_classes} is the null label of "
                f"classifier-free guidance; num_classes={num_classes}); got {int(bad[0])}."
            )


def resolve_labels(labels: Array | None, batch: int, num_classes: int) -> Array:
    """labels [B] int32, with None meaning the null label `num_classes` for every sample."""
    if labels is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    return jnp.asarray(labels, jnp.int32)


def pool_levels(levels: Array, shape: tuple[int, int]) -> Array:
    """Average pools a level map onto a coarser token grid.

    Args:
      levels: [B, H, W] float32; an axis of size 1 (a per-sample level) stays size 1.
      shape: the target grid (h, w); H and W must be multiples of h and w.
    Returns:
      [B, h or 1, w or 1] float32: each cell the mean level of the pixels it covers.
    """
    B, H, W = levels.shape
    h, w = shape
    if (H != 1 and H % h) or (W != 1 and W % w):
        raise ValueError(f"a level map of size {(H, W)} cannot be average pooled to {shape}.")
    fh, fw = max(H // h, 1), max(W // w, 1)
    return levels.reshape(B, H // fh, fh, W // fw, fw).mean(axis=(2, 4))


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """[..., dim] sin/cos features of 1000 t (the DDPM/DiT timestep embedding of t in [0, 1])."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[..., None] * freqs.reshape((1,) * t.ndim + (half,))
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def interpolate(table: Array, levels: Array) -> Array:
    """Per-token features by linear interpolation in a table over equally spaced levels.

    Args:
      table: [B, K, F] float32, row k the features at level k / (K - 1).
      levels: [B, h, w] float32 in [0, 1] (size-1 axes allowed).
    Returns:
      [B, h, w, F] float32, exact at the nodes and piecewise linear between them.
    """
    B, K, F = table.shape
    pos = jnp.clip(levels, 0.0, 1.0).reshape(B, -1, 1) * (K - 1)
    lo = jnp.clip(jnp.floor(pos), 0, K - 2)
    frac = pos - lo
    index = lo.astype(jnp.int32)
    below = jnp.take_along_axis(table, index, axis=1, mode="clip")
    above = jnp.take_along_axis(table, index + 1, axis=1, mode="clip")
    return (below + frac * (above - below)).reshape(*levels.shape, F)


class LevelTable(nn.Module):
    """The (level, label) conditioning evaluated at K equally spaced levels.

        table[b, k] = Dense_rank(SiLU(MLP(sinusoid(k / (K - 1))) + class_embedding(label_b)))

    With rank = 0 the table holds the full-width SiLU(embedding) instead (the classic ADM / DiT
    conditioning vector, for models that project it per block).

    Attributes:
      emb_dim: width E of the embedding MLP.
      rank: width of the table (0: E, no projection).
      num_classes: number of classes; 0 means unconditional (no class embedding). Label
        `num_classes` is the learned null label.
      num_nodes: K, the number of table nodes (spacing 1 / (K - 1)).
      freq_dim: width of the sinusoidal features.
      dtype: operand dtype of the matmuls.
    """

    emb_dim: int
    rank: int
    num_classes: int
    num_nodes: int = 129
    freq_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        """labels: [B] int32 in [0, num_classes]. Returns [B, K, rank or emb_dim] float32."""
        nodes = jnp.linspace(0.0, 1.0, self.num_nodes, dtype=jnp.float32)
        emb = Dense(self.emb_dim, dtype=self.dtype, name="mlp_in")(
            sinusoidal_embedding(nodes, self.freq_dim)
        )
        emb = Dense(self.emb_dim, dtype=self.dtype, name="mlp_out")(nn.silu(emb))[None]
        if self.num_classes:
            classes = nn.Embed(self.num_classes + 1, self.emb_dim, name="class_embedding")
            emb = emb + classes(labels)[:, None, :]
        emb = jnp.broadcast_to(nn.silu(emb), (labels.shape[0], *emb.shape[1:]))
        if self.rank:
            emb = Dense(self.rank, dtype=self.dtype, name="rank_proj")(emb)
        return emb
