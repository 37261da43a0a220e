"""Sampler tests against closed forms: Gaussian data x ~ N(mu, S) on a 4 x 4 x 1 token grid.

For Gaussian data the exact denoiser is E[x | z] = mu + S A (A S A + D)^-1 (z - A mu) (A, D the
per-token alpha and sigma^2), so every DDIM step is affine in z plus Gaussian noise. `reference`
propagates the mean and covariance through the same discretised sampler in float64 NumPy (an
independent implementation); the targets are N(mu, S) for generation, editing and autoregressive
plans, and the exact conditional for inpainting. The gap between the reference and the target is
the finite-step shrink of the variance, measured here and required to be small.
"""

import importlib
import itertools
import pkgutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apd import plans, sampling
from apd.sampling import guidance
from apd.schedules import CosineVP, RectifiedFlow

GRID = (4, 4)
D = 16


def gaussian(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A correlated Gaussian on the 4 x 4 grid (squared-exponential kernel, uneven scales)."""
    rng = np.random.default_rng(seed)
    ij = np.stack(np.meshgrid(*map(np.arange, GRID), indexing="ij"), -1).reshape(D, 2)
    d2 = np.sum(np.square(ij[:, None] - ij[None]), -1)
    scale = rng.uniform(0.5, 1.5, D)
    cov = scale[:, None] * scale[None] * np.exp(-d2 / (2 * 1.5**2)) + 0.05 * np.eye(D)
    return rng.normal(size=D), cov


MU, COV = gaussian()


def denoiser(schedule, prediction="x", *, shared=False, class_offsets=None):
    """The exact posterior-mean denoiser of N(MU, COV), returning the given prediction type.

    shared=True solves one system per call from levels[0]: only for plans whose levels are the
    same for every sample. class_offsets [K, D]: label y shifts the mean by class_offsets[y]; the
    null label K gets the offset 0.
    """
    mu, cov = jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32)

    def denoise(z, levels, labels):
        b = z.shape[0]
        zf = z.reshape(b, D)
        alpha, sigma = schedule.alpha_sigma(jnp.broadcast_to(levels, z.shape[:-1]).reshape(b, D))
        mean = jnp.broadcast_to(mu, (b, D))
        if class_offsets is not None:
            table = jnp.concatenate([jnp.asarray(class_offsets, jnp.float32), jnp.zeros((1, D))])
            mean = mean + table[labels]
        if shared:
            alpha, sigma = alpha[:1], sigma[:1]
        m = alpha[:, :, None] * cov[None] * alpha[:, None, :] + jax.vmap(jnp.diag)(sigma**2)
        # x_hat - mean = S A M^-1 (z - A mean); as a row vector (z - A mean) M^-1 A S.
        gain = jnp.linalg.solve(m, alpha[:, :, None] * cov[None])
        x_hat = mean + jnp.einsum(
            "bi,bij->bj", zf - alpha * mean, jnp.broadcast_to(gain, (b, D, D))
        )
        if prediction == "x":
            out = x_hat
        else:
            alpha, sigma = jnp.broadcast_to(alpha, zf.shape), jnp.broadcast_to(sigma, zf.shape)
            eps = jnp.where(sigma > 0, (zf - alpha * x_hat) / jnp.where(sigma > 0, sigma, 1), 0)
            out = {"eps": eps, "v": jnp.where(sigma > 0, eps - x_hat, 0.0)}[prediction]
        return out.reshape(z.shape)

    return denoise


def ddim_coefficients(a_t, s_t, a_s, s_s, eta):
    """(direction, c) of z_s = a_s x_hat + direction eps_hat + c noise, in float64 NumPy.

    r^2 = SNR(t) / SNR(s); c = eta s_s sqrt(1 - r^2); direction = sqrt(s_s^2 - c^2), written as
    s_s sqrt((1 - eta^2) + eta^2 r^2). Only for tokens that move (s < t, so a_s, s_t > 0).
    """
    a_t, s_t, a_s, s_s = (np.asarray(v, np.float64) for v in (a_t, s_t, a_s, s_s))
    ratio_sq = np.square(a_t * s_s / (a_s * s_t))
    c = eta * s_s * np.sqrt(np.clip(1 - ratio_sq, 0, 1))
    return s_s * np.sqrt((1 - eta**2) + eta**2 * ratio_sq), c


def reference(plan, eta, schedule, z_mean, z_cov):
    """Mean and covariance of the sampler's output for a plan shared by the batch, in float64.

    z_mean [D], z_cov [D, D]: the start state's moments.
    """
    levels = np.broadcast_to(np.asarray(plan.levels), (plan.steps + 1, *plan.shape))[:, 0]
    levels = levels.reshape(plan.steps + 1, D)
    update = np.asarray(plan.update)[0].reshape(D)

    def alpha_sigma(t):
        a, s = schedule.alpha_sigma(jnp.asarray(t, jnp.float32))
        return np.asarray(a, np.float64), np.asarray(s, np.float64)

    mean, cov = np.asarray(z_mean, np.float64), np.asarray(z_cov, np.float64)
    for t, s in itertools.pairwise(levels):
        (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
        moves = update & (s < t)
        gain = COV * a_t[None] @ np.linalg.inv(a_t[:, None] * COV * a_t[None] + np.diag(s_t**2))
        # x_hat = gain z + (I - gain A) mu; eps_hat = (z - a_t x_hat) / s_t on moving tokens.
        offset = (np.eye(D) - gain * a_t[None]) @ MU
        st = np.where(moves, s_t, 1.0)
        direction, c = ddim_coefficients(a_t, st, np.where(moves, a_s, 1.0), s_s, eta)
        p = a_s[:, None] * gain + (direction / st)[:, None] * (np.eye(D) - a_t[:, None] * gain)
        q = a_s * offset - direction / st * a_t * offset
        p = np.where(moves[:, None], p, np.eye(D))
        q, c = np.where(moves, q, 0.0), np.where(moves, c, 0.0)
        mean, cov = p @ mean + q, p @ cov @ p.T + np.diag(c**2)
    return mean, cov


def conditional(known: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of N(MU, COV) given x on the known tokens (zero covariance there)."""
    k, u = known, ~known
    solve = np.linalg.solve(COV[np.ix_(k, k)], COV[np.ix_(k, u)])
    mean, cov = x.copy(), np.zeros((D, D))
    mean[u] = MU[u] + solve.T @ (x[k] - MU[k])
    cov[np.ix_(u, u)] = COV[np.ix_(u, u)] - COV[np.ix_(u, k)] @ solve
    return mean, cov


def basis_noise() -> np.ndarray:
    """[D + 1, 4, 4, 1]: zero noise, then each unit vector (eta = 0 maps noise affinely)."""
    return np.concatenate([np.zeros((1, D)), np.eye(D)]).reshape(D + 1, *GRID, 1)


def affine_moments(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of an affine map of N(0, I), from its images of 0 and of each e_j."""
    out = np.asarray(out, np.float64).reshape(D + 1, D)
    columns = out[1:] - out[0]
    return out[0], columns.T @ columns


def assert_gaussian(samples, mean, cov, dims, n_se: float = 4.5):
    """Whitened by cov on `dims`, samples have mean 0 and covariance I within sampling error."""
    x = np.asarray(samples, np.float64).reshape(-1, D)[:, dims]
    n = x.shape[0]
    chol = np.linalg.cholesky(cov[np.ix_(dims, dims)])
    y = np.linalg.solve(chol, (x - mean[dims]).T).T
    emp = np.cov(y.T)
    k = len(dims)
    assert np.max(np.abs(y.mean(0))) < n_se / np.sqrt(n)
    assert abs(np.trace(emp) / k - 1) < n_se * np.sqrt(2 / (n * k))
    off = emp - np.diag(np.diag(emp))
    assert np.max(np.abs(np.diag(emp) - 1)) < n_se * np.sqrt(2 / n)
    assert np.max(np.abs(off)) < n_se / np.sqrt(n)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [RectifiedFlow(shift=2.0), CosineVP()])
def test_ddim_step_eta1_is_the_exact_posterior(schedule):
    """With the true x and eps, eta = 1 draws q(z_s | z_t, x): closed-form mean and variance."""
    key = jax.random.key(0)
    t = jax.random.uniform(key, (3, 4, 4), minval=0.05, maxval=1.0)
    s = t * jax.random.uniform(jax.random.fold_in(key, 1), t.shape)
    x = jax.random.normal(jax.random.fold_in(key, 2), (3, 4, 4, 2))
    eps = jax.random.normal(jax.random.fold_in(key, 3), x.shape)
    a_t, s_t = (v[..., None] for v in schedule.alpha_sigma(t))
    a_s, s_s = (v[..., None] for v in schedule.alpha_sigma(s))
    z = a_t * x + s_t * eps

    def step(noise, eta=1.0):
        return sampling.ddim_step(z, x, eps, t, s, noise, eta, schedule)

    a_ts, var_ts = a_t / a_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2
    post_mean = a_ts * s_s**2 / s_t**2 * z + a_s * var_ts / s_t**2 * x
    post_std = jnp.sqrt(var_ts * s_s**2 / s_t**2)
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    np.testing.assert_allclose(step(zero), post_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        step(one) - step(zero), jnp.broadcast_to(post_std, x.shape), rtol=1e-3, atol=1e-5
    )
    # eta = 0: deterministic, and with the true x and eps it lands on the forward process.
    np.testing.assert_allclose(step(one, 0.0), a_s * x + s_s * eps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", [RectifiedFlow(), CosineVP(shift=2.0)], ids=repr)
@pytest.mark.parametrize("eta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("first_step", [True, False], ids=["from_level_1", "interior"])
def test_ddim_step_matches_a_float64_reference_under_jit(schedule, eta, first_step):
    """The jitted step equals the float64 formula to float32 rounding, eta = 1 from level 1 too.

    (Written as sqrt(s_s^2 - c^2), the eta = 1 step from level 1 was off by up to 5e-4 of the
    data scale under jit, where the exact eps_hat coefficient is 0.)
    """
    key = jax.random.key(20)
    shape = (4, 8, 8, 3)
    z, x_hat, eps_hat, noise = (
        jax.random.normal(jax.random.fold_in(key, i), shape) for i in range(4)
    )
    if first_step:
        t = jnp.ones(shape[:-1])
        s = jnp.full(shape[:-1], 1.0 - 1.0 / 250)
    else:
        t = jax.random.uniform(jax.random.fold_in(key, 4), shape[:-1], minval=0.02, maxval=0.99)
        # Steps of samplers with 50 to 500 steps.
        s = t - jax.random.uniform(jax.random.fold_in(key, 5), t.shape, minval=0.002, maxval=0.02)
    step = jax.jit(sampling.ddim_step, static_argnums=7)
    out = np.asarray(step(z, x_hat, eps_hat, t, s, noise, jnp.float32(eta), schedule), np.float64)

    a_t, s_t = schedule.alpha_sigma(t[..., None])
    a_s, s_s = schedule.alpha_sigma(s[..., None])
    direction, c = ddim_coefficients(a_t, s_t, a_s, s_s, eta)
    x_hat, eps_hat, noise = (np.asarray(v, np.float64) for v in (x_hat, eps_hat, noise))
    expected = np.asarray(a_s, np.float64) * x_hat + direction * eps_hat + c * noise
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_steps_leave_unmoved_tokens_bit_exact():
    key = jax.random.key(1)
    z = jax.random.normal(key, (2, 4, 4, 3))
    t = jnp.where(jnp.arange(4)[None, :, None] < 2, 0.5, 0.0) * jnp.ones((2, 4, 4))
    nan = jnp.full_like(z, jnp.nan)  # unused predictions must not leak
    out = sampling.ddim_step(z, nan, nan, t, t, nan, 0.25, RectifiedFlow())
    assert np.array_equal(np.asarray(out), np.asarray(z))
    out = sampling.forward_step(z, t, t, nan, CosineVP())
    assert np.array_equal(np.asarray(out), np.asarray(z))


@pytest.mark.parametrize("schedule", [RectifiedFlow(), CosineVP(shift=0.5)])
def test_forward_step_composes_to_the_marginal(schedule):
    """q(z_t | x) followed by q(z_s | z_t) is q(z_s | x): mean alpha_s x, variance sigma_s^2."""
    t = jnp.linspace(0.0, 0.9, 16).reshape(1, 4, 4)
    s = jnp.minimum(t + 0.3, 1.0)
    a_t, s_t = (v[..., None] for v in schedule.alpha_sigma(t))
    a_s, s_s = (v[..., None] for v in schedule.alpha_sigma(s))
    x = jnp.full((1, 4, 4, 1), 0.7)
    # The output is affine in (eps, noise): read its coefficients off unit inputs.
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    base = sampling.forward_step(a_t * x, t, s, zero, schedule)
    via_eps = sampling.forward_step(a_t * x + s_t, t, s, zero, schedule) - base
    via_noise = sampling.forward_step(a_t * x, t, s, one, schedule) - base
    np.testing.assert_allclose(base, a_s * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(via_eps**2 + via_noise**2, s_s**2, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Whole sampler vs closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("schedule", "prediction"), [(RectifiedFlow(), "v"), (CosineVP(), "x")])
def test_deterministic_ddim_matches_reference_and_data(schedule, prediction):
    """eta = 0 maps the start noise affinely: its exact output moments vs reference and N(mu, S).

    The variance shrinks by a first-order discretisation error: ~4x smaller at 4x the steps.
    """
    plan = plans.synchronous(400, D + 1, GRID)
    out = sampling.sample(
        denoiser(schedule, prediction, shared=True),
        plan,
        jax.random.key(0),
        schedule=schedule,
        prediction=prediction,
        eta=0.0,
        noise=basis_noise(),
    )
    mean, cov = affine_moments(out)
    ref_mean, ref_cov = reference(plan, 0.0, schedule, np.zeros(D), np.eye(D))
    np.testing.assert_allclose(mean, ref_mean, atol=2e-5)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(mean, MU, atol=2e-5)
    shrink = 1 - np.trace(cov) / np.trace(COV)
    assert 0 < shrink < 0.01
    assert np.linalg.norm(cov - COV) / np.linalg.norm(COV) < 5 * shrink
    coarse = reference(plans.synchronous(100, 1, GRID), 0.0, schedule, np.zeros(D), np.eye(D))[1]
    assert 3.0 < (1 - np.trace(coarse) / np.trace(COV)) / shrink < 5.0


@pytest.mark.parametrize("eta", [1.0, 0.25])
def test_stochastic_ddim_samples_the_data(eta):
    """4096 samples: moments equal the reference within sampling error; reference ~ N(mu, S)."""
    schedule, steps, n = RectifiedFlow(), 250, 4096
    plan = plans.synchronous(steps, n, GRID)
    x = sampling.sample(
        denoiser(schedule, "v", shared=True),
        plan,
        jax.random.key(2),
        schedule=schedule,
        prediction="v",
        eta=eta,
        channels=1,
    )
    ref_mean, ref_cov = reference(plan, eta, schedule, np.zeros(D), np.eye(D))
    assert_gaussian(x, ref_mean, ref_cov, np.arange(D))
    assert abs(np.trace(ref_cov) / np.trace(COV) - 1) < 0.025  # the finite-step shrink
    np.testing.assert_allclose(ref_mean, MU, atol=1e-5)


KNOWN = np.zeros(GRID, bool)
KNOWN[0] = True
KNOWN[:, 0] = True  # top row and left column known: 7 tokens


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_inpainting_samples_the_exact_conditional(eta):
    schedule = RectifiedFlow()
    x_data = np.random.default_rng(5).multivariate_normal(MU, COV)
    known = KNOWN.reshape(D)
    target_mean, target_cov = conditional(known, x_data)
    n = D + 1 if eta == 0.0 else 4096
    steps = 250
    plan = plans.inpaint(np.broadcast_to(KNOWN, (n, *GRID)).astype(np.float32), steps)
    x_known = np.broadcast_to(x_data.reshape(1, *GRID, 1), (n, *GRID, 1)).astype(np.float32)
    out = sampling.sample(
        denoiser(schedule, "v", shared=True),
        plan,
        jax.random.key(3),
        schedule=schedule,
        eta=eta,
        x_known=x_known,
        noise=basis_noise() if eta == 0.0 else None,
    )
    out = np.asarray(out)
    assert np.array_equal(out[:, KNOWN], x_known[:, KNOWN])  # bit for bit
    z_cov = np.diag(np.where(known, 0.0, 1.0))
    ref_mean, ref_cov = reference(plan, eta, schedule, np.where(known, x_data, 0.0), z_cov)
    unknown = np.flatnonzero(~known)
    if eta == 0.0:
        mean, cov = affine_moments(out)
        np.testing.assert_allclose(mean, ref_mean, atol=2e-5)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-3, atol=1e-4)
    else:
        assert_gaussian(out, ref_mean, ref_cov, unknown)
    sub = np.ix_(unknown, unknown)
    np.testing.assert_allclose(ref_mean, target_mean, atol=1e-5)
    assert np.linalg.norm(ref_cov[sub] - target_cov[sub]) < 0.03 * np.linalg.norm(target_cov[sub])


def test_asynchronous_plans_sample_the_data():
    """Editing from noised data and rolling autoregressive generation both return N(mu, S)."""
    schedule, n = CosineVP(), 4096
    rng = np.random.default_rng(6)
    # Edit: strength rising left to right, the first column kept (strength 0).
    strength = np.broadcast_to(np.linspace(0.0, 1.0, 4)[None, :], GRID).astype(np.float32)
    plan = plans.edit(np.broadcast_to(strength, (n, *GRID)), 200)
    x_data = rng.multivariate_normal(MU, COV, size=n).reshape(n, *GRID, 1).astype(np.float32)
    out = sampling.sample(
        denoiser(schedule, "v", shared=True),
        plan,
        jax.random.key(4),
        schedule=schedule,
        eta=0.25,
        x_known=x_data,
    )
    assert np.array_equal(np.asarray(out)[:, :, 0], x_data[:, :, 0])
    a0, s0 = (np.asarray(v, np.float64).reshape(D) for v in schedule.alpha_sigma(strength))
    z_cov = a0[:, None] * COV * a0[None] + np.diag(s0**2)
    ref_mean, ref_cov = reference(plan, 0.25, schedule, a0 * MU, z_cov)
    assert_gaussian(out, ref_mean, ref_cov, np.arange(D))
    assert np.linalg.norm(ref_cov - COV) < 0.03 * np.linalg.norm(COV)

    # Autoregressive: 2 x 2 patches in raster order, rolling windows of 200 steps overlapping 150.
    plan = plans.autoregressive(GRID, n, 2, 200, overlap=150)
    out = sampling.sample(
        denoiser(schedule, "x", shared=True),
        plan,
        jax.random.key(5),
        schedule=schedule,
        prediction="x",
        eta=0.25,
        channels=1,
    )
    ref_mean, ref_cov = reference(plan, 0.25, schedule, np.zeros(D), np.eye(D))
    assert_gaussian(out, ref_mean, ref_cov, np.arange(D))
    assert np.linalg.norm(ref_cov - COV) < 0.03 * np.linalg.norm(COV)
    np.testing.assert_allclose(ref_mean, MU, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Guidance, network calls, compilation
# ---------------------------------------------------------------------------------------------


def counting(denoise):
    """Wraps denoise: `traces` counts Python calls (traces); `batches` the batch size of each
    executed call (recorded by a host callback at run time)."""
    record = {"traces": 0, "batches": []}

    def wrapped(z, levels, labels):
        record["traces"] += 1
        jax.debug.callback(lambda n: record["batches"].append(int(n)), z.shape[0])
        return denoise(z, levels, labels)

    return wrapped, record


def inpaint_setup(n=4, steps=12):
    plan = plans.inpaint(np.broadcast_to(KNOWN, (n, *GRID)).astype(np.float32), steps)
    x_known = np.random.default_rng(7).normal(size=(n, *GRID, 1)).astype(np.float32)
    return plan, x_known


@pytest.mark.parametrize(
    ("cfg", "ig", "branches"), [(0.0, 0.0, 1), (1.5, 0.0, 2), (0.0, 2.0, 2), (1.5, 2.0, 4)]
)
def test_one_batched_network_call_per_step(cfg, ig, branches):
    schedule = RectifiedFlow()
    plan, x_known = inpaint_setup()
    offsets = np.random.default_rng(8).normal(size=(3, D))
    denoise, record = counting(denoiser(schedule, "v", class_offsets=offsets))
    x = sampling.sample(
        denoise,
        plan,
        jax.random.key(6),
        schedule=schedule,
        x_known=x_known,
        labels=jnp.array([0, 1, 2, 1]),
        num_classes=3,
        cfg_scale=cfg,
        input_guidance=ig,
    )
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert record["traces"] == 1  # one call site in the scanned step
    assert record["batches"] == [4 * branches] * plan.steps  # one call per step, branches batched
    cost = sampling.sample_cost(plan, cfg_scale=cfg, input_guidance=ig)
    assert cost == sampling.Cost(plan.steps, plan.steps * branches, 4 * branches)
    assert np.array_equal(np.asarray(x)[:, KNOWN], x_known[:, KNOWN])


def test_guidance_at_scale_zero_equals_the_unguided_sampler():
    schedule = RectifiedFlow()
    plan, x_known = inpaint_setup()
    offsets = np.random.default_rng(9).normal(size=(3, D))
    denoise = denoiser(schedule, "v", class_offsets=offsets)
    common = dict(schedule=schedule, x_known=x_known, labels=jnp.array([0, 1, 2, 3]))
    common.update(num_classes=3, eta=0.5)
    plain = sampling.sample(denoise, plan, jax.random.key(7), **common)
    zero = jnp.float32(0.0)  # an array: the branches are built and weighted by 0
    guided = sampling.sample(
        denoise, plan, jax.random.key(7), cfg_scale=zero, input_guidance=zero, **common
    )
    np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)
    # The same compiled program with input guidance on moves the samples.
    moved = sampling.sample(
        denoise, plan, jax.random.key(7), cfg_scale=zero, input_guidance=1.0, **common
    )
    assert not np.allclose(moved, plain, atol=1e-3)


def test_classifier_free_guidance_closed_form():
    """Class means mu + delta_y, null mean mu: CFG at scale w samples the mean mu + (1 + w) delta_y
    (the combined denoiser is the exact one for that mean), read off the zero-noise path."""
    schedule = RectifiedFlow()
    offsets = np.random.default_rng(10).normal(size=(2, D))
    denoise = denoiser(schedule, "v", class_offsets=offsets)
    plan = plans.synchronous(50, 3, GRID)
    labels = jnp.array([0, 1, 2])  # 2 = null
    for w in (0.0, 2.5):
        out = sampling.sample(
            denoise,
            plan,
            jax.random.key(8),
            schedule=schedule,
            eta=0.0,
            noise=np.zeros((3, *GRID, 1), np.float32),
            labels=labels,
            num_classes=2,
            cfg_scale=jnp.float32(w),
        )
        expected = MU + (1 + w) * np.concatenate([offsets, np.zeros((1, D))])
        np.testing.assert_allclose(np.asarray(out).reshape(3, D), expected, atol=1e-4)


def test_batched_branches_carry_the_right_contexts():
    """The 4 branches: (label, null) at the actual context, then at the noisier context."""
    schedule = RectifiedFlow()
    plan, x_known = inpaint_setup(n=2, steps=4)
    seen = []

    def denoise(z, levels, labels):
        jax.debug.callback(lambda *a: seen.append([np.asarray(v) for v in a]), z, levels, labels)
        return jnp.zeros_like(z)

    sampling.sample(
        denoise,
        plan,
        jax.random.key(9),
        schedule=schedule,
        x_known=x_known,
        labels=jnp.array([1, 0]),
        num_classes=5,
        cfg_scale=1.0,
        input_guidance=1.0,
    )
    jax.effects_barrier()
    z, levels, labels = seen[1]  # step 1: unknown tokens at level 0.75
    np.testing.assert_array_equal(labels, [1, 0, 5, 5, 1, 0, 5, 5])
    levels = levels.reshape(2, 2, 2, *GRID)  # [context, label set, B, *tokens]
    np.testing.assert_array_equal(levels[0], np.where(KNOWN, 0.0, 0.75) + np.zeros((2, 2, 1, 1)))
    np.testing.assert_array_equal(levels[1], np.full((2, 2, *GRID), 0.75))  # 'match'
    z = z.reshape(2, 2, 2, *GRID)
    np.testing.assert_array_equal(z[0, 0], z[0, 1])
    np.testing.assert_array_equal(z[1][..., ~KNOWN], z[0][..., ~KNOWN])  # unknown unchanged
    assert not np.allclose(z[1][..., KNOWN], z[0][..., KNOWN])


def test_noisier_context_statistics():
    """Known tokens at level 0 noised to c: alpha(c) x + sigma(c) noise; the rest untouched."""
    schedule = CosineVP()
    n = 20000
    update = jnp.broadcast_to(jnp.asarray(~KNOWN), (n, *GRID))
    t = jnp.where(update, 0.6, 0.0)
    level = guidance.context_level(t, update, None)
    np.testing.assert_allclose(level, 0.6)
    np.testing.assert_allclose(guidance.context_level(t, update, 0.3), 0.3)
    z = jnp.where(update[..., None], 5.0, 2.0)
    z_c, t_c = guidance.noisier_context(z, t, update, level, jax.random.key(10), schedule)
    np.testing.assert_array_equal(t_c, jnp.full_like(t, 0.6))
    z_c = np.asarray(z_c)[..., 0]
    assert np.all(z_c[:, ~KNOWN] == 5.0)
    a, s = (float(v) for v in schedule.alpha_sigma(0.6))
    k = z_c[:, KNOWN]
    assert abs(k.mean() - 2.0 * a) < 4 * s / np.sqrt(k.size)
    assert abs(k.std() / s - 1) < 0.02


def test_scales_and_eta_are_traced_not_recompiled():
    schedule = RectifiedFlow()
    plan, x_known = inpaint_setup()
    denoise, record = counting(denoiser(schedule, "v", class_offsets=np.zeros((3, D))))
    common = dict(schedule=schedule, x_known=x_known, labels=jnp.array([0, 1, 2, 0]))
    common.update(num_classes=3)
    for eta, cfg, ig, level in [(0.1, 1.0, 1.0, 0.5), (0.9, 3.0, 0.5, 0.2), (0.0, -1.0, 7.0, 1)]:
        sampling.sample(
            denoise,
            plan,
            jax.random.key(11),
            eta=eta,
            cfg_scale=cfg,
            input_guidance=ig,
            context_level=level,
            **common,
        )
    assert record["traces"] == 1


# ---------------------------------------------------------------------------------------------
# RePaint
# ---------------------------------------------------------------------------------------------


def test_repaint_schedule_structure():
    steps, j, r = 40, 5, 3
    levels = sampling.repaint_schedule(steps, j, r)
    moves = np.round(np.diff(levels) * steps).astype(int)
    assert levels[0] == 1.0 and levels[-1] == 0.0 and set(moves) == {-1, 1}
    jumps = len(range(1, steps - j + 1, j))
    assert np.sum(moves == 1) == jumps * (r - 1) * j
    assert sampling.repaint_cost(2, steps, j, r).network_calls == steps + jumps * (r - 1) * j
    assert sampling.repaint_cost(2, 250).network_calls == 250 + 24 * 9 * 10  # RePaint defaults
    plain = sampling.repaint_schedule(steps, j, 1)
    np.testing.assert_allclose(plain, 1 - np.arange(steps + 1) / steps, atol=1e-7)


def test_repaint_keeps_known_tokens_and_counts_calls():
    schedule = RectifiedFlow()
    n, steps = 2048, 30
    x_data = np.random.default_rng(5).multivariate_normal(MU, COV)
    x_known = np.broadcast_to(x_data.reshape(1, *GRID, 1), (n, *GRID, 1)).astype(np.float32)
    mask = np.broadcast_to(KNOWN, (n, *GRID)).astype(np.float32)
    known = KNOWN.reshape(D)
    target_mean, _ = conditional(known, x_data)
    errors = {}
    for r in (1, 4):
        denoise, record = counting(denoiser(schedule, "v", shared=True))
        out = sampling.repaint(
            denoise,
            x_known,
            mask,
            jax.random.key(12),
            schedule=schedule,
            steps=steps,
            jump_length=5,
            resample=r,
        )
        jax.effects_barrier()
        out = np.asarray(out)
        assert np.array_equal(out[:, KNOWN], x_known[:, KNOWN])
        assert len(record["batches"]) == sampling.repaint_cost(n, steps, 5, r).network_calls
        errors[r] = np.abs(out.reshape(n, D).mean(0) - target_mean)[~known].max()
    # Resampling harmonises: the unknown mean moves towards the exact conditional mean.
    assert errors[4] < 0.5 * errors[1]


# ---------------------------------------------------------------------------------------------
# Compact plans: the same samples as the materialised field, without holding it
# ---------------------------------------------------------------------------------------------


def tiny_denoise(z, levels, labels):
    """A cheap deterministic 'v' predictor that depends on z and the level of every token."""
    lv = levels[..., None]
    return (
        jnp.tanh(0.5 * z) * (1.0 - lv) + 0.1 * lv + 0.05 * jnp.mean(z, axis=(1, 2), keepdims=True)
    )


def standard_plans():
    """(name, plan, x_known, guidance): every compact constructor, batch 3 on a 5 x 4 grid."""
    rng = np.random.default_rng(30)
    grid = (5, 4)
    mask = (rng.uniform(size=(3, *grid)) < 0.4).astype(np.float32)
    strength = np.where(rng.uniform(size=(3, *grid)) < 0.2, 0.0, rng.uniform(size=(3, *grid)))
    x = rng.normal(size=(3, *grid, 2)).astype(np.float32)
    return [
        ("synchronous", plans.synchronous(9, 3, grid), None, 0.0),
        ("inpaint", plans.inpaint(mask, 9), x, 1.5),
        ("edit", plans.edit(strength.astype(np.float32), 9), x, 0.0),
        (
            "autoregressive",
            plans.autoregressive(grid, 3, 2, 4, order="random", overlap=1, key=jax.random.key(3)),
            None,
            0.0,
        ),
    ]


@pytest.mark.parametrize("case", range(4), ids=lambda i: standard_plans()[i][0])
def test_compact_plans_sample_bit_exactly_like_their_materialised_field(case):
    name, plan, x_known, input_guidance = standard_plans()[case]
    assert plan.compact and plan.kind == name
    field = plans.from_array(plan.levels, plan.update)
    assert not field.compact
    # at(k), eager and traced, is the materialised row for every k.
    rows = np.broadcast_to(np.asarray(plan.levels), (plan.steps + 1, *plan.shape))
    traced = np.asarray(jax.jit(jax.vmap(plan.at))(jnp.arange(plan.steps + 1)))
    for k in range(plan.steps + 1):
        assert np.array_equal(np.asarray(plan.at(k)), rows[k])
        assert np.array_equal(traced[k], rows[k])

    def run(p):
        return np.asarray(
            sampling.sample(
                tiny_denoise,
                p,
                jax.random.key(31),
                schedule=CosineVP(),
                eta=0.5,
                x_known=x_known,
                channels=None if x_known is not None else 2,
                input_guidance=input_guidance,
            )
        )

    compact, materialised = run(plan), run(field)
    assert np.all(np.isfinite(compact))
    assert np.array_equal(compact, materialised)


def test_the_compiled_sampler_holds_no_level_field_for_a_compact_plan():
    """400 steps x 8 samples x 32 x 32 tokens: the field is 13 MB, the compact program ~0.3 MB."""
    steps, batch, grid = 400, 8, (32, 32)
    rng = np.random.default_rng(32)
    mask = (rng.uniform(size=(batch, *grid)) < 0.3).astype(np.float32)
    x = rng.normal(size=(batch, *grid, 1)).astype(np.float32)
    field_bytes = steps * batch * grid[0] * grid[1] * 4

    def program_bytes(plan):
        fn = jax.jit(
            lambda plan, key, x: sampling.sample(
                tiny_denoise, plan, key, schedule=RectifiedFlow(), x_known=x
            )
        )
        stats = fn.lower(plan, jax.random.key(0), x).compile().memory_analysis()
        return stats.argument_size_in_bytes + stats.temp_size_in_bytes

    compact = plans.inpaint(mask, steps)
    assert program_bytes(compact) < field_bytes / 10
    # The measure sees a field where one is held.
    assert program_bytes(plans.from_array(compact.levels, compact.update)) > field_bytes


# ---------------------------------------------------------------------------------------------
# Module layout
# ---------------------------------------------------------------------------------------------


def test_no_submodule_is_shadowed_by_a_reexported_function():
    names = [info.name for info in pkgutil.iter_modules(sampling.__path__)]
    assert "resampling" in names and "sampler" in names
    for name in names:
        module = importlib.import_module(f"apd.sampling.{name}")
        assert isinstance(module, types.ModuleType)
        assert getattr(sampling, name) is module, f"apd.sampling.{name} is not the module"
    for function in ("repaint", "repaint_cost", "repaint_schedule", "sample", "sample_cost"):
        assert callable(getattr(sampling, function))
        assert not isinstance(getattr(sampling, function), types.ModuleType)
    assert sampling.repaint is sampling.resampling.repaint


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [RectifiedFlow(), CosineVP(shift=2.0)], ids=repr)
def test_eps_prediction_from_level_1_is_refused_before_tracing(schedule):
    """alpha(1) = 0: x_hat = (z - sigma eps_hat) / alpha would make every sample NaN."""
    denoise = denoiser(schedule, "eps")
    key = jax.random.key(0)
    common = dict(schedule=schedule, prediction="eps")
    with pytest.raises(ValueError, match=r"prediction='eps'.*alpha = 0.*'v' or 'x'"):
        sampling.sample(denoise, plans.synchronous(6, 2, GRID), key, channels=1, **common)
    plan, x_known = inpaint_setup()
    with pytest.raises(ValueError, match=r"updated token \(0, 1, 1\) at level 1\.0"):
        sampling.sample(denoise, plan, key, x_known=x_known, **common)
    # A traced plan is refused by its kind.
    jitted = jax.jit(lambda plan, key: sampling.sample(denoise, plan, key, channels=1, **common))
    with pytest.raises(ValueError, match=r"synchronous plan starts every updated token at level 1"):
        jitted(plans.synchronous(6, 2, GRID), key)
    # An edit reaching level 1 at one token is refused, naming it; below level 1 'eps' works.
    strength = np.full((2, *GRID), 0.6, np.float32)
    strength[1, 2, 3] = 1.0
    with pytest.raises(ValueError, match=r"token \(1, 2, 3\) at level 1\.0"):
        sampling.sample(denoise, plans.edit(strength, 6), key, x_known=x_known[:2], **common)
    strength[1, 2, 3] = 0.9
    out = sampling.sample(denoise, plans.edit(strength, 6), key, x_known=x_known[:2], **common)
    assert np.all(np.isfinite(np.asarray(out)))
    mask = np.broadcast_to(KNOWN, (4, *GRID))
    with pytest.raises(ValueError, match=r"RePaint starts every token at level 1.*'v' or 'x'"):
        sampling.repaint(denoise, x_known, mask, key, steps=4, **common)
    with pytest.raises(ValueError, match=r"RePaint starts every token at level 1"):
        jax.jit(lambda x: sampling.repaint(denoise, x, mask, key, steps=4, **common))(x_known)


def test_bad_input_is_rejected():
    schedule = RectifiedFlow()
    plan, x_known = inpaint_setup()
    denoise = denoiser(schedule, "v")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="pass x_known"):
        sampling.sample(denoise, plan, key, schedule=schedule, channels=1)
    with pytest.raises(ValueError, match="labels"):
        sampling.sample(denoise, plan, key, schedule=schedule, x_known=x_known, cfg_scale=1.0)
    with pytest.raises(ValueError, match="eta"):
        sampling.sample(denoise, plan, key, schedule=schedule, x_known=x_known, eta=1.5)
    with pytest.raises(ValueError, match="does not fit the plan"):
        sampling.sample(denoise, plan, key, schedule=schedule, x_known=x_known[:, :3])
    with pytest.raises(ValueError, match="labels must lie"):
        sampling.sample(
            denoise,
            plan,
            key,
            schedule=schedule,
            x_known=x_known,
            labels=jnp.array([0, 1, 2, 9]),
            num_classes=3,
        )
    with pytest.raises(ValueError, match="context_level"):
        sampling.sample(
            denoise, plan, key, schedule=schedule, x_known=x_known, context_level="mean"
        )
    with pytest.raises(ValueError, match="prediction type"):
        sampling.sample(denoise, plan, key, schedule=schedule, x_known=x_known, prediction="z")
    with pytest.raises(ValueError, match="non-increasing"):
        bad = plans.Plan(plan.levels[::-1], plan.update)
        sampling.sample(denoise, bad, key, schedule=schedule, x_known=x_known)
    with pytest.raises(ValueError, match="jump_length"):
        sampling.repaint_schedule(10, 0, 2)
