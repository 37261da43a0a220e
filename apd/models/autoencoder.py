"""The latent stage: a mask-aware VQ autoencoder, a PatchGAN discriminator and their losses.

`Autoencoder` has the shape of LDM's `vq-f4` first stage (the paper's Table 7): an encoder of
`len(multipliers)` resolution levels (`num_res_blocks` residual blocks each, a stride-2
convolution between levels), a middle (ResBlock, optional self-attention, ResBlock) and a 3x3
convolution to `latent_dim` channels, so an image [B, H, W, C] becomes latents [B, H/f, W/f, D]
with f = 2^(len(multipliers) - 1); a quantiser (`apd.models.quantizers`); and a mirrored decoder
(`num_res_blocks + 1` blocks per level, nearest x2 upsampling folded into a convolution).

Mask-awareness by feature modulation (method.md §6). `known` is the pixel mask [B, H, W]
(1 = known pixel, 0 = hole; None = every pixel known). The encoder reads the masked image (holes
set to 0), and every normalisation layer of encoder and decoder (RMSNorm per location over the
channels, or GroupNorm) is followed by a per-location FiLM, (1 + scale) * xhat + shift, whose
scale and shift are projected from a small embedding of the known fraction: the mask average
pooled to the layer's resolution (the fraction of known pixels under each feature location). The
embedding is the U-Net's level conditioning with the known fraction in place of the level
(`conditioning.LevelTable` on 129 nodes, interpolated per location, one `unet.FiLM` per
normalisation layer), and normalisation and modulation are one `layers.norm_modulate`. With
`mask_aware=False` the same network (the same parameters) ignores the mask: every layer is
modulated as for an all-known mask, a per-channel affine; only the zeroed holes reach it.

RMSNorm normalises each location by its own channels, so the statistics of a known token's
features do not depend on the hole; GroupNorm's statistics span the whole feature map, so any
hole changes every token's normalisation (`norm='group'` exists for comparison).

The training rule of a mask-aware autoencoder (`mask_aware_targets`). At inpainting time apd
encodes the masked image with its mask, keeps the known latent tokens (`latent_mask`: a token is
known only when every pixel it covers is known), lets the diffusion model generate the other
tokens (which look like latents of full images), decodes the result with the mask and composites
the known pixels. A training step reproduces that:

    z_full   = encode(x, all known)          z_masked = encode(x, known)       (one batched call)
    m        = latent_mask(known, f)                                           [B, h, w]
    z_mix    = m * z_masked + (1 - m) * z_full
    x_hat    = decode(quantize(z_mix), known)
    loss     = reconstruction_loss(x_hat, x)          (every pixel, against the full image)
             + consistency_weight * mean over known tokens of (z_masked - sg(z_full))^2
             + the quantiser's loss (commitment; codebook loss for a straight-through codebook)
             [+ an adversarial term from `PatchDiscriminator`, added by the trainer]

The consistency term pulls the known tokens' latents towards those of the full image, so the
tokens apd keeps at inpainting time look like the ones the diffusion model saw in training. On
the toy of tests/test_autoencoder.py this term is what lowers `leakage`; the modulation lowers
the reconstruction loss instead (the numbers are in that test's docstring). It is in the latents'
units: compare runs by `leakage` (normalised by the latents' spread), not by this term. (Divided
by a stop-gradient variance of z_full, the term let the latents' scale run away in a toy run,
their standard deviation from 0.5 to 1400 in 150 steps: the target comes from the same encoder
and no longer pulls back as it grows.) With known all ones the step is an ordinary autoencoder step
(z_mix = z_masked = z_full, the consistency term is 0).
Training masks: `sample_training_masks` (host-side numpy; the evaluation's mask families, each
row all known with probability `p_unmasked`).

Like LDM's vq-f4, a latent diffusion model can run on the pre-quantisation latents `encode`
returns (rescaled to unit variance by the data pipeline); `decode` reads quantised latents, so
generated latents go through `quantize` first.

Calls (flax linen, `variables` = {'params': ..., 'quantizer_stats': ...} for a VQ codebook):

    model = build_autoencoder('ae-f4-small')
    variables = model.init(key, x, known)
    z = model.apply(variables, x, known, method='encode')              # [B, h, w, D]
    q = model.apply(variables, z, method='quantize')                   # QuantizerOutput
    x_hat = model.apply(variables, q.quantized, known, method='decode')
    out = model.apply(variables, x, known)                             # AutoencoderOutput
    step, stats = mask_aware_targets(model, variables, x, known, rngs) # training (train=True)

Training (train=True) updates the VQ codebook statistics: pass mutable=[quantizers.STATS] and
rngs={quantizers.RNG: key} for dead-code restarts (`mask_aware_targets` does both).
"""

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.evaluation import masks as mask_families
from apd.models import conditioning, layers, quantizers
from apd.models.layers import Conv, Dense, Dtype, SelfAttention, zeros
from apd.models.quantizers import QuantizerOutput
from apd.models.unet import FiLM

Array = jax.Array

NORMS = ("rms", "group")
RECONSTRUCTION_KINDS = ("l1", "l2")
GAN_KINDS = ("hinge", "non_saturating")
DISCRIMINATOR_NORMS = ("none", "group")


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def latent_mask(known: Array, factor: int) -> Array:
    """Pixel mask -> latent-token mask: a token is known only when all the pixels it covers are
    known (a min-pool over factor x factor blocks).

    Args:
      known: [B, H, W] in {0, 1} (any numeric or bool dtype), 1 = known pixel; H and W
        divisible by factor.
      factor: the autoencoder's downsampling factor f >= 1.
    Returns:
      [B, H / f, W / f] float32 in {0, 1}, 1 = known token.
    """
    if not isinstance(factor, numbers.Integral) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"latent_mask factor must be an int >= 1; got {factor!r}.")
    if jnp.ndim(known) != 3:
        raise ValueError(f"latent_mask needs a pixel mask [B, H, W]; got {jnp.shape(known)}.")
    B, H, W = jnp.shape(known)
    if H % factor or W % factor:
        raise ValueError(
            f"latent_mask: the mask's size {(H, W)} must be divisible by the factor {factor}."
        )
    blocks = jnp.asarray(known, jnp.float32).reshape(B, H // factor, factor, W // factor, factor)
    return jnp.min(blocks, axis=(2, 4))


TRAINING_FAMILIES = mask_families.FAMILIES
"""The mask families `sample_training_masks` draws from by default: the evaluation protocol's."""

# Mixed into the seed so that training masks never repeat the evaluation's masks of one seed.
_TRAINING_SEED_TAG = 0x7A31


def sample_training_masks(
    seed,
    batch: int,
    grid: int | Sequence[int],
    *,
    families: Sequence[str] = TRAINING_FAMILIES,
    p_unmasked: float = 0.25,
) -> np.ndarray:
    """Training masks for the autoencoder: host-side numpy, deterministic given the seed.

    Each row is all known (no hole) with probability `p_unmasked`; otherwise it is a mask of a
    family drawn uniformly from `families` (`apd.evaluation.masks`: the evaluation's generators,
    at seeds drawn from `seed`, so a step's masks are not the evaluation's masks of that seed).
    The batch is a function of (seed, batch, grid, families, p_unmasked) only; a trainer draws
    one batch per step from a per-step seed (e.g. `fold_in(key, step)`), and in a multi-process
    run every process draws the global batch and keeps its rows. The 'perlin' family runs a
    jitted function on the default device; the others are numpy (thin strokes cost about
    10 ms per mask at any size).

    Args:
      seed: a non-negative int or a JAX PRNG key.
      batch: B >= 0.
      grid: the image size: n or (H, W), each >= 4.
      families: non-empty names from `apd.evaluation.masks.ALL_FAMILIES`.
      p_unmasked: probability in [0, 1] that a row has no hole.
    Returns:
      uint8 [B, H, W] in {0, 1}, 1 = known pixel.
    """
    families = tuple(families)
    if not families:
        raise ValueError("sample_training_masks needs at least one mask family.")
    for family in families:
        checks.check_choice("mask family", family, mask_families.ALL_FAMILIES)
    if not isinstance(p_unmasked, numbers.Real) or not 0.0 <= p_unmasked <= 1.0:
        raise ValueError(f"p_unmasked must be a probability in [0, 1]; got {p_unmasked!r}.")
    if not isinstance(batch, numbers.Integral) or isinstance(batch, bool) or batch < 0:
        raise ValueError(f"mask batch size must be an int >= 0; got {batch!r}.")
    dims = checks.as_grid(grid)
    if len(dims) != 2 or min(dims) < 4:
        raise ValueError(
            f"mask grid must be an int n >= 4 or a pair (H, W) of ints >= 4; got {grid!r}."
        )
    rng = np.random.default_rng([*mask_families.seed_words(seed), _TRAINING_SEED_TAG])
    unmasked = rng.random(batch) < p_unmasked
    choice = rng.integers(len(families), size=batch)
    family_seeds = rng.integers(0, 2**63 - 1, size=len(families))
    known = np.ones((batch, *dims), np.uint8)
    for j, family in enumerate(families):
        rows = np.flatnonzero(~unmasked & (choice == j))
        if rows.size:
            known[rows] = mask_families.make_masks(family, int(family_seeds[j]), rows.size, dims)
    return known


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class ModulatedNorm(nn.Module):
    """RMSNorm (per location, over the channels) or GroupNorm, then a per-location FiLM
    (1 + scale, shift) projected from conditioning features, then optionally SiLU: one
    `layers.norm_modulate`.

    Attributes:
      norm: 'rms' or 'group'.
      groups: GroupNorm groups (gcd with the channel count).
      dtype: operand dtype of the FiLM projections.
    """

    norm: str = "rms"
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array, silu: bool = False) -> Array:
        """x [B, h, w, C]; cond [B, h, w, r] or [B, 1, 1, r] float32. Returns x's shape and
        dtype."""
        scale, shift = FiLM(x.shape[-1], dtype=self.dtype)(cond)
        if self.norm == "rms":
            return layers.norm_modulate(x, 1.0 + scale, shift, eps=1e-6, silu=silu, center=False)
        return layers.norm_modulate(
            x,
            1.0 + scale,
            shift,
            groups=math.gcd(self.groups, x.shape[-1]),
            spatial_axes=(1, 2),
            eps=1e-6,
            silu=silu,
        )


class ResBlock(nn.Module):
    """norm + FiLM -> SiLU -> conv3x3 -> norm + FiLM -> SiLU -> conv3x3 (zero init), plus a
    1x1-projected skip where the width changes."""

    channels: int
    norm: str = "rms"
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        h = ModulatedNorm(self.norm, self.groups, self.dtype, name="norm1")(x, cond, silu=True)
        h = Conv(self.channels, dtype=self.dtype, name="conv1")(h)
        h = ModulatedNorm(self.norm, self.groups, self.dtype, name="norm2")(h, cond, silu=True)
        h = Conv(self.channels, dtype=self.dtype, kernel_init=zeros, name="conv2")(h)
        if x.shape[-1] != self.channels:
            x = Dense(self.channels, dtype=self.dtype, name="skip_proj")(x)
        return x + h


class AttentionBlock(nn.Module):
    """norm + FiLM -> self-attention over the locations (output projection zero init), residual."""

    head_dim: int = 64
    norm: str = "rms"
    groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cond: Array) -> Array:
        B, H, W, C = x.shape
        h = ModulatedNorm(self.norm, self.groups, self.dtype, name="norm")(x, cond)
        h = SelfAttention(max(C // self.head_dim, 1), dtype=self.dtype, out_init=zeros)(
            h.reshape(B, H * W, C)
        )
        return x + h.reshape(B, H, W, C)


class _Trunk(nn.Module):
    """What encoder and decoder share: block constructors with explicit names."""

    channels: int
    multipliers: tuple[int, ...]
    num_res_blocks: int
    norm: str
    groups: int
    attention: bool
    head_dim: int
    dtype: Dtype
    remat: str

    def _blocks(self):
        res_cls = layers.remat_block(ResBlock, self.remat)
        attn_cls = layers.remat_block(AttentionBlock, self.remat)
        count = {"res": 0}

        def res(h: Array, cond: Array, width: int) -> Array:
            name = f"ResBlock_{count['res']}"
            count["res"] += 1
            return res_cls(width, self.norm, self.groups, self.dtype, name=name)(h, cond)

        def middle(h: Array, cond: Array) -> Array:
            width = self.channels * self.multipliers[-1]
            h = res(h, cond, width)
            if self.attention:
                block = attn_cls(self.head_dim, self.norm, self.groups, self.dtype, name="attn")
                h = block(h, cond)
            return res(h, cond, width)

        return res, middle

    def _out(self, h: Array, cond: Array, features: int) -> Array:
        h = ModulatedNorm(self.norm, self.groups, self.dtype, name="norm_out")(h, cond, silu=True)
        return Conv(features, dtype=self.dtype, name="conv_out")(h)


class Encoder(_Trunk):
    """Masked image [B, H, W, C] and per-level conditioning -> latents [B, H/f, W/f, latent_dim]."""

    latent_dim: int = 3

    @nn.compact
    def __call__(self, x: Array, conds: Sequence[Array]) -> Array:
        res, middle = self._blocks()
        h = Conv(self.channels, dtype=self.dtype, name="conv_in")(x)
        last = len(self.multipliers) - 1
        for level, mult in enumerate(self.multipliers):
            for _ in range(self.num_res_blocks):
                h = res(h, conds[level], self.channels * mult)
            if level < last:
                h = Conv(h.shape[-1], strides=2, dtype=self.dtype, name=f"down_{level}")(h)
        h = middle(h, conds[last])
        return self._out(h, conds[last], self.latent_dim)


class Decoder(_Trunk):
    """Latents [B, h, w, D] and per-level conditioning -> image [B, h f, w f, image_channels]."""

    image_channels: int = 3

    @nn.compact
    def __call__(self, z: Array, conds: Sequence[Array]) -> Array:
        res, middle = self._blocks()
        last = len(self.multipliers) - 1
        h = Conv(self.channels * self.multipliers[-1], dtype=self.dtype, name="conv_in")(z)
        h = middle(h, conds[last])
        for level in reversed(range(len(self.multipliers))):
            for _ in range(self.num_res_blocks + 1):
                h = res(h, conds[level], self.channels * self.multipliers[level])
            if level:
                h = Conv(h.shape[-1], upsample=True, dtype=self.dtype, name=f"up_{level}")(h)
        return self._out(h, conds[0], self.image_channels)


@flax.struct.dataclass
class AutoencoderOutput:
    """What `Autoencoder.__call__` returns (a pytree).

    Attributes:
      x_hat: [B, H, W, C] float32, the decoded quantised latents.
      z: [B, h, w, D] float32, the pre-quantisation latents.
      quantized: the quantiser's output for z.
    """

    x_hat: Array
    z: Array
    quantized: QuantizerOutput


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Autoencoder(nn.Module):
    """The mask-aware VQ autoencoder (see the module docstring).

    Attributes:
      channels: width of the first level (128 in the paper).
      multipliers: channel multiplier per resolution level; f = 2^(len(multipliers) - 1).
      num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
      latent_dim: latent channels D.
      quantizer_config: the quantiser's config block for `quantizers.from_config`, e.g.
        {'kind': 'vq', 'num_codes': 8192} or {'kind': 'fsq', 'levels': (16, 16, 32)}.
      norm: 'rms' (RMSNorm per location, the paper's) or 'group' (GroupNorm).
      norm_groups: GroupNorm groups (gcd with the channel count).
      attention: self-attention in the middle of encoder and decoder (the lowest resolution).
      head_dim: channels per attention head.
      mask_aware: modulate every normalisation by the known fraction; False ignores the mask
        (the unaware baseline; same parameters).
      mask_emb_dim: width of the mask embedding MLP.
      mask_rank: width of the per-location mask features each FiLM projects.
      image_channels: channels C of the images.
      dtype: operand dtype of matmuls and convolutions (float32 or bfloat16); parameters,
        normalisation, modulation, latents and outputs are float32.
      remat: rematerialisation policy of the blocks (`layers.REMAT_POLICIES`).
    """

    channels: int = 128
    multipliers: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    latent_dim: int = 3
    quantizer_config: Mapping[str, Any] = flax.core.FrozenDict({"kind": "vq", "num_codes": 8192})
    norm: str = "rms"
    norm_groups: int = 32
    attention: bool = True
    head_dim: int = 64
    mask_aware: bool = True
    mask_emb_dim: int = 64
    mask_rank: int = 16
    image_channels: int = 3
    dtype: Dtype = jnp.float32
    remat: str = "none"

    def __post_init__(self):
        super().__post_init__()
        problems = []
        positive = ("channels", "num_res_blocks", "latent_dim", "norm_groups", "head_dim")
        for field in (*positive, "mask_emb_dim", "mask_rank", "image_channels"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                problems.append(f"{field} must be a positive int; got {value!r}")
        mults = self.multipliers
        valid = isinstance(mults, tuple | list) and len(mults) > 0
        if not valid or not all(_is_int(m) and m >= 1 for m in mults):
            problems.append(
                f"multipliers must be a non-empty tuple of positive ints; got {mults!r}"
            )
        if self.norm not in NORMS:
            problems.append(f"norm must be one of {list(NORMS)}; got {self.norm!r}")
        for field in ("attention", "mask_aware"):
            if not isinstance(getattr(self, field), bool):
                problems.append(f"{field} must be a bool; got {getattr(self, field)!r}")
        if not isinstance(self.quantizer_config, Mapping) and not hasattr(
            self.quantizer_config, "to_dict"
        ):
            problems.append(
                f"quantizer_config must be a mapping such as {{'kind': 'vq', 'num_codes': 8192}}; "
                f"got {self.quantizer_config!r}"
            )
        if self.remat not in layers.REMAT_POLICIES:
            problems.append(
                f"remat must be one of {sorted(layers.REMAT_POLICIES)}; got {self.remat!r}"
            )
        if jnp.dtype(self.dtype).name not in ("float32", "bfloat16"):
            problems.append(f"dtype must be float32 or bfloat16; got {self.dtype!r}")
        if problems:
            raise ValueError("Autoencoder: " + "; ".join(problems) + ".")

    @property
    def factor(self) -> int:
        """The spatial downsampling factor f = 2^(len(multipliers) - 1)."""
        return 2 ** (len(self.multipliers) - 1)

    def setup(self):
        trunk = {
            "channels": self.channels,
            "multipliers": tuple(self.multipliers),
            "num_res_blocks": self.num_res_blocks,
            "norm": self.norm,
            "groups": self.norm_groups,
            "attention": self.attention,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "remat": self.remat,
        }
        self.mask_embedding = conditioning.LevelTable(
            emb_dim=self.mask_emb_dim, rank=self.mask_rank, num_classes=0, dtype=self.dtype
        )
        self.encoder = Encoder(**trunk, latent_dim=self.latent_dim)
        self.decoder = Decoder(**trunk, image_channels=self.image_channels)
        self.quantizer = quantizers.from_config(self.quantizer_config, self.latent_dim)

    def mask_features(self, known: Array | None, batch: int, image_shape: tuple[int, int]):
        """Per-level conditioning features of the mask: one [B, H / 2^l, W / 2^l, mask_rank]
        float32 array per level l, the mask embedding at the known fraction under each location
        ([B, 1, 1, mask_rank] of an all-known mask when known is None or mask_aware is False)."""
        table = self.mask_embedding(jnp.zeros((batch,), jnp.int32))
        if known is None or not self.mask_aware:
            fraction = jnp.ones((batch, 1, 1), jnp.float32)
        else:
            fraction = jnp.asarray(known, jnp.float32)
        H, W = image_shape
        return [
            conditioning.interpolate(table, conditioning.pool_levels(fraction, (H >> l, W >> l)))
            for l in range(len(self.multipliers))
        ]

    def _check_image(self, x: Array, what: str) -> None:
        if jnp.ndim(x) != 4 or jnp.shape(x)[-1] != self.image_channels:
            raise ValueError(
                f"{what}: x must be images [B, H, W, {self.image_channels}]; got shape "
                f"{tuple(jnp.shape(x))}."
            )
        H, W = jnp.shape(x)[1:3]
        if H % self.factor or W % self.factor:
            raise ValueError(
                f"{what}: image size {(H, W)} must be divisible by the factor {self.factor} "
                f"({len(self.multipliers)} resolution levels)."
            )

    def encode(self, x: Array, known: Array | None = None) -> Array:
        """Images and their pixel mask -> pre-quantisation latents.

        Args:
          x: [B, H, W, image_channels] float32 in [-1, 1]; H, W divisible by `factor`.
          known: [B, H, W] in {0, 1} (1 = known pixel) or None (all known). Holes are set to 0
            before the encoder reads the image.
        Returns:
          z: [B, H / f, W / f, latent_dim] float32.
        """
        self._check_image(x, "encode")
        x = jnp.asarray(x, jnp.float32)
        checks.check_mask(known, jnp.shape(x)[:3], "encode: known", optional=True)
        if known is not None:
            x = x * jnp.asarray(known, jnp.float32)[..., None]
        B, H, W, _ = x.shape
        return self.encoder(x, self.mask_features(known, B, (H, W))).astype(jnp.float32)

    def quantize(self, z: Array, train: bool = False) -> QuantizerOutput:
        """Latents [B, h, w, latent_dim] -> the quantiser's output (`quantizers`). With
        train=True a VQ codebook updates its statistics (mutable=[quantizers.STATS], and an rng
        stream quantizers.RNG for dead-code restarts)."""
        return self.quantizer(z, train)

    def decode(self, z_q: Array, known: Array | None = None) -> Array:
        """Quantised latents and the pixel mask -> images.

        Args:
          z_q: [B, h, w, latent_dim] float32 (`quantize(z).quantized`, or a code's vectors).
          known: [B, h f, w f] in {0, 1} (the mask the latents were encoded with) or None.
        Returns:
          x_hat: [B, h f, w f, image_channels] float32.
        """
        if jnp.ndim(z_q) != 4 or jnp.shape(z_q)[-1] != self.latent_dim:
            raise ValueError(
                f"decode: latents must be [B, h, w, {self.latent_dim}]; got shape "
                f"{tuple(jnp.shape(z_q))}."
            )
        B, h, w, _ = jnp.shape(z_q)
        H, W = h * self.factor, w * self.factor
        checks.check_mask(known, (B, H, W), "decode: known", optional=True)
        conds = self.mask_features(known, B, (H, W))
        return self.decoder(jnp.asarray(z_q, jnp.float32), conds).astype(jnp.float32)

    def __call__(
        self, x: Array, known: Array | None = None, train: bool = False
    ) -> AutoencoderOutput:
        """encode -> quantize -> decode with the same mask (no z_mix: see `mask_aware_targets`
        for the training rule)."""
        z = self.encode(x, known)
        quantized = self.quantize(z, train)
        return AutoencoderOutput(self.decode(quantized.quantized, known), z, quantized)


# ---------------------------------------------------------------------------------------------
# Named sizes
# ---------------------------------------------------------------------------------------------

AUTOENCODER_SIZES: dict[str, Autoencoder] = {
    # The paper's (LDM vq-f4 shape): 256x256x3 -> 64x64x3, codebook 8192, RMSNorm.
    "ae-f4-paper": Autoencoder(
        channels=128,
        multipliers=(1, 2, 4),
        num_res_blocks=2,
        latent_dim=3,
        quantizer_config=flax.core.FrozenDict({"kind": "vq", "num_codes": 8192}),
        attention=True,
    ),
    # The 64x64 -> 16x16x3 demo on CPU. A smaller codebook: the lookup's distance matrix is
    # [B h w, num_codes].
    "ae-f4-small": Autoencoder(
        channels=32,
        multipliers=(1, 2, 4),
        num_res_blocks=2,
        latent_dim=3,
        quantizer_config=flax.core.FrozenDict({"kind": "vq", "num_codes": 1024}),
        attention=True,
        head_dim=64,
        mask_emb_dim=32,
    ),
    # Tests.
    "ae-f4-tiny": Autoencoder(
        channels=8,
        multipliers=(1, 2, 4),
        num_res_blocks=1,
        latent_dim=3,
        quantizer_config=flax.core.FrozenDict({"kind": "vq", "num_codes": 64}),
        norm_groups=4,
        attention=False,
        head_dim=16,
        mask_emb_dim=16,
        mask_rank=8,
    ),
}


def build_autoencoder(name: str, **overrides) -> Autoencoder:
    """The named autoencoder with some attributes overridden.

    `quantizer_config` overrides replace the size's block when they name a `kind`, otherwise they
    update its fields (e.g. quantizer_config={'num_codes': 4096}); a ConfigDict is accepted. The
    quantiser block is checked here (`quantizers.from_config`), so a bad block fails at build.
    """
    checks.check_choice("autoencoder size", name, AUTOENCODER_SIZES)
    model = AUTOENCODER_SIZES[name]
    allowed = sorted(f for f in model.__dataclass_fields__ if f not in ("parent", "name"))
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown attributes {unknown} for {name!r} (Autoencoder); expected some of {allowed}."
        )
    if "quantizer_config" in overrides:
        block = overrides["quantizer_config"]
        block = dict(block.to_dict() if hasattr(block, "to_dict") else block)
        if "kind" not in block:
            block = {**model.quantizer_config, **block}
        if isinstance(block.get("levels"), list):
            block["levels"] = tuple(block["levels"])
        overrides["quantizer_config"] = flax.core.FrozenDict(block)
    if isinstance(overrides.get("multipliers"), list):
        overrides["multipliers"] = tuple(overrides["multipliers"])
    model = model.clone(**overrides)
    quantizers.from_config(dict(model.quantizer_config), model.latent_dim)
    return model


# ---------------------------------------------------------------------------------------------
# The training rule
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MaskAwareOutput:
    """One application of the mask-aware training rule (`mask_aware_targets`).

    Attributes:
      x_hat: [B, H, W, C] float32, decode(quantize(z_mix), known); compare with the full image
        on every pixel (`reconstruction_loss`).
      z_masked: [B, h, w, D] float32, encode(x, known).
      z_full: [B, h, w, D] float32, encode(x, all known).
      z_mix: [B, h, w, D] float32, z_masked on the known tokens, z_full elsewhere.
      known_tokens: [B, h, w] float32 in {0, 1}, `latent_mask(known, f)`.
      quantized: the quantiser's output for z_mix.
      aux_loss: float32 scalar, consistency_weight * consistency + quantized.loss: add the
        (weighted) reconstruction loss and any adversarial term to get the autoencoder's loss.
      metrics: float32 scalars: 'consistency' (mean over known tokens and channels of
        (z_masked - z_full)^2; 0 without known tokens), 'quantizer_loss', 'leakage'
        (`leakage`), 'known_tokens' (the fraction of known tokens), and the quantiser's
        metrics prefixed 'quantizer/'.
    """

    x_hat: Array
    z_masked: Array
    z_full: Array
    z_mix: Array
    known_tokens: Array
    quantized: QuantizerOutput
    aux_loss: Array
    metrics: dict[str, Array]


def _mask_aware_rule(
    module: Autoencoder, x: Array, known: Array, train: bool, consistency_weight: float
) -> MaskAwareOutput:
    B = x.shape[0]
    all_known = jnp.ones_like(known)
    z = module.encode(jnp.concatenate([x, x]), jnp.concatenate([known, all_known]))
    z_masked, z_full = z[:B], z[B:]
    known_tokens = latent_mask(known, module.factor)
    keep = known_tokens[..., None]
    z_mix = keep * z_masked + (1.0 - keep) * z_full
    quantized = module.quantize(z_mix, train)
    x_hat = module.decode(quantized.quantized, known)

    count = jnp.sum(known_tokens)
    squared = jnp.square(z_masked - jax.lax.stop_gradient(z_full))
    consistency = jnp.sum(keep * squared) / (jnp.maximum(count, 1.0) * module.latent_dim)
    aux_loss = consistency_weight * consistency + quantized.loss
    metrics = {
        "consistency": consistency,
        "quantizer_loss": quantized.loss,
        "leakage": leakage(z_masked, z_full, known_tokens),
        "known_tokens": jnp.mean(known_tokens),
        **{f"quantizer/{k}": v for k, v in quantized.metrics.items()},
    }
    return MaskAwareOutput(
        x_hat, z_masked, z_full, z_mix, known_tokens, quantized, aux_loss, metrics
    )


def mask_aware_targets(
    model: Autoencoder,
    variables: Mapping[str, Any],
    x: Array,
    known: Array | None,
    rngs: Mapping[str, Array] | None = None,
    *,
    train: bool = True,
    consistency_weight: float = 1.0,
) -> tuple[MaskAwareOutput, dict[str, Any]]:
    """The mask-aware training rule (module docstring): encode the full and the masked image,
    mix the latents on the known tokens, decode the quantised mix with the mask.

    Pure and jit-able; differentiate the caller's loss with respect to variables['params'].

    Args:
      model: an `Autoencoder` (mask_aware True or False: the unaware baseline trains by the
        same rule).
      variables: {'params': ...} plus {quantizers.STATS: ...} for a VQ codebook.
      x: [B, H, W, C] float32 in [-1, 1], the full images.
      known: [B, H, W] in {0, 1} (1 = known pixel), or None (all known: an ordinary step).
      rngs: {quantizers.RNG: key} for dead-code restarts (train=True with restarts on).
      train: update the quantiser's statistics.
      consistency_weight: weight >= 0 of the consistency term in `aux_loss`.
    Returns:
      (MaskAwareOutput, updated collections): the second is {quantizers.STATS: ...} with the
      updated codebook statistics when train=True and the quantiser has any ({} otherwise);
      store it in the training state.
    """
    if not isinstance(consistency_weight, numbers.Real) or not consistency_weight >= 0:
        raise ValueError(
            f"consistency_weight must be a real number >= 0; got {consistency_weight!r}."
        )
    checks.check_mask(known, jnp.shape(x)[:3], "mask_aware_targets: known", optional=True)
    if known is None:
        known = jnp.ones(jnp.shape(x)[:3], jnp.float32)
    else:
        known = jnp.asarray(known, jnp.float32)
    kwargs = {"mutable": [quantizers.STATS]} if train else {}
    result = model.apply(
        variables,
        jnp.asarray(x, jnp.float32),
        known,
        train,
        consistency_weight,
        method=_mask_aware_rule,
        rngs=rngs,
        **kwargs,
    )
    if train:
        out, updated = result
        return out, dict(updated)
    return result, {}


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def reconstruction_loss(
    x_hat: Array, x: Array, kind: str = "l1", weight_map: Array | None = None
) -> Array:
    """Mean absolute ('l1') or squared ('l2') error over pixels and channels.

    Args:
      x_hat, x: [B, H, W, C] float32.
      kind: 'l1' or 'l2'.
      weight_map: optional [B, H, W] per-pixel weights, broadcast over channels; the loss is
        then mean(weight * error) (no renormalisation: all ones gives the unweighted loss).
    Returns:
      float32 scalar.
    """
    checks.check_choice("reconstruction loss", kind, RECONSTRUCTION_KINDS)
    if jnp.shape(x_hat) != jnp.shape(x) or jnp.ndim(x) != 4:
        raise ValueError(
            f"reconstruction_loss needs x_hat and x of one shape [B, H, W, C]; got "
            f"{tuple(jnp.shape(x_hat))} and {tuple(jnp.shape(x))}."
        )
    diff = jnp.asarray(x_hat, jnp.float32) - jnp.asarray(x, jnp.float32)
    error = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    if weight_map is not None:
        if jnp.shape(weight_map) != jnp.shape(x)[:3]:
            raise ValueError(
                f"weight_map must be [B, H, W] = {tuple(jnp.shape(x)[:3])}; got "
                f"{tuple(jnp.shape(weight_map))}."
            )
        error = error * jnp.asarray(weight_map, jnp.float32)[..., None]
    return jnp.mean(error)


def leakage(z_masked: Array, z_full: Array, known_tokens: Array) -> Array:
    """How much the hole moves the known tokens' latents, in units of the latents' spread:

        mean over fully known tokens and channels of |z_masked - z_full|  /  std(z_full)

    (std over every element of z_full). NaN when no token is known.

    Args:
      z_masked: [B, h, w, D], the latents of the masked image encoded with its mask.
      z_full: [B, h, w, D], the latents of the full image.
      known_tokens: [B, h, w] in {0, 1} (`latent_mask`).
    Returns:
      float32 scalar.
    """
    if jnp.shape(z_masked) != jnp.shape(z_full) or jnp.ndim(z_full) != 4:
        raise ValueError(
            f"leakage needs z_masked and z_full of one shape [B, h, w, D]; got "
            f"{tuple(jnp.shape(z_masked))} and {tuple(jnp.shape(z_full))}."
        )
    if jnp.shape(known_tokens) != jnp.shape(z_full)[:3]:
        raise ValueError(
            f"known_tokens must be [B, h, w] = {tuple(jnp.shape(z_full)[:3])}; got "
            f"{tuple(jnp.shape(known_tokens))}."
        )
    keep = jnp.asarray(known_tokens, jnp.float32)[..., None]
    z_full = jnp.asarray(z_full, jnp.float32)
    diff = jnp.abs(jnp.asarray(z_masked, jnp.float32) - z_full)
    mean_abs = jnp.sum(keep * diff) / (jnp.sum(keep) * z_full.shape[-1])
    return mean_abs / jnp.std(z_full)


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix / taming-transformers' NLayerDiscriminator): 4x4
    convolutions, stride 2 for the first `num_layers`, then two of stride 1, LeakyReLU(0.2);
    one logit per patch.

    Widths: channels, then channels * min(2^i, 8). With norm='group' every convolution but the
    first and the last is followed by an affine GroupNorm (taming's BatchNorm would tie the
    examples of a batch together); 'none' (default) has no normalisation.

    Attributes:
      channels: width of the first convolution.
      num_layers: stride-2 convolutions (3: 70x70 receptive field, 256 px -> 32x32 logits).
      norm: 'none' or 'group'.
      norm_groups: GroupNorm groups (gcd with the channel count).
      dtype: operand dtype of the convolutions.
    """

    channels: int = 64
    num_layers: int = 3
    norm: str = "none"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] float32 (H, W divisible by 2^num_layers) -> logits [B, H / 2^n,
        W / 2^n, 1] float32."""
        checks.check_choice("discriminator norm", self.norm, DISCRIMINATOR_NORMS)
        if jnp.ndim(x) != 4:
            raise ValueError(f"PatchDiscriminator needs images [B, H, W, C]; got {jnp.shape(x)}.")
        side = 2**self.num_layers
        if x.shape[1] % side or x.shape[2] % side:
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.num_layers}: image size "
                f"{x.shape[1:3]} must be divisible by {side}."
            )
        h = Conv(self.channels, kernel_size=4, strides=2, dtype=self.dtype)(x)
        h = nn.leaky_relu(h, 0.2)
        for i in range(1, self.num_layers + 1):
            width = self.channels * min(2**i, 8)
            stride = 2 if i < self.num_layers else 1
            h = Conv(width, kernel_size=4, strides=stride, dtype=self.dtype)(h)
            if self.norm == "group":
                h = layers.GroupNorm(self.norm_groups)(h)
            h = nn.leaky_relu(h, 0.2)
        return Conv(1, kernel_size=4, dtype=self.dtype, name="logits")(h)


def discriminator_loss(logits_real: Array, logits_fake: Array, kind: str = "hinge") -> Array:
    """The discriminator's loss on real and fake logits (any shapes; means over all elements).

    hinge:           (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2   (taming's)
    non_saturating:  mean(softplus(-real)) + mean(softplus(fake))
    """
    checks.check_choice("GAN loss", kind, GAN_KINDS)
    real = jnp.asarray(logits_real, jnp.float32)
    fake = jnp.asarray(logits_fake, jnp.float32)
    if kind == "hinge":
        return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
    return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def generator_loss(logits_fake: Array, kind: str = "hinge") -> Array:
    """The generator's (decoder's) adversarial loss on the fake logits: -mean(fake) (hinge) or
    mean(softplus(-fake)) (non_saturating)."""
    checks.check_choice("GAN loss", kind, GAN_KINDS)
    fake = jnp.asarray(logits_fake, jnp.float32)
    if kind == "hinge":
        return -jnp.mean(fake)
    return jnp.mean(jax.nn.softplus(-fake))


def r1_penalty(logits_fn: Callable[[Array], Array], x_real: Array) -> Array:
    """R1 gradient penalty on real images (Mescheder et al. 2018):

        mean over b of || d/dx_b sum(logits_fn(x)[b]) ||^2

    (each example's patch logits summed; the caller multiplies by gamma / 2). Differentiable
    with respect to the discriminator's parameters captured by logits_fn.

    Args:
      logits_fn: x [B, H, W, C] -> logits [B, ...] (e.g. a closure over
        PatchDiscriminator.apply and its params).
      x_real: [B, H, W, C] float32.
    Returns:
      float32 scalar.
    """
    x_real = jnp.asarray(x_real, jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(logits_fn(x).astype(jnp.float32)))(x_real)
    return jnp.sum(jnp.square(grad)) / x_real.shape[0]
