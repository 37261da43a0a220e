"""The path ELBO: exactness on Gaussian data, the separate terms, paths, and jit/sharding.

Exactness (method.md §4.3): for x ~ N(mu, S) and the exact posterior-mean denoiser, the expected
diffusion term of any path between the same endpoint levels equals
I(X; Z at the clean end) - I(X; Z at the noisy end), both closed form. Estimates are averages over
n independent replicates (one example, its own points and noise, per replicate), so the standard
error is the sample standard deviation over sqrt(n).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from apd import corruption, elbo, paths, schedules

SCHEDULE = schedules.RectifiedFlow()
H, W, C = 4, 4, 2
D = H * W * C
LEVEL_SHAPE = (1, H, W)  # one path shared by every replicate
# Endpoints with SNR 1e6 and 1e-6: both informations finite, the difference ~ 200 nats.
T_START, T_END = 1e-3, 0.999


def _gaussian_model(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """mu [D] and a strongly correlated S [D, D] over (row, column, channel), float64."""
    rng = np.random.default_rng(seed)
    rows, cols, chans = (a.ravel() for a in np.meshgrid(*map(np.arange, (H, W, C)), indexing="ij"))
    dist2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    smooth = np.exp(-dist2 / (2 * 1.5**2)) * np.where(chans[:, None] == chans[None], 1.0, 0.6)
    low_rank = rng.normal(size=(D, 4))
    cov = smooth + 0.3 * low_rank @ low_rank.T / 4 + 0.02 * np.eye(D)
    return rng.normal(size=D) * 0.5, cov


MU, COV = _gaussian_model()
MU32, COV32 = jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32)
CHOL32 = jnp.asarray(np.linalg.cholesky(COV), jnp.float32)


def _per_dim(token_values: jax.Array) -> jax.Array:
    """[B, H, W] -> [B, D], repeating each token's value over its channels (x's raveled order)."""
    b = token_values.shape[0]
    return jnp.broadcast_to(token_values[..., None], (b, H, W, C)).reshape(b, D)


def exact_denoiser(z: jax.Array, levels: jax.Array) -> jax.Array:
    """E[x | z] = mu + S A (A S A + D)^-1 (z - A mu), batched; z [B, H, W, C], levels [B, H, W]."""
    b = z.shape[0]
    alpha, sigma = (_per_dim(v) for v in SCHEDULE.alpha_sigma(levels))
    gram = alpha[:, :, None] * COV32[None] * alpha[:, None, :] + jax.vmap(jnp.diag)(sigma**2)
    rhs = z.reshape(b, D) - alpha * MU32[None]
    solved = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram), True), rhs[..., None])
    return (MU32[None] + (alpha * solved[..., 0]) @ COV32).reshape(z.shape)


def mutual_information(levels: np.ndarray, cov: np.ndarray = COV) -> float:
    """I(X; Z) = 1/2 log det(I + G^1/2 S G^1/2), G = diag(SNR); levels [1, H, W] per token."""
    t = np.asarray(levels, np.float64).reshape(-1)
    snr = np.repeat(((1 - t) / t) ** 2, cov.shape[0] // t.size)
    root = np.sqrt(snr)
    return 0.5 * np.linalg.slogdet(np.eye(len(snr)) + root[:, None] * cov * root[None])[1]


def sample_x(key: jax.Array, n: int) -> jax.Array:
    """n replicates of x ~ N(mu, S), each a batch of one: [n, 1, H, W, C]."""
    x = MU32[None] + jax.random.normal(key, (n, D)) @ CHOL32.T
    return x.reshape(n, 1, H, W, C)


RASTER_ORDER = (3, 0, 2, 1)


def make_path(kind: str, path_key: jax.Array) -> paths.Path:
    if kind == "synchronous":
        return paths.synchronous(LEVEL_SHAPE, T_START, T_END, SCHEDULE)
    if kind == "random_ray":
        return paths.random_ray(path_key, LEVEL_SHAPE, T_START, T_END)
    return paths.raster(LEVEL_SHAPE, 2, T_START, T_END, SCHEDULE, order=RASTER_ORDER)


@functools.partial(jax.jit, static_argnames=("kind", "num_points", "stratified"))
def _replicates(x, keys, path_key, *, kind, num_points, stratified):
    def one(x, key):
        path = make_path(kind, path_key)
        return elbo.diffusion_term(
            exact_denoiser,
            x,
            path,
            key,
            num_points=num_points,
            schedule=SCHEDULE,
            stratified=stratified,
        )[0]

    return jax.vmap(one)(x, keys)


def estimate(kind, path_key, *, n, num_points, stratified=True, seed=0):
    """(values [n], mean, standard error) of the diffusion term over n replicates."""
    key_x, key_points = jax.random.split(jax.random.key(seed, impl="rbg"))
    values = np.asarray(
        _replicates(
            sample_x(key_x, n),
            jax.random.split(key_points, n),
            path_key,
            kind=kind,
            num_points=num_points,
            stratified=stratified,
        ),
        np.float64,
    )
    return values, values.mean(), values.std(ddof=1) / math.sqrt(n)


def information_drop(path: paths.Path) -> float:
    return mutual_information(path(0.0)) - mutual_information(path(1.0))


PATH_CASES = [
    ("synchronous", 0),
    ("random_ray", 1),
    ("random_ray", 2),
    ("random_ray", 3),
    ("raster", 0),
]


@pytest.mark.parametrize(("kind", "seed"), PATH_CASES)
def test_expected_diffusion_term_is_the_information_drop(kind, seed):
    path_key = jax.random.key(seed)
    exact = information_drop(make_path(kind, path_key))
    values, mean, se = estimate(kind, path_key, n=2048, num_points=32, seed=10 + seed)
    assert np.all(values > 0)
    assert se < 0.004 * exact, f"MC standard error {se / exact:.3%} is too large"
    assert abs(mean - exact) < 0.01 * exact, (
        f"{kind}: estimate {mean:.3f} vs I(start) - I(end) = {exact:.3f} "
        f"({(mean - exact) / exact:+.3%}, standard error {se / exact:.3%})"
    )


def test_ray_paths_differ_but_share_endpoints():
    first = make_path("random_ray", jax.random.key(1))
    second = make_path("random_ray", jax.random.key(2))
    assert not np.allclose(first(0.5), second(0.5))
    for u, level in ((0.0, T_START), (1.0, T_END)):
        for path in (first, second):
            np.testing.assert_allclose(path(u), level, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_points", "stratified", "n"), [(1, False, 16384), (4, False, 4096), (4, True, 4096)]
)
def test_unbiased_for_any_number_of_points(num_points, stratified, n):
    exact = information_drop(make_path("synchronous", None))
    _, mean, se = estimate(
        "synchronous", None, n=n, num_points=num_points, stratified=stratified, seed=num_points
    )
    assert se < 0.01 * exact
    assert abs(mean - exact) < 4 * se, f"{mean} vs {exact} (standard error {se})"


@functools.partial(jax.jit, static_argnames=("kind", "num_points", "stratified"))
def _one_call(x, key, *, kind, num_points, stratified=True):
    """One diffusion_term call on a batch x [n, H, W, C]; random rays drawn per example."""
    key_path, key_points = jax.random.split(key)
    if kind == "random_ray":
        path = paths.random_ray(key_path, x.shape[:-1], T_START, T_END)
    else:
        path = make_path(kind, None)
    return elbo.diffusion_term(
        exact_denoiser,
        x,
        path,
        key_points,
        num_points=num_points,
        schedule=SCHEDULE,
        stratified=stratified,
    )


@pytest.mark.parametrize("stratified", [True, False])
def test_one_call_gives_independent_estimates_per_example(stratified):
    """The same image n times in one call spreads like n independent calls (no shared draw).

    With the points shared by the batch the variance within the call was about 0.4 (stratified)
    and 0.1 (i.i.d. points) of the variance across calls.
    """
    n = 1024
    x = sample_x(jax.random.key(3), 1)  # [1, 1, H, W, C]
    within = np.asarray(
        _one_call(
            jnp.broadcast_to(x[0], (n, H, W, C)),
            jax.random.key(5),
            kind="synchronous",
            num_points=4,
            stratified=stratified,
        ),
        np.float64,
    )
    across = np.asarray(
        _replicates(
            jnp.broadcast_to(x, (n, 1, H, W, C)),
            jax.random.split(jax.random.key(6), n),
            None,
            kind="synchronous",
            num_points=4,
            stratified=stratified,
        ),
        np.float64,
    )
    ratio = within.var(ddof=1) / across.var(ddof=1)
    assert 0.7 < ratio < 1.4, f"within-call / across-call variance {ratio:.3f}"
    assert stats.ks_2samp(within, across).pvalue > 1e-3


@pytest.mark.parametrize("kind", ["raster", "random_ray"])
def test_standard_error_of_one_batch_is_valid(kind):
    """Over 24 calls of 256 examples, (batch mean - exact) / (std / sqrt(n)) is ~ N(0, 1), and
    the pooled mean is the information drop (unbiased). Points shared by the batch gave a mean
    z^2 of 5 (random rays) and 3e12 (raster).
    """
    n, calls = 256, 24
    exact = information_drop(make_path("synchronous", None))  # the same for every path
    z, values = [], []
    for m in range(calls):
        key_x, key = jax.random.split(jax.random.key(100 + m, impl="rbg"))
        v = np.asarray(_one_call(sample_x(key_x, n)[:, 0], key, kind=kind, num_points=4))
        v = v.astype(np.float64)
        values.append(v)
        z.append((v.mean() - exact) / (v.std(ddof=1) / math.sqrt(n)))
    z = np.asarray(z)
    # chi^2 with 24 degrees of freedom / 24: below 2.2 with probability 0.9999.
    assert np.mean(np.square(z)) < 2.2, f"z-scores {np.round(z, 2)}"
    values = np.concatenate(values)
    se = values.std(ddof=1) / math.sqrt(values.size)
    assert abs(values.mean() - exact) < 4 * se, (values.mean(), exact, se)


def test_stratified_points_reduce_variance():
    plain, *_ = estimate("synchronous", None, n=4096, num_points=4, stratified=False, seed=4)
    strat, *_ = estimate("synchronous", None, n=4096, num_points=4, stratified=True, seed=4)
    assert np.std(strat) < 0.7 * np.std(plain)


def test_clean_context_tokens_give_the_conditional_information_drop():
    """Tokens held at t = 0 exactly (SNR inf, weight 0 * inf) add nothing and stay finite."""
    context = np.zeros(LEVEL_SHAPE, bool)
    context[..., : W // 2] = True
    moving = paths.synchronous(LEVEL_SHAPE, T_START, T_END, SCHEDULE)

    def path(u):
        return jnp.where(context, 0.0, moving(u))

    n = 1024
    key_x, key_points = jax.random.split(jax.random.key(7, impl="rbg"))
    run = jax.jit(
        jax.vmap(
            lambda x, key: elbo.diffusion_term(
                exact_denoiser, x, path, key, num_points=32, schedule=SCHEDULE
            )[0]
        )
    )
    values = np.asarray(run(sample_x(key_x, n), jax.random.split(key_points, n)), np.float64)
    assert np.all(np.isfinite(values))
    dims = np.repeat(~context.reshape(-1), C)
    cov_mc = COV[np.ix_(dims, ~dims)]
    conditional = COV[np.ix_(dims, dims)] - cov_mc @ np.linalg.solve(
        COV[np.ix_(~dims, ~dims)], cov_mc.T
    )
    levels = np.asarray(moving(0.0)), np.asarray(moving(1.0))
    exact = mutual_information(levels[0][~context], conditional) - mutual_information(
        levels[1][~context], conditional
    )
    mean, se = values.mean(), values.std(ddof=1) / math.sqrt(n)
    assert abs(mean - exact) < max(4 * se, 0.01 * exact), (mean, exact, se)


# ---- A cheap exact model: x ~ N(0, I), denoiser alpha z / (alpha^2 + sigma^2) ----


def _white_denoiser(z, levels):
    alpha, sigma = SCHEDULE.alpha_sigma(levels[..., None])
    return alpha * z / (alpha**2 + sigma**2)


def _white_term(x, key, num_points=8, points_per_chunk=None):
    path = paths.synchronous(x.shape[:-1], T_START, T_END, SCHEDULE)
    return elbo.diffusion_term(
        _white_denoiser,
        x,
        path,
        key,
        num_points=num_points,
        schedule=SCHEDULE,
        points_per_chunk=points_per_chunk,
    )


_white_jit = jax.jit(_white_term, static_argnames=("num_points", "points_per_chunk"))
WHITE_X = jax.random.normal(jax.random.key(0), (64, 2, 2, 1))


def test_jit_does_not_retrace_for_new_keys_or_data():
    traces = []

    @jax.jit
    def term(x, key):
        traces.append(None)
        return _white_term(x, key)

    x = WHITE_X[:4]
    first = term(x, jax.random.key(1))
    second = term(x, jax.random.key(2))
    term(x + 1.0, jax.random.key(3))
    assert len(traces) == 1
    assert not np.allclose(first, second)


def test_chunked_points_match_vectorised():
    key = jax.random.key(5)
    chunked = _white_jit(WHITE_X, key, points_per_chunk=3)
    np.testing.assert_allclose(chunked, _white_jit(WHITE_X, key), rtol=1e-5)


def test_runs_with_the_batch_sharded_over_devices():
    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    key = jax.random.key(3)
    sharded = _white_jit(jax.device_put(WHITE_X, sharding), key)
    np.testing.assert_allclose(sharded, _white_jit(WHITE_X, key), rtol=1e-5)
    # The batch mean matches the closed-form drop, sum over dimensions of 1/2 log(1 + SNR).
    snr = [((1 - t) / t) ** 2 for t in (T_START, T_END)]
    drop = 0.5 * 4 * (math.log1p(snr[0]) - math.log1p(snr[1]))
    values = np.asarray(sharded, np.float64)
    assert abs(values.mean() - drop) < 4 * values.std() / math.sqrt(len(values))


# ---- The other terms ----


@pytest.mark.parametrize(
    "schedule", [schedules.RectifiedFlow(), schedules.CosineVP(shift=2.0)], ids=repr
)
def test_prior_term_is_the_gaussian_kl(schedule):
    x = np.random.default_rng(0).uniform(-1, 1, (3, 2, 2, 3)).astype(np.float32)
    t_end = np.array([0.5, 0.9, 1 - 1e-5], np.float32)[:, None, None] * np.ones((3, 2, 2))
    alpha, sigma = (np.asarray(v, np.float64) for v in schedule.alpha_sigma(t_end[..., None]))
    mean, var = alpha * x, sigma**2
    expected = np.sum(0.5 * (mean**2 + var - 1 - np.log(var)), axis=(1, 2, 3))
    got = elbo.prior_term(x, t_end.astype(np.float32), schedule)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    # Scalar endpoint: the same as a constant map.
    np.testing.assert_allclose(
        elbo.prior_term(x, 0.9, schedule),
        elbo.prior_term(x, np.full((3, 2, 2), 0.9, np.float32), schedule),
        rtol=1e-6,
    )


def test_prior_term_matches_monte_carlo_kl():
    x = jnp.full((1, 2, 2, 1), 0.7)
    t = 0.4
    alpha, sigma = SCHEDULE.alpha_sigma(jnp.float32(t))
    z = alpha * x + sigma * jax.random.normal(jax.random.key(0), (200_000, 2, 2, 1))
    log_ratio = stats.norm.logpdf(z, alpha * x, sigma) - stats.norm.logpdf(z)
    mc = np.sum(np.asarray(log_ratio, np.float64), axis=(1, 2, 3))
    got = float(elbo.prior_term(x, t, SCHEDULE)[0])
    assert abs(mc.mean() - got) < 4 * mc.std() / math.sqrt(len(mc)) + 1e-6


_reconstruct = jax.jit(elbo.reconstruction_term, static_argnums=(0, 3))


def _grid_data(key, shape):
    return (2.0 * jax.random.randint(key, shape, 0, 256) / 255.0 - 1.0).astype(jnp.float32)


def test_reconstruction_term_is_the_discretized_gaussian():
    x = _grid_data(jax.random.key(0), (2, 3, 3, 3)).at[0, 0, 0].set(jnp.array([-1.0, 1.0, 0.0]))
    t_start = 0.01
    shift = 0.004

    def denoise(z, levels):
        return x + shift

    got = _reconstruct(denoise, x, t_start, SCHEDULE, jax.random.key(1))
    scale = t_start / (1 - t_start)
    xs = np.asarray(x, np.float64)
    upper = np.where(xs > 1 - 1e-3, np.inf, (xs + 1 / 255 - xs - shift) / scale)
    lower = np.where(xs < -1 + 1e-3, -np.inf, (xs - 1 / 255 - xs - shift) / scale)
    expected = -np.sum(np.log(stats.norm.cdf(upper) - stats.norm.cdf(lower)), axis=(1, 2, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_reconstruction_term_without_denoiser():
    x = _grid_data(jax.random.key(0), (4096, 1, 1, 1)).at[:, 0, 0, 0].set(2 * 100 / 255 - 1)
    # At t_start = 1e-5 the decoder's scale is far below the bin width: nothing is lost.
    tiny = _reconstruct(None, x, 1e-5, SCHEDULE, jax.random.key(1))
    np.testing.assert_allclose(tiny, 0.0, atol=1e-6)
    # At a moderate level: E_eps[-log(Phi(h / s - eps) - Phi(-h / s - eps))], an interior bin.
    t = 0.01
    ratio = (1 / 255) / (t / (1 - t))
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    far = np.abs(nodes)  # the integrand is even; the lower tail keeps the difference accurate
    integrand = -np.log(stats.norm.cdf(ratio - far) - stats.norm.cdf(-ratio - far))
    expected = np.sum(weights * integrand) / np.sqrt(2 * np.pi)
    got = np.asarray(_reconstruct(None, x, t, SCHEDULE, jax.random.key(2)))
    assert abs(got.mean() - expected) < 4 * got.std() / math.sqrt(len(got))


def test_reconstruction_term_rejects_unscaled_data():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        elbo.reconstruction_term(
            None, jnp.full((1, 2, 2, 1), 3.0), 1e-3, SCHEDULE, jax.random.key(0)
        )


def test_negative_elbo_is_the_sum_of_its_terms_and_bits_per_dim():
    x = _grid_data(jax.random.key(0), (3, 2, 2, 3))
    path = paths.random_ray(jax.random.key(1), (3, 2, 2))
    key = jax.random.key(2)
    terms, total = jax.jit(
        lambda x, key: (
            elbo.elbo_terms(_white_denoiser, x, path, key, num_points=2),
            elbo.negative_elbo(_white_denoiser, x, path, key, num_points=2),
        )
    )(x, key)
    np.testing.assert_allclose(total, sum(terms.values()), rtol=1e-6)
    assert all(np.all(np.asarray(v) >= 0) for v in terms.values())
    np.testing.assert_allclose(
        elbo.bits_per_dim(total, 12), np.asarray(total) / (12 * np.log(2)), rtol=1e-6
    )
    np.testing.assert_allclose(elbo.bits_per_dim(jnp.array([12 * math.log(2)]), 12), [1.0])
    with pytest.raises(ValueError, match="num_dims"):
        elbo.bits_per_dim(total, 0)


@pytest.mark.parametrize("prediction", ["x", "eps", "v"])
def test_x_pred_wrapper_recovers_the_denoiser(prediction):
    x = jax.random.normal(jax.random.key(0), (2, H, W, C))
    levels = jax.random.uniform(jax.random.key(1), (2, H, W), minval=0.05, maxval=0.95)
    z = corruption.corrupt(x, jax.random.normal(jax.random.key(2), x.shape), levels, SCHEDULE)

    def model(z, levels):
        x_hat = exact_denoiser(z, levels)
        return corruption.convert(x_hat, z, levels, SCHEDULE, "x", prediction)

    wrapped = elbo.x_pred_wrapper(model, SCHEDULE, prediction)
    np.testing.assert_allclose(
        jax.jit(wrapped)(z, levels), jax.jit(exact_denoiser)(z, levels), atol=2e-4
    )


# ---- Paths ----


@pytest.mark.parametrize(
    "schedule",
    [schedules.RectifiedFlow(), schedules.RectifiedFlow(shift=3.0), schedules.CosineVP(0.5)],
    ids=repr,
)
def test_level_from_log_snr_inverts_the_schedule(schedule):
    t = jnp.linspace(1e-4, 1 - 1e-4, 101)
    np.testing.assert_allclose(
        schedule.level_from_log_snr(schedule.log_snr(t)), t, rtol=2e-4, atol=1e-6
    )


@pytest.mark.parametrize("schedule", [schedules.RectifiedFlow(), schedules.CosineVP()], ids=repr)
def test_synchronous_path_is_linear_in_log_snr(schedule):
    path = paths.synchronous((2, 3, 3), T_START, T_END, schedule)
    u = jnp.linspace(0, 1, 11)
    log_snr = np.asarray(jax.vmap(lambda u: schedule.log_snr(path(u)))(u))
    assert log_snr.shape == (11, 2, 3, 3) and np.all(log_snr == log_snr[:, :1, :1, :1])
    ends = schedule.log_snr(jnp.array([T_START, T_END]))
    line = ends[0] + np.asarray(u) * (ends[1] - ends[0])
    np.testing.assert_allclose(log_snr[:, 0, 0, 0], line, rtol=1e-4, atol=1e-3)


def test_raster_path_noises_one_patch_at_a_time():
    path = paths.raster((1, 4, 4), 2, T_START, T_END, SCHEDULE, order=RASTER_ORDER)
    rank_of_patch = np.argsort(RASTER_ORDER)  # patches in raster order: top-left, top-right, ...
    for k in range(4):
        levels = np.asarray(path((k + 0.5) / 4))[0]
        patches = levels.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
        for patch, rank in enumerate(rank_of_patch):
            if rank < k:
                np.testing.assert_allclose(patches[patch], T_END, rtol=1e-5)
            elif rank > k:
                np.testing.assert_allclose(patches[patch], T_START, rtol=1e-5)
            else:
                assert np.all((patches[patch] > 2 * T_START) & (patches[patch] < 0.9 * T_END))


def test_random_ray_moves_along_rays_from_first_to_last_token():
    path = paths.random_ray(jax.random.key(0), (3, 4, 4), T_START, T_END)
    paths.check_path(path, (3, 4, 4))
    u = jnp.linspace(0, 1, 401)
    levels = np.asarray(jax.vmap(path)(u), np.float64)  # [401, 3, 4, 4]
    h = -np.log1p(-levels)
    inside = (h > -np.log1p(-T_START) * 1.01) & (h < -np.log1p(-T_END) * 0.99)
    for b in range(3):
        # While two tokens both move, their h keep a constant ratio (the ratio of their rates).
        both = inside[:, b, 0, 0] & inside[:, b, 1, 2]
        ratio = h[both, b, 0, 0] / h[both, b, 1, 2]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
        # All tokens start together and end together; one leaves t_start right after u = 0 and
        # another reaches t_end only at u = 1.
        np.testing.assert_allclose(levels[0, b], T_START, rtol=1e-5)
        np.testing.assert_allclose(levels[-1, b], T_END, rtol=1e-5)
        assert h[1, b].max() > 1.01 * h[0, b].max()
        assert h[-2, b].min() < 0.99 * h[-1, b].min()


def test_paths_take_one_point_per_example():
    u = jnp.array([0.1, 0.5, 0.9]).reshape(3, 1, 1)
    for path in (
        paths.synchronous((1, 4, 4), T_START, T_END, SCHEDULE),
        paths.random_ray(jax.random.key(0), (3, 4, 4), T_START, T_END),
        paths.raster((1, 4, 4), 2, T_START, T_END, SCHEDULE, order=RASTER_ORDER),
    ):
        paths.check_path(path, (3, 4, 4))
        levels = np.asarray(path(u))
        assert levels.shape == (3, 4, 4)
        for b in range(3):
            row = np.broadcast_to(np.asarray(path(float(u[b, 0, 0]))), (3, 4, 4))[b]
            np.testing.assert_array_equal(levels[b], row)
    with pytest.raises(ValueError, match=r"one per example"):
        paths.synchronous((2, 4, 4))(jnp.zeros((2, 4)))


# ---- Bad input ----


def test_bad_paths_raise():
    x = jnp.zeros((2, 4, 4, 1))
    good = paths.synchronous((2, 4, 4))
    key = jax.random.key(0)
    cases = {
        "non-decreasing": lambda u: good(1.0 - u),
        r"\[0, 1\]": lambda u: 1.5 * good(u),
        "shape": lambda u: good(u)[..., :2],
        "elementwise in u": lambda u: good(jnp.max(u)),  # ignores per-example points
    }
    for message, path in cases.items():
        with pytest.raises(ValueError, match=message):
            paths.check_path(path, (2, 4, 4))
        with pytest.raises(ValueError, match=message):
            elbo.diffusion_term(_white_denoiser, x, path, key)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="t_start"):
        paths.synchronous((1, 4, 4), 0.5, 0.1)
    with pytest.raises(ValueError, match="t_start"):
        paths.random_ray(jax.random.key(0), (1, 4, 4), 0.0, 0.9)
    with pytest.raises(ValueError, match="grid"):
        paths.raster((1, 4, 4), 3)
    with pytest.raises(ValueError, match="permutation"):
        paths.raster((1, 4, 4), 2, order=(0, 1, 1, 2))
    with pytest.raises(ValueError, match="num_points"):
        _white_term(jnp.zeros((1, 2, 2, 1)), jax.random.key(0), num_points=0)
    with pytest.raises(ValueError, match="token axis"):
        elbo.prior_term(jnp.zeros((2, 3)), 0.9, SCHEDULE)
