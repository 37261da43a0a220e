"""Quantisers: straight-through gradients, FSQ's code <-> vector round trip, VQ training on a toy
mixture (both codebook updates), dead-code restarts, statistics, sharded batches, configs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from apd.models import quantizers
from apd.models.quantizers import FSQ, RNG, STATS, VectorQuantizer

KEY = jax.random.key(0)
# The tests' programs are tiny: XLA's backend optimisations only lengthen their compilation.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
UPDATES = ("ema", "straight_through")

# The toy set: 8 Gaussian clusters (std 0.1) at the corners of [-2, 2]^3, 4 apart.
CENTERS = np.array(np.meshgrid(*[[-2.0, 2.0]] * 3, indexing="ij"), np.float32).reshape(3, 8).T
SIGMA = 0.1


def mixture(key, n: int):
    """n points of the toy set [n, 3] and their clusters [n]."""
    k_label, k_noise = jax.random.split(key)
    labels = jax.random.randint(k_label, (n,), 0, 8)
    return jnp.asarray(CENTERS)[labels] + SIGMA * jax.random.normal(k_noise, (n, 3)), labels


def run(q, variables, *args, **kwargs):
    """q.apply(variables, *args, **kwargs) compiled as one program (eager dispatch compiles
    every operation separately, which is slower for these one-off calls)."""
    return jit(functools.partial(q.apply, **kwargs))(variables, *args)


def init(q, *args, **kwargs):
    return jit(functools.partial(q.init, **kwargs))(KEY, *args)


def grad_of_weighted_sum(quantizer, variables, z, w):
    def f(z):
        return jnp.sum(quantizer.apply(variables, z).quantized * w)

    return jit(jax.grad(f))(z)


# ---------------------------------------------------------------------------------------------
# Straight-through gradients


@pytest.mark.parametrize("update", UPDATES)
def test_vq_gradient_is_straight_through(update):
    q = VectorQuantizer(dim=3, num_codes=16, update=update)
    z = jax.random.normal(KEY, (2, 4, 4, 3))
    w = jax.random.normal(jax.random.key(1), z.shape)
    variables = init(q, z)
    out = run(q, variables, z)
    assert not np.allclose(out.quantized, z)  # the value is the code, not z
    np.testing.assert_array_equal(grad_of_weighted_sum(q, variables, z, w), w)


def test_fsq_gradient_is_straight_through_the_rounding():
    """FSQ's map is the tanh bound followed by rounding: the rounding passes gradients unchanged,
    so d(sum(quantized * w))/dz = w * d bound(z)/dz (the bound acts per element)."""
    q = FSQ(levels=(4, 5, 8))
    z = 2.0 * jax.random.normal(KEY, (2, 4, 4, 3))
    w = jax.random.normal(jax.random.key(1), z.shape)
    bound_grad = jit(jax.grad(lambda z: jnp.sum(q.bound(z))))(z)  # the elementwise derivative
    assert np.all(np.asarray(bound_grad) > 0)
    np.testing.assert_allclose(
        grad_of_weighted_sum(q, {}, z, w), w * bound_grad, rtol=1e-5, atol=1e-7
    )
    # The value is the rounding: within half a grid step of the bound.
    half_step = 0.5 / np.asarray([2.0, 2.0, 4.0])
    assert np.all(np.abs(np.asarray(run(q, {}, z).quantized - jit(q.bound)(z))) <= half_step + 1e-6)


# ---------------------------------------------------------------------------------------------
# FSQ


@pytest.mark.parametrize("levels", [(2,), (3, 4, 5), (8, 5, 5, 5), (16, 16, 32)])
def test_fsq_round_trip_over_all_codes(levels):
    q = FSQ(levels=levels)
    assert q.num_codes == int(np.prod(levels))
    codes = jnp.arange(q.num_codes, dtype=jnp.int32)
    vectors = jit(q.decode_codes)(codes)
    assert vectors.shape == (q.num_codes, len(levels))
    np.testing.assert_array_equal(jit(q.codes_from_quantized)(vectors), codes)
    # Channel i takes exactly L_i values in [-1, 1], evenly spaced by 1 / floor(L_i / 2).
    for i, L in enumerate(levels):
        values = np.unique(np.asarray(vectors[:, i]))
        assert len(values) == L
        np.testing.assert_allclose(np.diff(values), 1.0 / (L // 2), rtol=1e-6)
        assert values[0] == -1.0 and values[-1] <= 1.0
    # The quantiser's own outputs decode and re-encode consistently, codes in range.
    z = 3.0 * jax.random.normal(KEY, (4, 8, 8, len(levels)))
    out = run(q, {}, z)
    assert out.codes.dtype == jnp.int32 and out.codes.shape == (4, 8, 8)
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < q.num_codes
    np.testing.assert_allclose(jit(q.decode_codes)(out.codes), out.quantized, atol=1e-6)
    np.testing.assert_array_equal(jit(q.codes_from_quantized)(out.quantized), out.codes)
    assert float(out.loss) == 0.0


def test_fsq_even_and_odd_levels():
    """A sweep of z over the real line reaches every level of each channel: odd L gives values
    symmetric about 0, even L the half offset ({-1, -1/2, 0, 1/2} for L = 4); z = 0 maps to 0."""
    q = FSQ(levels=(4, 5))
    z = jnp.broadcast_to(jnp.linspace(-20.0, 20.0, 4001)[:, None], (4001, 2))
    quantized = np.asarray(run(q, {}, z).quantized)
    np.testing.assert_array_equal(np.unique(quantized[:, 0]), [-1.0, -0.5, 0.0, 0.5])
    np.testing.assert_array_equal(np.unique(quantized[:, 1]), [-1.0, -0.5, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(run(q, {}, jnp.zeros((1, 2))).quantized, [[0.0, 0.0]])
    np.testing.assert_allclose(jit(q.bound)(jnp.zeros((1, 2))), 0.0, atol=1e-7)
    # Every one of the 20 codes occurs on a 2-D grid of z.
    grid = jnp.stack(jnp.meshgrid(*[jnp.linspace(-5.0, 5.0, 101)] * 2), -1)
    out = run(q, {}, grid)
    assert float(out.metrics["usage"]) == 1.0
    assert np.array_equal(np.unique(out.codes), np.arange(20))


# ---------------------------------------------------------------------------------------------
# VectorQuantizer training on the toy set


@functools.cache
def trainer(update: str, restart_after: int, steps: int = 300):
    """A jitted loop of `steps` training steps on fresh batches of the toy set (128 points as
    [2, 8, 8, 3]): Adam (lr 0.05) on the parameters ('straight_through': the codebook), the
    statistics from the quantiser's own update."""
    q = VectorQuantizer(dim=3, num_codes=16, update=update, restart_after=restart_after)
    tx = optax.adam(0.05)

    def step(carry, i):
        params, stats, opt_state = carry
        key = jax.random.fold_in(KEY, i)
        z, _ = mixture(jax.random.fold_in(key, 0), 128)

        def loss_fn(params):
            out, updates = q.apply(
                {"params": params, STATS: stats},
                z.reshape(2, 8, 8, 3),
                train=True,
                mutable=[STATS],
                rngs={RNG: jax.random.fold_in(key, 1)},
            )
            return out.loss, (updates[STATS], out.metrics["restarted"])

        grads, (stats, restarted) = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), restarted

    @jit
    def train(params, stats):
        carry = (params, stats, tx.init(params))
        (params, stats, _), restarted = jax.lax.scan(step, carry, jnp.arange(steps))
        return params, stats, jnp.sum(restarted)

    return q, train


def far_away_codebook(update: str, variables):
    """An adversarial initialisation: all 16 codes near (20, 20, 20), far from every cluster."""
    far = 20.0 + 0.1 * jax.random.normal(jax.random.key(7), (16, 3))
    params, stats = dict(variables.get("params", {})), dict(variables[STATS])
    if update == "ema":
        stats["embed_sum"] = far  # cluster sizes start at 1, so the codes are these sums
    else:
        params["codebook"] = far
    return params, stats


def train_and_assess(update: str, restart_after: int, far: bool):
    q, train = trainer(update, restart_after)
    variables = init(q, jnp.zeros((2, 8, 8, 3)))
    if far:
        params, stats = far_away_codebook(update, variables)
    else:
        params, stats = variables.get("params", {}), variables[STATS]
    params, stats, restarted = train(params, stats)
    z, labels = mixture(jax.random.key(1234), 2048)
    out = run(q, {"params": params, STATS: stats}, z)
    codes, labels = np.asarray(out.codes), np.asarray(labels)
    cluster_codes = [set(codes[labels == c]) for c in range(8)]
    own_code = all(not (a & b) for i, a in enumerate(cluster_codes) for b in cluster_codes[i + 1 :])
    error = float(jnp.mean(jnp.sum(jnp.square(out.quantized - z), -1)))
    return float(out.metrics["usage"]), own_code, error, float(restarted)


@pytest.mark.parametrize("update", UPDATES)
def test_vq_learns_toy_clusters(update):
    """From the default initialisation (codes ~ N(0, 1)) with restarts after 10 unused steps,
    300 steps use all 16 codes, no code is shared by two clusters, and the mean squared
    quantisation error is below 0.05 (a cluster's own variance is 3 * 0.1^2 = 0.03; the set's is
    12)."""
    usage, own_code, error, _ = train_and_assess(update, restart_after=10, far=False)
    assert usage == 1.0
    assert own_code
    assert error < 0.05


@pytest.mark.parametrize("update", UPDATES)
def test_vq_restarts_revive_dead_codes(update):
    """All codes far away: the nearest one takes every vector and the other 15 never win. With
    restarts they come back at data points and the codebook reaches the quality above; without,
    one code serves the whole set."""
    usage, own_code, error, restarted = train_and_assess(update, restart_after=10, far=True)
    assert restarted >= 15
    assert usage == 1.0 and own_code and error < 0.05
    usage, own_code, error, restarted = train_and_assess(update, restart_after=0, far=True)
    assert restarted == 0
    assert usage == 1 / 16 and not own_code and error > 10.0


# ---------------------------------------------------------------------------------------------
# VectorQuantizer statistics


def test_vq_ema_update_and_laplace_smoothing():
    q = VectorQuantizer(dim=2, num_codes=3, decay=0.9, epsilon=1e-5, restart_after=0)
    z = jnp.asarray([[0.1, 0.0], [0.2, 0.0], [5.0, 5.0]])
    codebook = jnp.asarray([[0.0, 0.0], [5.0, 5.0], [-9.0, 9.0]])
    stats = {
        "cluster_size": jnp.ones(3),
        "embed_sum": codebook,
        "unused_steps": jnp.asarray([0, 0, 4], jnp.int32),
    }
    out, updates = run(q, {STATS: stats}, z, train=True, mutable=[STATS])
    np.testing.assert_array_equal(out.codes, [0, 0, 1])
    new = updates[STATS]
    np.testing.assert_allclose(new["cluster_size"], [0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
    expected_sum = 0.9 * codebook + 0.1 * jnp.asarray([[0.3, 0.0], [5.0, 5.0], [0.0, 0.0]])
    np.testing.assert_allclose(new["embed_sum"], expected_sum, rtol=1e-6)
    np.testing.assert_array_equal(new["unused_steps"], [0, 0, 5])
    sizes = np.asarray(new["cluster_size"])
    n = sizes.sum()
    smoothed = (sizes + 1e-5) / (n + 3e-5) * n
    np.testing.assert_allclose(
        run(q, {STATS: new}, method="code_vectors"), expected_sum / smoothed[:, None], rtol=1e-6
    )
    # The loss is beta times the commitment (mean over the 3 x 2 elements).
    commitment = (0.1**2 + 0.2**2) / 6
    np.testing.assert_allclose(out.metrics["commitment"], commitment, rtol=1e-5)
    np.testing.assert_allclose(out.loss, 0.25 * commitment, rtol=1e-5)


@pytest.mark.parametrize("update", UPDATES)
def test_vq_statistics_change_only_in_training(update):
    q = VectorQuantizer(dim=3, num_codes=8, update=update, restart_after=2)
    z = jax.random.normal(KEY, (4, 5, 3))
    variables = init(q, z, train=True)  # init never updates the statistics
    np.testing.assert_array_equal(variables[STATS]["unused_steps"], 0)
    out = run(q, variables, z)  # train=False: no mutable collection, no rng needed
    assert out.codes.shape == (4, 5) and float(out.metrics["restarted"]) == 0.0
    with pytest.raises(ValueError, match="mutable"):
        run(q, variables, z, train=True, rngs={RNG: KEY})
    with pytest.raises(ValueError, match="rng stream 'quantizer'"):
        run(q, variables, z, train=True, mutable=[STATS])
    _, updates = run(q, variables, z, train=True, mutable=[STATS], rngs={RNG: KEY})
    assert not np.array_equal(updates[STATS]["unused_steps"], variables[STATS]["unused_steps"])


@pytest.mark.parametrize("update", UPDATES)
def test_vq_restart_takes_batch_vectors_deterministically(update):
    """Codes unused for `restart_after` steps restart at vectors of the current batch, the same
    ones for the same rng; used codes keep their values."""
    q = VectorQuantizer(dim=3, num_codes=8, update=update, restart_after=2)
    z = jax.random.normal(KEY, (64, 3))
    variables = init(q, z)
    params, stats = far_away_codebook(update, variables)
    params = {k: v[:8] for k, v in params.items()}
    stats = {k: v[:8] for k, v in stats.items()}
    stats["unused_steps"] = jnp.asarray([5, 5, 5, 0, 0, 0, 1, 1], jnp.int32)
    variables = {"params": params, STATS: stats}

    def step(key):
        out, updates = run(q, variables, z, train=True, mutable=[STATS], rngs={RNG: key})
        codebook = run(q, {"params": params, **updates}, method="code_vectors")
        return out, updates[STATS], np.asarray(codebook)

    out, new, codebook = step(jax.random.key(3))
    before = np.asarray(run(q, variables, method="code_vectors"))
    used = np.asarray(jnp.bincount(out.codes, length=8)) > 0
    dead = ~used & (np.asarray(stats["unused_steps"]) + 1 >= 2)
    assert float(out.metrics["restarted"]) == dead.sum() >= 3
    np.testing.assert_array_equal(np.asarray(new["unused_steps"])[dead], 0)
    for k in np.flatnonzero(dead):
        distances = np.min(np.abs(np.asarray(z) - codebook[k]).max(-1))
        assert distances < 1e-5, f"code {k} did not restart at a batch vector"
    # A used EMA code moves to its cluster; the other codes keep their values.
    keep = ~dead & ~used if update == "ema" else ~dead
    np.testing.assert_allclose(codebook[keep], before[keep], rtol=1e-6)
    # The same rng gives the same restarts, another rng other ones.
    np.testing.assert_array_equal(step(jax.random.key(3))[2], codebook)
    assert not np.array_equal(step(jax.random.key(4))[2], codebook)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"update": "straight_through"},
        {"code_dim": 5, "cosine": True},
        {"code_dim": 2, "update": "straight_through", "cosine": True},
    ],
)
def test_vq_decode_codes_matches_quantized(options):
    """decode_codes(codes) is the vector the quantiser returned for them (with projections and
    l2-normalised codes too), for any leading shape."""
    q = VectorQuantizer(dim=3, num_codes=32, **options)
    variables = init(q, jnp.zeros((1, 3)))
    for shape in [(7,), (2, 3, 1, 5)]:
        z = jax.random.normal(KEY, (*shape, 3))
        out = run(q, variables, z)
        assert out.quantized.shape == z.shape and out.codes.shape == shape
        decoded = run(q, variables, out.codes, method="decode_codes")
        np.testing.assert_allclose(decoded, out.quantized, atol=1e-6)


def test_vq_nearest_code_in_float32():
    """Codes are the exact nearest neighbours (a brute-force float64 check)."""
    q = VectorQuantizer(dim=4, num_codes=64, cosine=False)
    variables = init(q, jnp.zeros((1, 4)))
    z = jax.random.normal(jax.random.key(2), (512, 4))
    codes = np.asarray(run(q, variables, z).codes)
    codebook = np.asarray(run(q, variables, method="code_vectors"), np.float64)
    distances = ((np.asarray(z, np.float64)[:, None] - codebook[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(codes, distances.argmin(-1))


def test_vq_sharded_batch_matches_unsharded():
    """Under jit with the batch sharded over 8 devices, codes, metrics (usage is of the whole
    batch) and the statistics update are those of the unsharded batch."""
    q = VectorQuantizer(dim=3, num_codes=64, restart_after=1)
    z = jax.random.normal(KEY, (8, 4, 4, 3))
    variables = init(q, z)

    def step(variables, z):
        out, updates = q.apply(variables, z, train=True, mutable=[STATS], rngs={RNG: KEY})
        return out, updates

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = jit(step, in_shardings=(replicated, data))(variables, jax.device_put(z, data))
    single = jit(step)(variables, z)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert 0.0 < float(single[0].metrics["usage"]) < 1.0


# ---------------------------------------------------------------------------------------------
# Configs and input checks


def test_from_config():
    vq = quantizers.from_config(
        mc.ConfigDict({"kind": "vq", "num_codes": 8192, "update": "straight_through"}), dim=3
    )
    assert isinstance(vq, VectorQuantizer) and vq.num_codes == 8192 and vq.dim == 3
    fsq = quantizers.from_config(mc.ConfigDict({"kind": "fsq", "levels": (16, 16, 32)}), dim=3)
    assert isinstance(fsq, FSQ) and fsq.num_codes == 8192
    assert isinstance(quantizers.from_config({"kind": "fsq"}, dim=3), quantizers.Quantizer)


@pytest.mark.parametrize(
    ("config", "dim", "message"),
    [
        ({"kind": "pq"}, 3, r"kind must be one of \['vq', 'fsq'\]; got 'pq'"),
        ({}, 3, "kind must be one of .*; got None"),
        ({"kind": "vq", "codes": 8}, 3, r"unknown attributes \['codes'\]"),
        ({"kind": "fsq", "num_codes": 8}, 3, r"unknown attributes \['num_codes'\]"),
        ({"kind": "vq", "num_codes": 1}, 3, "num_codes must be an int >= 2; got 1"),
        ({"kind": "vq", "num_codes": 8.0}, 3, "num_codes must be an int >= 2; got 8.0"),
        ({"kind": "vq", "update": "sgd"}, 3, "update must be one of .*; got 'sgd'"),
        ({"kind": "vq", "decay": 1.0}, 3, r"decay must be a real number in \(0, 1\); got 1.0"),
        ({"kind": "vq", "epsilon": 0.0}, 3, "epsilon must be a real number > 0; got 0.0"),
        ({"kind": "vq", "beta": -0.1}, 3, "beta must be a real number >= 0; got -0.1"),
        ({"kind": "vq", "restart_after": -1}, 3, "restart_after must be an int >= 0"),
        ({"kind": "vq", "code_dim": 0}, 3, "code_dim must be None or a positive int; got 0"),
        ({"kind": "vq", "cosine": "yes"}, 3, "cosine must be a bool; got 'yes'"),
        ({"kind": "vq", "init_scale": 0}, 3, "init_scale must be a real number > 0; got 0"),
        ({"kind": "vq"}, 0, "dim must be a positive int; got 0"),
        ({"kind": "fsq", "levels": (1, 4, 4)}, 3, r"levels must be .* ints >= 2.*got \(1, 4, 4\)"),
        ({"kind": "fsq", "levels": ()}, 0, "levels must be a non-empty sequence"),
        ({"kind": "fsq", "levels": (8, 8)}, 3, r"levels \(8, 8\) quantise 2 channels.* has 3"),
        ({"kind": "fsq", "levels": (2**16, 2**16)}, 2, "give 4294967296 codes"),
    ],
)
def test_bad_config_raises(config, dim, message):
    with pytest.raises(ValueError, match=message):
        quantizers.from_config(mc.ConfigDict(config), dim=dim)


def test_bad_inputs_raise():
    vq = VectorQuantizer(dim=3, num_codes=8)
    variables = init(vq, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"width 3 .* shape \(2, 4\)"):
        vq.apply(variables, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\); got a code 8"):
        vq.apply(variables, jnp.asarray([1, 8]), method="decode_codes")
    fsq = FSQ(levels=(3, 4))
    with pytest.raises(ValueError, match=r"width 2 .* shape \(5, 3\)"):
        fsq.apply({}, jnp.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 12\); got a code -1"):
        fsq.decode_codes(jnp.asarray([-1, 3]))
    with pytest.raises(ValueError, match="integer array"):
        fsq.decode_codes(jnp.asarray([0.0]))
