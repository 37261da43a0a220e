"""Named model sizes and constructors.

`SIZES` maps a name to an unbound module whose attributes are that size's configuration;
`build(name, **overrides)` returns a copy with some attributes changed (e.g. num_classes, dtype,
dropout). Attention levels and head sizes, which the paper leaves open, are chosen so that the
U-Nets match its parameter counts at 64x64x3 (unconditional; 1000 classes add 0.5M / 1M):

  unet-60m   62.4M  attention at 16x16 and 8x8 (levels 2, 3), 64-dim heads
  unet-620m  605.1M attention at 32x32, 16x16 and 8x8 (levels 1-3), 64-dim heads

The DiTs use adaLN-single, so they are smaller than the original DiTs of the same width and
depth (DiT-S/2 21.8M, B 86.3M, L 304.3M, XL 448.7M instead of 33M, 130M, 458M, 675M).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from apd import checks
from apd.models.dit import DiT
from apd.models.unet import UNet


def _dit(width: int, depth: int, heads: int, patch: int) -> DiT:
    return DiT(width=width, depth=depth, num_heads=heads, patch=patch)


_DIT_SHAPES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}

SIZES: dict[str, nn.Module] = {
    # Tests: 0.1M parameters, 2 levels (sides divisible by 2; 28x28 works).
    "unet-tiny": UNet(
        base=12,
        multipliers=(1, 2),
        res_blocks=(1, 1),
        attn_levels=(1,),
        head_dim=16,
        skip="add",
        emb_dim=64,
        cond_rank=8,
        norm_groups=4,
    ),
    # Fashion-MNIST on CPU (0.9M): 28 -> 14 -> 7, adding skips.
    "unet-small": UNet(
        base=32,
        multipliers=(1, 2, 2),
        res_blocks=(1, 1, 1),
        attn_levels=(2,),
        head_dim=32,
        skip="add",
    ),
    # The paper's ablation model (~60M at 64x64x3).
    "unet-60m": UNet(
        base=128,
        multipliers=(1, 2, 3, 3),
        res_blocks=(1, 2, 2, 2),
        middle_blocks=1,
        attn_levels=(2, 3),
        head_dim=64,
    ),
    # The paper's main model (~620M at 64x64x3).
    "unet-620m": UNet(
        base=256,
        multipliers=(1, 2, 3, 4),
        res_blocks=(4, 4, 4, 4),
        middle_blocks=3,
        attn_levels=(1, 2, 3),
        head_dim=64,
    ),
    "dit-tiny": DiT(width=64, depth=2, num_heads=4, patch=2, cond_rank=16),
    **{
        f"dit-{size}/{patch}": _dit(*shape, patch)
        for size, shape in _DIT_SHAPES.items()
        for patch in (2, 4)
    },
}


def build(name: str, **overrides) -> nn.Module:
    """The named model, with some attributes overridden (e.g. num_classes=1000, dtype=bf16)."""
    checks.check_choice("model size", name, SIZES)
    model = SIZES[name]
    unknown = sorted(set(overrides) - set(model.__dataclass_fields__) - {"parent", "name"})
    if unknown:
        raise ValueError(
            f"unknown attributes {unknown} for {name!r} ({type(model).__name__}); expected some "
            f"of {sorted(f for f in model.__dataclass_fields__ if f not in ('parent', 'name'))}."
        )
    return model.clone(**overrides)


def abstract_params(model: nn.Module, image_shape: tuple[int, int, int], batch: int = 1):
    """The params pytree of `model` for data [batch, *image_shape] as jax.ShapeDtypeStruct leaves
    (jax.eval_shape: nothing is allocated)."""
    H, W, C = image_shape

    def init():
        return model.init(
            jax.random.key(0),
            jnp.zeros((batch, H, W, C), jnp.float32),
            jnp.zeros((batch, H, W), jnp.float32),
            None,
        )["params"]

    return jax.eval_shape(init)


def param_count(name: str, image_shape: tuple[int, int, int], **overrides) -> int:
    """Number of parameters of the named model for data of shape (H, W, C), via eval_shape."""
    params = abstract_params(build(name, **overrides), image_shape)
    return sum(leaf.size for leaf in jax.tree.leaves(params))
