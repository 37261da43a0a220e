"""benchmarks/input_guidance.py: the one-step error of the guided prediction is exact algebra, and
its oracle scale w* tells a denoiser that under-uses its context from the Bayes-optimal one
(w* = 0) and from one that over-uses it, on a two-pixel Gaussian whose posterior means are known."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import input_guidance

from apd import corruption, schedules
from apd.sampling import ddim, guidance

RHO = 0.8  # the data's correlation between the known pixel a and the generated pixel b
SCHEDULE = schedules.get("rectified_flow")


def gaussian_denoiser(rho_model: float):
    """The posterior mean E[x | z] of x ~ N(0, [[1, r], [r, 1]]) over two pixels [B, 1, 2, 1]
    with r = rho_model: exact for r = RHO, a context under-user below it, an over-user above."""
    cov = jnp.asarray([[1.0, rho_model], [rho_model, 1.0]])

    def denoise(z, levels, labels):
        del labels
        alpha, sigma = SCHEDULE.alpha_sigma(levels.reshape(-1, 2))
        zz = z.reshape(-1, 2)
        cov_z = alpha[:, :, None] * cov[None] * alpha[:, None, :] + jax.vmap(jnp.diag)(sigma**2)
        mean = jnp.einsum(
            "ij,bj,bj->bi", cov, alpha, jnp.linalg.solve(cov_z, zz[..., None])[..., 0]
        )
        return mean.reshape(z.shape)

    return denoise


def draw(num: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(np.asarray([[1.0, RHO], [RHO, 1.0]]))
    x = (rng.standard_normal((num, 2)) @ chol.T).astype(np.float32).reshape(num, 1, 2, 1)
    known = np.tile(np.asarray([[1, 0]], np.uint8), (num, 1, 1))
    return jnp.asarray(x), jnp.asarray(known)


def w_star(rho_model: float, level: float, num: int = 40000) -> float:
    x, known = draw(num)
    terms = input_guidance.error_terms(
        gaussian_denoiser(rho_model),
        x,
        known,
        None,
        jnp.float32(level),
        jax.random.key(1),
        schedule=SCHEDULE,
        prediction="x",
        num_classes=0,
        context=None,
    )
    return input_guidance.summarise(np.asarray(terms).sum(0), [0.0])["w_star"]


@pytest.mark.parametrize("level", [0.3, 0.7])
def test_the_oracle_scale_is_zero_for_the_posterior_mean_and_signs_a_miscalibrated_context(level):
    exact = w_star(RHO, level)
    assert abs(exact) < 0.05, exact
    assert w_star(0.3, level) > 0.2  # context under-used: guidance towards it helps
    assert w_star(0.97, level) < -0.1  # context over-used: guidance makes it worse


def test_the_error_at_each_scale_is_that_of_the_sampler_s_guided_prediction():
    x, known = draw(64, seed=3)
    denoise = gaussian_denoiser(0.5)
    key, level = jax.random.key(2), jnp.float32(0.6)
    scales = [0.5, 1.5, 4.0]
    kwargs = dict(schedule=SCHEDULE, prediction="x", num_classes=0)
    terms = input_guidance.error_terms(denoise, x, known, None, level, key, context=0.9, **kwargs)
    summary = input_guidance.summarise(np.asarray(terms).sum(0), [0.0, *scales])

    # The same noise and noisier context as error_terms, guided at each scale directly.
    update = known == 0
    t = jnp.where(update, level, 0.0)
    key_noise, key_context = jax.random.split(key)
    z = ddim.noised(x, t, jax.random.normal(key_noise, x.shape, jnp.float32), SCHEDULE)
    mses = {}
    for w in [0.0, *scales]:
        pred = guidance.guided_prediction(
            denoise,
            z,
            t,
            update,
            None,
            key_context,
            branches=guidance.Branches(input=w != 0),
            num_classes=0,
            cfg_scale=0.0,
            input_scale=jnp.float32(w),
            level=jnp.float32(0.9),
            schedule=SCHEDULE,
        )
        x_hat = corruption.to_x_eps(pred, z, t, SCHEDULE, "x")[0]
        mses[w] = float(jnp.mean(jnp.square(x - x_hat)[:, :, 1]))
    np.testing.assert_allclose(summary["mse"], mses[0.0], rtol=1e-5)
    for w in scales:
        np.testing.assert_allclose(summary["mse_ratio"][f"{w:g}"], mses[w] / mses[0.0], rtol=1e-4)
