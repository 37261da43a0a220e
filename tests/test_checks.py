"""The eager input checks shared by the public API (apd.checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apd import checks


def test_check_mask_shapes_values_and_none():
    """One check serves the pixel masks of the autoencoder and codec (exact shape, optional) and
    the token masks of plans (a minimum rank): bool and 0/1 values of any dtype pass, any other
    value is named, None passes only where the mask is optional."""
    for mask in (np.ones((2, 4, 4), bool), np.zeros((2, 4, 4), np.uint8), jnp.ones((2, 4, 4))):
        checks.check_mask(mask, (2, 4, 4), "encode: known")
        checks.check_mask(mask, 2, "inpaint mask")
    checks.check_mask(None, (2, 4, 4), "encode: known", optional=True)

    with pytest.raises(
        ValueError,
        match=r"^encode: known must be a pixel mask \[B, H, W\] = \(2, 4, 4\) \(1 = known "
        r"pixel, 0 = hole\) or None; got shape \(2, 4, 3\)\.$",
    ):
        checks.check_mask(np.ones((2, 4, 3)), (2, 4, 4), "encode: known", optional=True)
    with pytest.raises(ValueError, match=r"got shape \(\)\.$"):
        checks.check_mask(None, (2, 4, 4), "encode: known")
    with pytest.raises(
        ValueError,
        match=r"^inpaint mask must be \[B, \*tokens\] of at least 2 axes \(1 = known, "
        r"0 = generate\); got shape \(4,\)\.$",
    ):
        checks.check_mask(
            np.ones(4), 2, "inpaint mask", form="[B, *tokens]", zero="generate", one="known"
        )
    mask = np.ones((2, 4, 4), np.float32)
    mask[1, 2, 3] = 0.5
    with pytest.raises(
        ValueError,
        match=r"^decode: known must hold only 0 \(hole\) and 1 \(known pixel\); got a value "
        r"0\.5\.$",
    ):
        checks.check_mask(mask, (2, 4, 4), "decode: known")


def test_check_mask_under_jit_checks_only_the_shape():
    """Under jit the values are tracers: the shape is still checked, the values are not."""

    def checked(mask):
        checks.check_mask(mask, (2, 4, 4), "known")
        return mask

    np.testing.assert_array_equal(jax.jit(checked)(jnp.full((2, 4, 4), 0.5)), 0.5)
    with pytest.raises(ValueError, match=r"= \(2, 4, 4\) .*got shape \(2, 4\)"):
        jax.jit(checked)(jnp.ones((2, 4)))
