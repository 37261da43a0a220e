"""Schedule identities, prediction conversions and the weighted loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apd import corruption, losses, schedules

ALL = [
    schedules.RectifiedFlow(),
    schedules.RectifiedFlow(shift=2.0),
    schedules.CosineVP(),
    schedules.CosineVP(shift=0.5),
]
T = jnp.linspace(0.01, 0.99, 99, dtype=jnp.float32)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_endpoints_and_monotone_log_snr(schedule):
    alpha, sigma = schedule.alpha_sigma(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(alpha, [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(sigma, [0.0, 1.0], atol=1e-7)
    log_snr = np.asarray(schedule.log_snr(T))
    assert np.all(np.diff(log_snr) < 0)
    assert np.all(np.asarray(schedule.d_log_snr(T)) < 0)


@pytest.mark.parametrize("schedule", [schedules.CosineVP(), schedules.CosineVP(shift=3.0)])
def test_variance_preserving(schedule):
    alpha, sigma = schedule.alpha_sigma(T)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)


def test_rectified_flow_closed_forms():
    rf = schedules.RectifiedFlow()
    alpha, sigma = rf.alpha_sigma(T)
    np.testing.assert_allclose(alpha, 1 - T, rtol=1e-6)
    np.testing.assert_allclose(sigma, T, rtol=1e-6)
    np.testing.assert_allclose(rf.log_snr(T), 2 * np.log((1 - T) / T), rtol=1e-5, atol=1e-5)
    # The shift is SD3's time warp t' = s t / (1 + (s - 1) t), i.e. logSNR - 2 log s.
    s = 3.0
    shifted = schedules.RectifiedFlow(shift=s)
    np.testing.assert_allclose(shifted.sigma(T), s * T / (1 + (s - 1) * T), rtol=1e-6)
    np.testing.assert_allclose(
        shifted.log_snr(T), rf.log_snr(T) - 2 * np.log(s), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_d_log_snr_matches_finite_differences(schedule):
    t = jnp.linspace(0.05, 0.95, 19, dtype=jnp.float64 if jax.config.x64_enabled else jnp.float32)
    h = 1e-3
    fd = (schedule.log_snr(t + h) - schedule.log_snr(t - h)) / (2 * h)
    np.testing.assert_allclose(schedule.d_log_snr(t), fd, rtol=2e-3)


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_shape_generic(schedule):
    levels = jax.random.uniform(jax.random.key(0), (2, 5, 7))
    assert schedule.alpha(levels).shape == (2, 5, 7)
    assert schedule.d_log_snr(levels).shape == (2, 5, 7)


def test_shift_for_resolution_and_errors():
    assert schedules.shift_for_resolution(128, 64) == 2.0
    with pytest.raises(ValueError, match="positive"):
        schedules.shift_for_resolution(0)
    with pytest.raises(ValueError, match="-1"):
        schedules.RectifiedFlow(shift=-1.0)
    with pytest.raises(ValueError, match="'linear'"):
        schedules.get("linear")


def _data(shape=(3, 4, 5, 2)):
    kx, ke, kt = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, shape)
    eps = jax.random.normal(ke, shape)
    levels = jax.random.uniform(kt, shape[:-1], minval=0.05, maxval=0.95)
    return x, eps, levels


@pytest.mark.parametrize("schedule", ALL, ids=repr)
@pytest.mark.parametrize("source", corruption.PREDICTIONS)
def test_prediction_conversions_round_trip(schedule, source):
    x, eps, levels = _data()
    z = corruption.corrupt(x, eps, levels, schedule)
    pred = corruption.target(x, eps, source)
    for dest in corruption.PREDICTIONS:
        out = corruption.convert(pred, z, levels, schedule, source, dest)
        np.testing.assert_allclose(out, corruption.target(x, eps, dest), rtol=1e-4, atol=1e-4)
        back = corruption.convert(out, z, levels, schedule, dest, source)
        np.testing.assert_allclose(back, pred, rtol=1e-4, atol=1e-4)


def test_corrupt_per_token_and_broadcast():
    x, eps, levels = _data()
    rf = schedules.RectifiedFlow()
    z = corruption.corrupt(x, eps, levels, rf)
    np.testing.assert_allclose(
        z, (1 - levels[..., None]) * x + levels[..., None] * eps, rtol=1e-6, atol=1e-6
    )
    # A per-sample level [B, 1, 1] equals the constant map.
    per_sample = levels[:, :1, :1]
    np.testing.assert_array_equal(
        corruption.corrupt(x, eps, per_sample, rf),
        corruption.corrupt(x, eps, jnp.broadcast_to(per_sample, levels.shape), rf),
    )
    # Clean tokens are exactly the data.
    clean = levels.at[:, 0].set(0.0)
    np.testing.assert_array_equal(corruption.corrupt(x, eps, clean, rf)[:, 0], x[:, 0])


def test_bad_levels_and_shapes_raise():
    x, eps, levels = _data()
    rf = schedules.RectifiedFlow()
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        corruption.corrupt(x, eps, levels.at[0, 0, 0].set(1.5), rf)
    with pytest.raises(ValueError, match="nan"):
        corruption.corrupt(x, eps, levels.at[0, 0, 0].set(jnp.nan), rf)
    with pytest.raises(ValueError, match=r"one level per token.*\(3, 4, 5\)"):
        corruption.corrupt(x, eps, levels[..., None], rf)
    with pytest.raises(ValueError, match="'score'"):
        corruption.target(x, eps, "score")


@pytest.mark.parametrize("schedule", ALL, ids=repr)
@pytest.mark.parametrize("weighting", ["sid2", "elbo", "min_snr"])
def test_weightings_agree_across_prediction_types(schedule, weighting):
    """The same weighting is the same objective whatever the network predicts.

    ('uniform' is by definition plain MSE in each prediction's own space.)
    """
    x, eps, levels = _data()
    z = corruption.corrupt(x, eps, levels, schedule)
    # A wrong eps prediction, expressed in each parameterisation.
    eps_hat = eps + 0.3 * jax.random.normal(jax.random.key(7), eps.shape)
    x_hat = (z - schedule.sigma(levels)[..., None] * eps_hat) / schedule.alpha(levels)[..., None]
    values = []
    for prediction in corruption.PREDICTIONS:
        pred = corruption.target(x_hat, eps_hat, prediction)
        values.append(
            losses.weighted_loss(
                pred, x, eps, levels, schedule, prediction=prediction, weighting=weighting
            )[0]
        )
    np.testing.assert_allclose(values[0], values[1], rtol=2e-3)
    np.testing.assert_allclose(values[0], values[2], rtol=2e-3)


def test_elbo_weighting_closed_form_rectified_flow():
    """'elbo' on a v-prediction under rectified flow is (1 - t) / t per token."""
    t = jnp.linspace(0.05, 0.95, 10)[None, :, None]
    w = losses.token_weights(t, schedules.RectifiedFlow(), prediction="v", weighting="elbo")
    np.testing.assert_allclose(w, (1 - t) / t, rtol=1e-4)
    w_sid2 = losses.token_weights(
        t, schedules.RectifiedFlow(), prediction="v", weighting="sid2", sid2_bias=-1.0
    )
    log_snr = 2 * jnp.log((1 - t) / t)
    np.testing.assert_allclose(w_sid2, (1 - t) / t * jax.nn.sigmoid(-1.0 - log_snr), rtol=1e-4)


def test_context_tokens_carry_no_loss_and_ends_are_finite():
    x, eps, levels = _data()
    levels = levels.at[:, :2].set(0.0).at[:, 3].set(1.0)
    rf = schedules.RectifiedFlow()
    pred = jnp.zeros_like(x)
    for prediction in corruption.PREDICTIONS:
        for weighting in losses.WEIGHTINGS:
            per_example, per_token = losses.weighted_loss(
                pred, x, eps, levels, rf, prediction=prediction, weighting=weighting
            )
            assert np.all(np.isfinite(per_token))
            np.testing.assert_array_equal(per_token[:, :2], 0.0)
            assert np.all(per_example > 0)
    grad = jax.grad(lambda p: losses.weighted_loss(p, x, eps, levels, rf)[0].sum())(pred)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[:, :2], 0.0)


def test_bucket_by_level():
    levels = jnp.array([[0.0, 0.05, 0.15, 0.95, 1.0]])
    values = jnp.array([[9.0, 1.0, 2.0, 3.0, 4.0]])
    sums, counts = losses.bucket_by_level(values, levels, 10)
    np.testing.assert_allclose(counts, [1, 1, 0, 0, 0, 0, 0, 0, 0, 2])
    np.testing.assert_allclose(sums, [1, 2, 0, 0, 0, 0, 0, 0, 0, 7])


def test_loss_jits_without_retrace_and_runs_sharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    traces = []

    @jax.jit
    def loss_fn(pred, x, eps, levels):
        traces.append(1)
        return losses.weighted_loss(pred, x, eps, levels, schedules.RectifiedFlow())[0]

    for seed in range(3):
        x, eps, levels = _data((8, 4, 4, 3))
        x, eps, levels = (jax.device_put(a, sharding) for a in (x, eps, levels))
        pred = x * 0.5 + seed
        out = loss_fn(pred, x, eps, levels)
        assert out.shape == (8,)
        assert out.sharding.is_equivalent_to(sharding, 1)
    assert len(traces) == 1
