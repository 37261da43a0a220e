"""Level samplers: tbar and spread statistics (method.md §5), structure, jit, sharding, CLI."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from apd import levels
from apd.levels import __main__ as cli
from apd.levels import perlin, samplers, stats

N = 20_000  # draws wherever a statistic is checked
KEY = jax.random.key(0)


def draw(name: str, grid, batch_size: int = N, **params) -> np.ndarray:
    return np.asarray(levels.sample(name, KEY, batch_size, grid, **params))


@functools.cache
def tbar_spread(name: str, grid, batch_size: int = N, **params) -> tuple[np.ndarray, np.ndarray]:
    """Image means and spreads of a draw, [B] each (cached: several tests share a draw)."""
    x = levels.sample(name, KEY, batch_size, grid, **params)
    return np.asarray(stats.image_mean(x)), np.asarray(stats.spread(x))


def decile_fractions(tbar: np.ndarray) -> np.ndarray:
    return np.histogram(tbar, bins=10, range=(0.0, 1.0))[0] / tbar.size


# ---------------------------------------------------------------------------------------------
# tbar and spread, sampler by sampler
# ---------------------------------------------------------------------------------------------


def test_synchronous_mean_uniform_and_zero_spread():
    tbar, spread = tbar_spread("synchronous", 16)
    assert scipy.stats.kstest(tbar, "uniform").pvalue > 0.01
    assert stats.ks_uniform(tbar) < 0.015
    assert np.all(spread == 0.0)


def test_asyncpatch_mean_close_to_uniform_independent_far():
    tbar, _ = tbar_spread("asyncpatch", 32)
    assert stats.ks_uniform(tbar) < 0.05
    np.testing.assert_allclose(decile_fractions(tbar), 0.1, rtol=0.3)
    tbar_independent, _ = tbar_spread("independent", 16)
    assert stats.ks_uniform(tbar_independent) > 0.3


def test_independent_mean_concentrates_with_clt_spread():
    grid = 16
    tbar, _ = tbar_spread("independent", grid)
    assert abs(tbar.mean() - 0.5) < 0.002
    np.testing.assert_allclose(tbar.std(), 1.0 / math.sqrt(12 * grid * grid), rtol=0.03)


@pytest.mark.parametrize("patches", [4, 8])
def test_patchwise_mean_std_and_patch_values(patches):
    x = draw("patchwise", 32, patch_sizes=(patches,))
    tbar = np.asarray(stats.image_mean(x))
    np.testing.assert_allclose(tbar.std(), 1.0 / math.sqrt(12 * patches**2), rtol=0.03)
    width = 32 // patches
    blocks = x.reshape(N, patches, width, patches, width)
    assert np.all(blocks == blocks[:, :, :1, :, :1])  # constant on each patch
    patch_levels = blocks[:1000, :, 0, :, 0].ravel()  # each patch level ~ U(0, 1)
    assert scipy.stats.kstest(patch_levels, "uniform").pvalue > 0.01


def _patch_scale(level_maps: np.ndarray, sizes) -> np.ndarray:
    """[B, n, n] -> [B]: the smallest K in `sizes` whose K x K patches are each constant."""
    n = level_maps.shape[1]
    out = np.zeros(level_maps.shape[0], np.int64)
    for k in sorted(sizes, reverse=True):  # the last (smallest) K that fits wins
        w = n // k
        blocks = level_maps.reshape(-1, k, w, k, w)
        out[np.all(blocks == blocks[:, :, :1, :, :1], axis=(1, 2, 3, 4))] = k
    return out


def test_patchwise_draws_k_per_image():
    """Default: K uniform over asyncpatch's grids (powers of two up to the grid), per image."""
    params = levels.resolve_params("patchwise", 16)
    assert params["patch_sizes"] == levels.resolve_params("asyncpatch", 16)["patch_sizes"]
    assert params == {"patch_sizes": (1, 2, 4, 8, 16), "patch_probs": (0.2,) * 5}
    x = draw("patchwise", 16)
    k = _patch_scale(x, params["patch_sizes"])
    counts = np.array([np.sum(k == size) for size in params["patch_sizes"]])
    assert counts.sum() == N  # every map is constant on the patches of one of the grids
    assert scipy.stats.chisquare(counts).pvalue > 0.001, counts
    # Given K, tbar is the mean of K^2 uniforms: std 1 / sqrt(12 K^2).
    tbar = np.asarray(stats.image_mean(x))
    for size in (1, 2, 4):
        np.testing.assert_allclose(tbar[k == size].std(), 1 / math.sqrt(12 * size**2), rtol=0.05)
    # Every patch level ~ U(0, 1), whatever K.
    assert scipy.stats.kstest(x[:2000, 0, 0], "uniform").pvalue > 0.01
    # Other grids and probabilities.
    x = draw("patchwise", 16, patch_sizes=(2, 8), patch_probs=(0.25, 0.75))
    k = _patch_scale(x, (2, 8))
    assert np.mean(k == 2) == pytest.approx(0.25, abs=0.015)
    assert np.mean(k == 8) == pytest.approx(0.75, abs=0.015)


def test_patchwise_single_k_draws_the_fixed_grid():
    """patch_sizes=(K,) draws no K: the patch levels are uniform(key, [B, K^2]) row-major, so
    runs trained with a fixed K = 4 reproduce bit for bit."""
    x = draw("patchwise", 28, 64, patch_sizes=(4,))
    table = np.asarray(jax.random.uniform(KEY, (64, 16), jnp.float32)).reshape(64, 4, 4)
    patch = np.arange(28) * 4 // 28
    np.testing.assert_array_equal(x, table[:, patch][:, :, patch])


def test_perlin_mean_u_shaped():
    # mean = b (1 - f) + t f with mask coverage f: the more f varies between images, the more
    # mass sits near 0 and 1. Coarse noise (2 cells per axis) varies f widely; at the default
    # 4 cells f stays near 1/2 and the U is shallow (end deciles ~0.10 vs middle ~0.095).
    fractions = decile_fractions(tbar_spread("perlin", 32, scale=2)[0])
    ends, middle = fractions[[0, 9]].sum(), fractions[[4, 5]].sum()
    assert ends > 1.15 * middle, fractions


def test_perlin_map_structure():
    """Tokens off the mask are all clean or all noise (b); those on it share one level t."""
    x = draw("perlin", 32)
    for level_map in x[:500]:
        background = level_map[(level_map == 0.0) | (level_map == 1.0)]
        assert np.unique(background).size <= 1
        assert np.unique(level_map[(level_map > 0.0) & (level_map < 1.0)]).size <= 1
    summary = stats.summary(x)
    # P(b = 0) * P(off the mask) = 1/2 * 1/2, by the symmetry of the noise about threshold 0.
    assert summary["clean_token_fraction"] == pytest.approx(0.25, abs=0.01)
    assert summary["noise_token_fraction"] == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("grid,cells", [((12, 20), 3), ((16,), 5), ((4, 6, 8), 2)])
def test_perlin_noise_matches_corner_sum(grid, cells):
    """The separable form equals Perlin's sum over cell corners of fade weights x <g, f - e>."""
    key = jax.random.key(7)
    d = len(grid)
    got = np.asarray(perlin.gradient_noise(key, 2, grid, cells))
    g = np.asarray(jax.random.normal(key, (2, *(cells + 1,) * d, d)), np.float64)
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    want = np.zeros((2, *grid))
    for index in np.ndindex(*grid):
        p = (np.asarray(index) + 0.5) * cells / np.asarray(grid)
        c, f = np.floor(p).astype(int), p - np.floor(p)
        fade = f**3 * (f * (f * 6 - 15) + 10)
        for e in np.ndindex(*(2,) * d):
            e = np.asarray(e)
            weight = np.prod(np.where(e == 1, fade, 1 - fade))
            want[(slice(None), *index)] += weight * (g[(slice(None), *(c + e))] @ (f - e))
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np.abs(got).max() <= math.sqrt(d) / 2


def test_asyncpatch_spread_vanishes_at_the_ends():
    tbar, spread = tbar_spread("asyncpatch", 32)
    ends = (tbar < 0.1) | (tbar > 0.9)
    middle = (tbar > 0.4) & (tbar < 0.6)
    assert spread[ends].mean() < 0.2 * spread[middle].mean()
    _, spread = tbar_spread("asyncpatch", 32, delta_max=0.3)
    assert spread.max() <= 2 * 0.3 + 1e-6
    assert spread.max() > 2 * 0.3 - 0.01
    # One patch per token: spread <= 2 delta <= 2 min(tbar_latent, 1 - tbar_latent), and the image
    # mean is within 6 sd = 6 delta / sqrt(3 * 1024) ~ 0.11 delta of tbar_latent, so
    # spread <= 2 / (1 - 0.11) min(mean, 1 - mean) < 2.25 min(mean, 1 - mean).
    tbar, spread = tbar_spread("asyncpatch", 32, patch_sizes=(32,))
    assert np.all(spread <= 2.25 * np.minimum(tbar, 1.0 - tbar) + 1e-6)


def test_asyncpatch_zero_spread_cases_and_mixing():
    tbar, spread = tbar_spread("asyncpatch", 16, 4000, p_synchronous=1.0)
    assert np.all(spread == 0.0)
    assert scipy.stats.kstest(tbar, "uniform").pvalue > 0.01
    # K = 1: one patch, level ~ U(tbar - delta, tbar + delta), symmetric about the centre 0.4.
    tbar, spread = tbar_spread("asyncpatch", 16, 4000, patch_sizes=(1,), t_min=0.2, t_max=0.6)
    assert np.all(spread == 0.0)
    assert tbar.min() >= 0.2 and tbar.max() <= 0.6
    assert abs(np.median(tbar) - 0.4) < 0.01
    # Zero spread exactly for the synchronous share: p_synchronous, or P(K = 1) from patch_probs.
    _, spread = tbar_spread("asyncpatch", 32, patch_sizes=(4,), p_synchronous=0.3)
    assert np.mean(spread == 0.0) == pytest.approx(0.3, abs=0.01)
    _, spread = tbar_spread("asyncpatch", 32, patch_sizes=(1, 32), patch_probs=(0.25, 0.75))
    assert np.mean(spread == 0.0) == pytest.approx(0.25, abs=0.01)


def test_asyncpatch_levels_within_t_range():
    x = draw("asyncpatch", 16, 4000, t_min=0.25, t_max=0.75, delta_max=1.0)
    assert x.min() >= 0.25 and x.max() <= 0.75
    tbar = np.asarray(stats.image_mean(x))
    assert abs(np.median(tbar) - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------
# Shapes, ranges, grids K does not divide
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", levels.NAMES)
@pytest.mark.parametrize("grid", [(12, 20), (16,), (4, 8, 8)])
def test_shape_dtype_range(name, grid):
    params = {"scale": 2} if name == "perlin" else {}
    x = levels.sample(name, KEY, 64, grid, **params)
    assert x.shape == (64, *grid) and x.dtype == jnp.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_empty_batch():
    assert levels.sample("asyncpatch", KEY, 0, 8).shape == (0, 8, 8)


@pytest.mark.parametrize(
    "name,params", [("patchwise", {"patch_sizes": (8,)}), ("asyncpatch", {"patch_sizes": (8,)})]
)
def test_grid_not_divisible_by_k(name, params):
    """Grid 28, K = 8: token i lies in patch floor(8 i / 28), patches of 3 or 4 tokens."""
    x = np.asarray(levels.sample(name, KEY, 16, 28, **params))
    patch = np.arange(28) * 8 // 28
    first = np.searchsorted(patch, np.arange(8))  # first token of each patch
    table = x[:, first][:, :, first]  # [B, 8, 8] patch levels
    np.testing.assert_array_equal(x, table[:, patch][:, :, patch])
    assert all(np.unique(t).size == 64 for t in table)  # 64 distinct patch levels per image


# ---------------------------------------------------------------------------------------------
# jit, retracing, sharding
# ---------------------------------------------------------------------------------------------


def test_no_retrace_across_keys():
    kwargs = dict(batch_size=32, grid=(8, 12), delta_max=0.25)
    levels.sample("asyncpatch", jax.random.key(1), **kwargs)
    size = samplers._sample_jit._cache_size()
    for seed in range(2, 6):
        levels.sample("asyncpatch", jax.random.key(seed), **kwargs)
    assert samplers._sample_jit._cache_size() == size


def test_inside_user_jit_with_traced_key():
    key = jax.random.key(3)
    eager = levels.sample("patchwise", key, 8, 16)
    jitted = jax.jit(lambda k: levels.sample("patchwise", k, 8, 16))(key)
    np.testing.assert_array_equal(eager, jitted)
    raw = jax.random.PRNGKey(3)  # raw uint32[2] keys work too
    assert levels.sample("independent", raw, 4, 8).shape == (4, 8, 8)


@pytest.mark.parametrize("name", ["asyncpatch", "perlin"])
def test_sharded_over_eight_devices(name):
    assert len(jax.devices()) == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    key = jax.random.key(5)
    sharded = jax.jit(lambda k: levels.sample(name, k, 64, 16), out_shardings=batch)(key)
    assert sharded.sharding.is_equivalent_to(batch, sharded.ndim)
    assert len(sharded.addressable_shards) == 8
    np.testing.assert_array_equal(sharded, levels.sample(name, key, 64, 16))

    keys = jax.device_put(jax.random.split(key, 64), batch)
    per_key = jax.jit(jax.vmap(lambda k: levels.sample(name, k, 1, 16)[0]))(keys)
    assert per_key.shape == (64, 16, 16)
    assert float(per_key.min()) >= 0.0 and float(per_key.max()) <= 1.0
    assert np.unique(np.asarray(stats.image_mean(per_key))).size == 64  # distinct keys, draws


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,grid,params,match",
    [
        ("async", 16, {}, r"'async'.*'asyncpatch'"),
        ("patchwise", 16, {"patches": 4}, r"'patches'.*\['patch_probs', 'patch_sizes'\]"),
        ("synchronous", 16, {"patch_sizes": 4}, r"'patch_sizes'.*none"),
        ("patchwise", 16, {"patch_sizes": (17,)}, r"patchwise patch_sizes.*\[1, 16\]; got 17"),
        ("patchwise", 16, {"patch_sizes": (0, 2)}, r"patchwise.*got 0"),
        ("patchwise", 16, {"patch_sizes": (2.5,)}, r"integer.*got 2.5"),
        ("patchwise", 16, {"patch_sizes": (1, 2), "patch_probs": (0.5,)}, r"2 probabilities"),
        ("asyncpatch", 16, {"t_min": 0.6, "t_max": 0.4}, r"t_min < t_max.*0.6"),
        ("asyncpatch", 16, {"delta_max": -0.1}, r"delta_max.*got -0.1"),
        ("asyncpatch", 16, {"patch_sizes": (1, 32)}, r"\[1, 16\]; got 32"),
        ("asyncpatch", 16, {"patch_sizes": (2, 2)}, r"repeat.*\(2, 2\)"),
        ("asyncpatch", 16, {"patch_sizes": (1, 2), "patch_probs": (0.5, 0.6)}, r"sum to 1"),
        ("asyncpatch", 16, {"patch_sizes": (1, 2), "patch_probs": (1.0,)}, r"2 probabilities"),
        ("asyncpatch", 16, {"p_synchronous": 1.5}, r"p_synchronous.*got 1.5"),
        ("perlin", 16, {"threshold": 2.0}, r"threshold.*got 2.0"),
        ("perlin", 16, {"scale": 4, "octaves": 4}, r"finest octave.*octaves=4"),
        ("synchronous", 0, {}, r"grid.*got 0"),
        ("synchronous", (16, "a"), {}, r"grid.*\(16, 'a'\)"),
    ],
)
def test_bad_parameters(name, grid, params, match):
    with pytest.raises(ValueError, match=match):
        levels.sample(name, KEY, 4, grid, **params)


def test_bad_batch_and_key():
    with pytest.raises(ValueError, match=r"batch_size.*got -1"):
        levels.sample("synchronous", KEY, -1, 8)
    with pytest.raises(ValueError, match=r"single PRNG key.*\(3,\)"):
        levels.sample("synchronous", jax.random.split(KEY, 3), 4, 8)


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


def test_stats_closed_forms():
    x = jnp.array([[[0.0, 1.0], [0.5, 0.5]], [[0.2, 0.2], [0.2, 0.2]]])
    np.testing.assert_allclose(stats.image_mean(x), [0.5, 0.2], rtol=1e-6)
    np.testing.assert_allclose(stats.spread(x), [1.0, 0.0], atol=1e-7)
    summary = stats.summary(x)
    assert summary["clean_token_fraction"] == 0.125 and summary["noise_token_fraction"] == 0.125
    assert summary["zero_spread_fraction"] == 0.5
    sample = np.random.default_rng(0).beta(2.0, 2.0, 500)
    assert stats.ks_uniform(sample) == pytest.approx(
        scipy.stats.kstest(sample, "uniform").statistic
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_writes_figure_and_summary(tmp_path):
    out = tmp_path / "diag"
    cli.main(
        [
            "--sampler=asyncpatch",
            "--grid=8",
            "--n=300",
            "--chunk=128",
            f"--out={out}",
            "--patch_sizes=1,2,4",
            "--delta_max=0.3",
        ]
    )
    assert (out / "levels_asyncpatch.png").stat().st_size > 10_000
    record = json.loads((out / "levels_asyncpatch.json").read_text())
    assert record["params"]["patch_sizes"] == [1, 2, 4]
    assert record["params"]["delta_max"] == 0.3
    assert record["grid"] == [8, 8]
    assert record["summary"]["n_images"] == 300
    assert record["summary"]["spread_max"] <= 0.6 + 1e-6

    cli.main(["--sampler=all", "--grid=8", "--n=64", f"--out={out}"])
    assert (out / "levels_all.png").stat().st_size > 10_000
    assert set(json.loads((out / "levels_all.json").read_text())) == set(levels.NAMES)


def test_cli_rejects_unknown_parameter(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--sampler=patchwise", "--patch=8", f"--out={tmp_path}"])
    assert "unknown parameter 'patch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--sampler=asyncpatch", "--delta_max=big", f"--out={tmp_path}"])
    assert "--delta_max" in capsys.readouterr().err
