"""Uncertainty-guided adaptive sampling: the step-count rule (`apd.plans.adaptive_counts`,
`adaptive_advance`), the continuously batched pool with re-estimation (`run_sampler.AdaptivePool`),
and the uncertainty head's training, evaluation and calibration (`apd.train_uncertainty`).

The pool runs here on toy models whose error is known in closed form: data with independent
Gaussian pixels, x_p ~ N(0, v_p), and its exact x-prediction E[x | z_t] = alpha v / (alpha^2 v +
sigma^2) z, whose squared error has mean v sigma^2 / (alpha^2 v + sigma^2) per pixel.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax
import pytest

from apd import levels, models, plans, run_sampler, runs, train_uncertainty
from apd.schedules import RectifiedFlow

GRID = (8, 8)
SHAPE = (*GRID, 1)
SCHEDULE = RectifiedFlow()
LOW, HIGH = -6.0, 0.0  # the toy heads' difficulty range (log errors)


def gaussian_x_hat(z, levels, variance):
    """The exact x-prediction for x ~ N(0, diag(variance)) at per-pixel levels [B, H, W]."""
    alpha, sigma = SCHEDULE.alpha_sigma(jnp.broadcast_to(levels, z.shape[:-1])[..., None])
    return alpha * variance / (jnp.square(alpha) * variance + jnp.square(sigma)) * z


VARIANCE = jnp.full((1, *SHAPE), 0.3, jnp.float32)


def label_predict(params, z, levels, labels):
    """Backbone: the exact denoiser; its 'features' are the label of each row, per pixel."""
    features = jnp.broadcast_to(labels[:, None, None].astype(jnp.float32), z.shape[:-1])
    return gaussian_x_hat(z, levels, VARIANCE), features


def label_log_error(params, features, levels):
    """Head: label 1 hard (above the range: difficulty 1), label 0 easy (below: difficulty 0)."""
    return jnp.where(features > 0.5, HIGH + 1.0, LOW - 1.0)


# The rule of the label-driven tests (one compiled step per pool size).
RULE = run_sampler.AdaptiveRule((3, 9), LOW, HIGH, reestimate_every=2)


@functools.cache
def pool(predict, log_error, batch, num_classes=2):
    """One pool per setting for the whole module (each compiles its step once)."""
    return run_sampler.AdaptivePool(
        predict,
        log_error,
        batch=batch,
        image_shape=SHAPE,
        schedule=SCHEDULE,
        prediction="x",
        num_classes=num_classes,
    )


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------


def test_counts_and_advance():
    difficulty = jnp.array([[[0.0, 0.5], [1.0, 1.0]]])
    remaining = jnp.array([[[1.0, 1.0], [0.5, 0.0]]])
    counts = plans.adaptive_counts(difficulty, remaining, (4, 12))
    # n(d) = 4 + 8 d, times the way left; a done token (remaining 0) has no steps left.
    np.testing.assert_array_equal(counts, [[[4, 8], [6, 0]]])
    assert plans.adaptive_counts(jnp.zeros((1, 1)), jnp.full((1, 1), 0.01), (4, 12)) == 1

    level, left = plans.adaptive_advance(remaining, counts, "start")
    np.testing.assert_allclose(level, [[[0.75, 0.875], [0.5 * 5 / 6, 0.0]]], rtol=1e-6)
    np.testing.assert_array_equal(left, [[[3, 7], [5, 0]]])
    # 'end': only the tokens at the image's largest count move; the others wait.
    level, left = plans.adaptive_advance(remaining, counts, "end")
    np.testing.assert_allclose(level, [[[1.0, 0.875], [0.5, 0.0]]], rtol=1e-6)
    np.testing.assert_array_equal(left, [[[4, 7], [6, 0]]])
    # A count of 1 lands exactly on level 0.
    level, left = plans.adaptive_advance(jnp.full((1, 1), 0.3), jnp.ones((1, 1), jnp.int32))
    assert float(level[0, 0]) == 0.0 and int(left[0, 0]) == 0


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------


def test_easy_images_take_fewer_calls_and_the_pool_counts_them():
    """Hard images (label 1) take n_max calls, easy ones n_min, and a done image's slot takes
    the next image, so the whole run costs far fewer forward passes than fixed chunks."""
    labels = np.array([1, 0, 0, 1, 0, 1, 0], np.int32)
    out = pool(label_predict, label_log_error, batch=3).run((), 7, RULE, labels=labels, seed=1)

    calls = out.extras["network_calls"]
    np.testing.assert_array_equal(calls, np.where(labels == 1, 9, 3))
    assert calls.mean() < 9  # n_max, what every image cost before
    # Every pixel of an image moves in each of its steps here (one difficulty per image).
    steps = out.extras["steps_per_pixel"]
    np.testing.assert_array_equal(steps, np.broadcast_to(calls[:, None, None], steps.shape))
    # Slots (3): images 0, 1, 2 start; 1 and 2 finish after 3 steps and give their slots to 3
    # and 4; 4 finishes at 6 (-> 5), 0 at 9 (-> 6); 3 at 12, 6 at 12, 5 at 15.
    (cost,) = out.costs
    assert out.network_calls == cost.network_calls == 15
    assert cost.batch_per_call == 3
    forward_passes = 15 * 3
    idle = forward_passes - calls.sum()  # slots left empty at the end of the run
    assert calls.sum() == 39 and idle == 6
    assert forward_passes < 3 * 9 * 3  # fixed chunks of 3: ceil(7 / 3) chunks x 9 steps x 3
    assert np.isfinite(out.images).all() and out.images.shape == (7, *SHAPE)


def test_images_do_not_depend_on_the_batch():
    """Image j draws from its own key: the same seed gives the same images with any pool size."""
    labels = np.array([1, 0, 1, 0, 0], np.int32)
    a = pool(label_predict, label_log_error, batch=2).run((), 5, RULE, labels=labels, seed=3)
    b = pool(label_predict, label_log_error, batch=3).run((), 5, RULE, labels=labels, seed=3)
    np.testing.assert_allclose(a.images, b.images, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.extras["network_calls"], b.extras["network_calls"])
    c = pool(label_predict, label_log_error, batch=2).run((), 5, RULE, labels=labels, seed=4)
    assert not np.allclose(a.images, c.images)


def state_predict(params, z, levels, labels):
    """Backbone: the exact denoiser of nearly constant data (variance 1e-4); its features are
    the state z itself."""
    return gaussian_x_hat(z, levels, 1e-4), z


def state_log_error(params, features, levels):
    """Head that reads the state: log of the image's mean z^2 (about log sigma_t^2 as noise
    gives way to the data), the same for every pixel of an image."""
    mean_square = jnp.mean(jnp.square(features), axis=(1, 2, 3), keepdims=True)[..., 0]
    return jnp.broadcast_to(jnp.log(mean_square), features.shape[:-1])


def test_reestimation_changes_the_remaining_counts():
    """At the start z is noise (mean z^2 ~ 1: log 0 = HIGH, difficulty 1, n_max steps); as the
    noise gives way (mean z^2 ~ sigma_t^2) the predicted error falls, so re-estimated counts end
    the images sooner."""
    num, budget = 4, (4, 40)
    once = run_sampler.AdaptiveRule(budget, LOW, HIGH, reestimate_every=0)
    again = run_sampler.AdaptiveRule(budget, LOW, HIGH, reestimate_every=5)
    sampler = pool(state_predict, state_log_error, batch=2, num_classes=0)
    fixed = sampler.run((), num, once, seed=0)
    updated = sampler.run((), num, again, seed=0)

    fixed_calls, updated_calls = fixed.extras["network_calls"], updated.extras["network_calls"]
    # Estimated once, on noise: difficulty about 1 everywhere, so about n_max steps.
    assert (fixed_calls >= 36).all()
    assert (updated_calls < fixed_calls - 5).all()
    assert updated.network_calls < fixed.network_calls
    # The first estimate is the same in both (the same noise and state at step 0).
    np.testing.assert_allclose(updated.extras["log_error"], fixed.extras["log_error"], rtol=1e-6)


def turning_log_error(params, features, levels):
    """Head: the left half of an image is hard; the right half is easy until some pixel of the
    image is below level 0.6, then hard too."""
    left = (jnp.arange(GRID[1]) < GRID[1] // 2)[None, None, :]
    cleared = jnp.min(levels, axis=(1, 2), keepdims=True) < 0.6
    return jnp.where(jnp.broadcast_to(left | cleared, levels.shape), HIGH + 1.0, LOW - 1.0)


def test_no_image_takes_more_than_n_max_calls():
    """align='end': the easy right half waits at level 1 while the left half moves (10 steps
    planned). Re-estimated at step 5 (the left half at 0.5), the right half turns hard, and a
    full count of 10 from level 1 would end the image at step 15; capped at n_max minus the 5
    steps taken, the image takes 10 calls, its right half 5 steps."""
    rule = run_sampler.AdaptiveRule((2, 10), LOW, HIGH, reestimate_every=5, align="end")
    out = pool(label_predict, turning_log_error, batch=2).run(
        (), 2, rule, labels=np.zeros(2, np.int32)
    )
    np.testing.assert_array_equal(out.extras["network_calls"], [10, 10])
    steps = out.extras["steps_per_pixel"]
    assert (steps[:, :, : GRID[1] // 2] == 10).all() and (steps[:, :, GRID[1] // 2 :] == 5).all()


def test_inpainting_keeps_known_pixels_exact():
    rng = np.random.default_rng(0)
    num = 5
    images = rng.uniform(-1.0, 1.0, (num, *SHAPE)).astype(np.float32)
    known = rng.uniform(size=(num, *GRID)) < 0.5
    known[3] = True  # nothing to generate: done without a network call
    labels = np.array([1, 0, 1, 0, 1], np.int32)
    out = pool(label_predict, label_log_error, batch=2).run(
        (), num, RULE, images=images, known=known, labels=labels, seed=0
    )
    np.testing.assert_array_equal(out.images[known], images[known])  # bit for bit
    steps = out.extras["steps_per_pixel"]
    assert (steps[known] == 0).all() and (steps[~known] >= 3).all()
    calls = out.extras["network_calls"]
    np.testing.assert_array_equal(calls, [9, 3, 9, 0, 9])
    assert np.isnan(out.extras["log_error"][3]).all()
    assert not np.allclose(out.images[~known], images[~known])


def test_bad_rules_and_inputs():
    with pytest.raises(ValueError, match="n_max"):
        run_sampler.AdaptiveRule((5, 4), LOW, HIGH)
    with pytest.raises(ValueError, match="reestimate_every must be an int >= 0"):
        run_sampler.AdaptiveRule((2, 4), LOW, HIGH, reestimate_every=-1)
    with pytest.raises(ValueError, match="finite low < high"):
        run_sampler.AdaptiveRule((2, 4), 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown adaptive align"):
        run_sampler.AdaptiveRule((2, 4), LOW, HIGH, align="middle")
    rule = run_sampler.AdaptiveRule((2, 4), LOW, HIGH)
    sampler = pool(label_predict, label_log_error, batch=2)
    with pytest.raises(ValueError, match="images and known masks together"):
        sampler.run((), 2, rule, images=np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(ValueError, match=r"images \[3, 8, 8, 1\]"):
        sampler.run((), 3, rule, images=np.zeros((2, *SHAPE)), known=np.zeros((2, *GRID)))


def test_calibrated_range_is_the_default():
    head = runs.UncertaintyHead(None, None, {"calibration": {"low": -5.0, "high": -1.0}})
    assert run_sampler.difficulty_range(head) == (-5.0, -1.0)
    assert run_sampler.difficulty_range(head, -3.0, 2.0) == (-3.0, 2.0)
    with pytest.raises(ValueError, match="go together"):
        run_sampler.difficulty_range(head, -3.0)
    with pytest.raises(ValueError, match=r"no calibration.*apd\.train_uncertainty"):
        run_sampler.difficulty_range(runs.UncertaintyHead(None, None, {}))


# ---------------------------------------------------------------------------------------------
# The head learns the backbone's error
# ---------------------------------------------------------------------------------------------

# Per-pixel prior variances spanning three decades: a level-only predictor cannot tell pixels
# apart, the head must read the features.
PIXEL_VARIANCE = np.exp(np.linspace(np.log(1e-3), np.log(1.0), GRID[0] * GRID[1])).reshape(GRID)


class GaussianBackbone(nn.Module):
    """The exact denoiser of x ~ N(0, diag(PIXEL_VARIANCE)) with the backbone signature; its
    features are what a trained network would know about a pixel: its log prior variance, and
    the prediction."""

    @nn.compact
    def __call__(self, z, levels, labels, train=False, return_features=False):
        variance = jnp.asarray(PIXEL_VARIANCE, jnp.float32)[None, :, :, None]
        x_hat = gaussian_x_hat(z, levels, variance)
        log_variance = jnp.broadcast_to(jnp.log(variance), z.shape)
        features = jnp.concatenate([log_variance, x_hat], axis=-1)
        return (x_hat, features) if return_features else x_hat


def gaussian_batches(seed, count, batch):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        x = rng.normal(size=(batch, *SHAPE)) * np.sqrt(PIXEL_VARIANCE)[None, :, :, None]
        yield {
            "image": x.astype(np.float32),
            "label": np.zeros(batch, np.int32),
            "mask": np.ones(batch, bool),
        }


def test_head_predicts_the_backbone_error():
    """A small head trained 150 steps predicts the exact denoiser's per-pixel log error.

    The actual log error of one draw is log(v_post * chi^2_1) (+ 1e-6 inside the log): its
    log chi^2_1 part (variance pi^2 / 2, about 4.9) is unpredictable, so even the oracle, log
    v_post itself, correlates with it only partly. The test measures that oracle on the same
    held-out draws (Spearman about 0.71) and asks the head for at least the oracle minus 0.05,
    which it clears with margin (0.69, 0.014 below the oracle, when written); and for 0.05 more
    than the best predictor from the level alone (measured here from the same draws: about
    0.26), i.e. the head uses what the features say about each pixel.
    """
    run = runs.Run(
        config=mc.ConfigDict(),
        model=GaussianBackbone(),
        params={},
        schedule=SCHEDULE,
        prediction="x",
        num_classes=0,
        step=0,
        image_shape=SHAPE,
        description={},
        directory="",
    )
    head = models.UncertaintyHead(hidden=32, depth=1, norm_groups=8)
    sampler_params = levels.resolve_params("independent", GRID)
    loss_fn = train_uncertainty.make_loss_fn(run, head, "independent", sampler_params)
    key = jax.random.key(0)
    features = jnp.zeros((1, *GRID, 2), jnp.float32)
    head_params = jax.jit(head.init)(key, features, jnp.ones((1, *GRID)))["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(head_params)
    step = train_uncertainty.make_train_step(loss_fn, tx)
    for i, batch in enumerate(gaussian_batches(1, 150, 32)):
        head_params, opt_state, _ = step(head_params, opt_state, {}, batch, jax.random.key(i))

    eval_key = jax.random.key(7)
    evaluation, calibration = train_uncertainty.evaluate(
        loss_fn, head_params, {}, gaussian_batches(2, 8, 32), eval_key
    )
    # The same held-out draws again, for the oracle and the level-only predictor.
    targets, level_maps = [], []
    draws = jax.jit(lambda batch, key: loss_fn(head_params, {}, batch, key)[1][1:])
    for i, batch in enumerate(gaussian_batches(2, 8, 32)):
        target, level_map = draws(batch, jax.random.fold_in(eval_key, i))
        targets.append(target)
        level_maps.append(level_map)
    target, level_map = np.concatenate(targets).ravel(), np.concatenate(level_maps).ravel()
    alpha, sigma = (np.asarray(a) for a in SCHEDULE.alpha_sigma(jnp.asarray(level_map)))
    variance = np.broadcast_to(PIXEL_VARIANCE, (len(targets) * 32, *GRID)).ravel()
    oracle = np.log(variance * sigma**2 / (alpha**2 * variance + sigma**2) + 1e-6)
    rank = train_uncertainty._ranks
    oracle_spearman = train_uncertainty._pearson(rank(oracle), rank(target))
    # The best level-only predictor: the mean target in each of 50 level bins.
    bins = np.minimum((level_map * 50).astype(int), 49)
    bin_mean = np.bincount(bins, target, 50) / np.maximum(np.bincount(bins, minlength=50), 1)
    level_only = train_uncertainty._pearson(rank(bin_mean[bins]), rank(target))

    assert oracle_spearman > 0.6, oracle_spearman
    assert evaluation["spearman"] > oracle_spearman - 0.05, (evaluation, oracle_spearman)
    assert evaluation["spearman"] > level_only + 0.05, (evaluation, level_only)
    assert evaluation["pearson"] > 0.5 and evaluation["r2"] > 0.2, evaluation
    assert evaluation["examples"] == 8 * 32
    # The calibration spans the held-out predictions: 90% of them lie inside it.
    assert calibration["low"] < calibration["high"]
    assert calibration["pixels"] == 8 * 32 * GRID[0] * GRID[1]
    assert len(calibration["by_level"]) == train_uncertainty.LEVEL_BUCKETS
    assert sum(b["pixels"] for b in calibration["by_level"]) == calibration["pixels"]


def test_adaptive_calls_combine_pairs_each_run_s_rows_by_role(tmp_path, capsys):
    """benchmarks/adaptive_calls.py --combine: per run, the equal-calls row is the one at the
    adaptive mean calls rounded (it differs between runs), and the difference is paired."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import adaptive_calls

    paths = []
    for i, (calls, fid_a, fid_s) in enumerate([(91.6, 13.0, 14.0), (90.4, 12.0, 15.0)]):
        matched = round(calls)
        rows = [
            {"sampler": "adaptive", "calls_per_image": calls, "fid_fmnist": fid_a, "kid": 0.01},
            {
                "sampler": f"synchronous_{matched}",
                "calls_per_image": matched,
                "fid_fmnist": fid_s,
                "kid": 0.02,
            },
            {
                "sampler": "synchronous_100",
                "calls_per_image": 100.0,
                "fid_fmnist": 99.0,
                "kid": 0.5,
            },
        ]
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"rows": rows, "settings": {"budget": [40, 100]}}))
        paths.append(str(path))
    adaptive_calls.combine(paths)
    out = capsys.readouterr().out
    assert "| synchronous at equal calls | 91.0 ± 12.7 | 14.50 ± 6.35 |" in out
    assert "| synchronous at n_max | 100.0 ± 0.0 | 99.00 ± 0.00 |" in out
    assert "| adaptive - synchronous at equal calls | - | -2.00 ± 12.71 |" in out
