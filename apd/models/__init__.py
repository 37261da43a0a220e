"""Backbones with a noise level per token: an ADM-style U-Net and a DiT, plus an uncertainty head.

Every backbone is called as

    model.apply({'params': params}, z, levels, labels, train=False, rngs=...)

with z [B, H, W, C] float32, levels [B, H, W] or [B, 1, 1] float32 in [0, 1] and labels [B]
int32 in [0, num_classes] (num_classes = the null label) or None, and returns a prediction shaped
like z (float32); `return_features=True` also returns the final features for `UncertaintyHead`.
"""

from apd.models.dit import DiT
from apd.models.partitioning import SHARDING_RULES, param_shardings, param_specs
from apd.models.sizes import SIZES, abstract_params, build, param_count
from apd.models.uncertainty import UncertaintyHead
from apd.models.unet import UNet

__all__ = [
    "SHARDING_RULES",
    "SIZES",
    "DiT",
    "UNet",
    "UncertaintyHead",
    "abstract_params",
    "build",
    "param_count",
    "param_shardings",
    "param_specs",
]
