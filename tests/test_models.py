"""Backbones: shapes and sizes, per-token conditioning, labels, sharded training, precision."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from apd import losses, models, schedules
from apd.models import conditioning, layers, partitioning
from apd.models.dit import DiT, patchify, unpatchify
from apd.models.unet import FiLM, UNet

KEY = jax.random.key(0)
# The tests' programs are tiny: XLA's backend optimisations only lengthen their compilation.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TINY = {"unet": ("unet-tiny", (16, 16, 3)), "dit": ("dit-tiny", (16, 16, 3))}


def image_shape_for(name: str) -> tuple[int, int, int]:
    if "tiny" in name:
        return (16, 16, 3)
    if name == "unet-small":
        return (28, 28, 1)
    return (64, 64, 3) if name.startswith("unet") else (32, 32, 4)


@functools.cache
def abstract(name: str):
    return models.abstract_params(models.build(name), image_shape_for(name))


def random_params(module, seed: int, *args):
    """Random parameters for `module` without compiling its initialisers (slow on 2 cores):
    kernels normal / sqrt(fan-in), norm scales near 1 and everything else near 0, so
    zero-initialised outputs and gates are live."""
    shapes = jax.eval_shape(lambda: module.init(KEY, *args)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1].key in ("kernel", "embedding"):
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.05 * x + (1.0 if path[-1].key == "scale" else 0.0)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def tiny(kind: str, **overrides):
    name, (H, W, C) = TINY[kind]
    model = models.build(name, **overrides)
    z = jax.random.normal(KEY, (4, H, W, C))
    levels = jax.random.uniform(jax.random.key(1), (4, H, W))
    return model, random_params(model, 2, z, levels, None), z, levels


@functools.cache
def _jitted(model, method=None, **static):
    def run(params, *args):
        return model.apply({"params": params}, *args, method=method, **static)

    return jit(run)


def predict(model, params, *args, method=None, **static):
    """model.apply under jit (the eager input checks are tested with plain model.apply)."""
    return _jitted(model, method, **static)(params, *args)


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("name", list(models.SIZES))
def test_named_sizes_give_shapes_of_z(name):
    H, W, C = image_shape_for(name)
    model = models.build(name)
    params = abstract(name)
    z = jax.ShapeDtypeStruct((2, H, W, C), jnp.float32)
    levels = jax.ShapeDtypeStruct((2, H, W), jnp.float32)
    out, features = jax.eval_shape(
        lambda p, z, lv: model.apply({"params": p}, z, lv, None, return_features=True),
        params,
        z,
        levels,
    )
    assert out.shape == (2, H, W, C) and out.dtype == jnp.float32
    if isinstance(model, UNet):
        assert features.shape == (2, H, W, model.base)
    else:
        assert features.shape == (2, H // model.patch, W // model.patch, model.width)


@pytest.mark.parametrize(("name", "target"), [("unet-60m", 60e6), ("unet-620m", 620e6)])
def test_unet_parameter_counts_match_the_paper(name, target):
    count = sum(leaf.size for leaf in jax.tree.leaves(abstract(name)))
    assert count == models.param_count(name, (64, 64, 3))
    assert abs(count - target) / target < 0.10, count


def test_small_sizes_are_small():
    assert 0.05e6 < models.param_count("unet-tiny", (16, 16, 3)) < 0.2e6
    assert 0.5e6 < models.param_count("unet-small", (28, 28, 1)) < 2e6


def test_build_rejects_unknown_names_and_attributes():
    with pytest.raises(ValueError, match="unet-huge"):
        models.build("unet-huge")
    with pytest.raises(ValueError, match="widht"):
        models.build("dit-s/2", widht=3)
    assert models.build("dit-s/2", num_classes=10).num_classes == 10


def test_image_size_not_divisible_raises():
    model = models.build("unet-small")
    z, levels = jnp.zeros((1, 30, 30, 1)), jnp.zeros((1, 30, 30))
    with pytest.raises(ValueError, match="divisible by 4"):
        jax.eval_shape(model.init, KEY, z, levels, None)
    with pytest.raises(ValueError, match="patch size 4"):
        jax.eval_shape(models.build("dit-s/4").init, KEY, jnp.zeros((1, 30, 30, 3)), levels, None)


# ---------------------------------------------------------------------------------------------
# Conditioning helpers


def test_interpolate_is_exact_at_nodes_and_linear_between():
    K, F = 9, 3
    slope = jnp.array([1.0, -2.0, 0.5])
    table = jnp.broadcast_to(jnp.linspace(0, 1, K)[:, None] * slope[None], (2, K, F))
    levels = jax.random.uniform(KEY, (2, 5, 7))
    out = jit(conditioning.interpolate)(table, levels)
    np.testing.assert_allclose(out, levels[..., None] * slope.reshape(1, 1, 1, F), atol=1e-6)
    curved = jnp.square(table)
    nodes = jnp.linspace(0, 1, K).reshape(1, K, 1)
    np.testing.assert_allclose(
        jit(conditioning.interpolate)(curved, jnp.broadcast_to(nodes, (2, K, 1)))[:, :, 0],
        curved,
    )


def test_pool_levels_averages_patches_and_keeps_size_one_axes():
    levels = np.random.default_rng(0).uniform(size=(2, 8, 12)).astype(np.float32)
    pooled = jit(conditioning.pool_levels, static_argnums=1)(levels, (2, 3))
    np.testing.assert_allclose(pooled[1, 1, 2], levels[1, 4:8, 8:12].mean(), rtol=1e-6)
    assert conditioning.pool_levels(levels[:, :1, :1], (2, 3)).shape == (2, 1, 1)


def test_patchify_round_trip():
    x = jax.random.normal(KEY, (2, 8, 12, 3))
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    np.testing.assert_array_equal(tokens[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])
    np.testing.assert_array_equal(unpatchify(tokens, 4, (2, 3)), x)


# ---------------------------------------------------------------------------------------------
# Per-token conditioning


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_constant_map_equals_per_sample_level(kind):
    model, params, z, _ = tiny(kind, num_classes=3)
    t = jnp.array([0.0, 0.3, 0.77, 1.0])
    labels = jnp.array([0, 1, 2, 3])
    per_sample = predict(model, params, z, t[:, None, None], labels)
    per_token = predict(model, params, z, jnp.broadcast_to(t[:, None, None], z.shape[:3]), labels)
    np.testing.assert_allclose(per_token, per_sample, atol=1e-5, rtol=1e-5)
    other = predict(model, params, z, 1.0 - t[:, None, None], labels)
    assert float(jnp.max(jnp.abs(other - per_sample))) > 1e-3  # the level is used at all


def test_unet_modulation_changes_only_where_the_map_changed():
    model, params, z, levels = tiny("unet")
    raised = levels.at[1, 4:8, 8:12].set(0.99)  # aligned with the 2x-pooled grid
    inside = np.zeros(levels.shape, bool)
    inside[1, 4:8, 8:12] = True

    @jit
    def films(lv):
        _, state = model.apply(
            {"params": params},
            z,
            lv,
            None,
            capture_intermediates=lambda mdl, _: isinstance(mdl, FiLM),
        )
        return jax.tree.leaves(state["intermediates"])

    before, after = films(levels), films(raised)
    assert len(before) == 2 * 8  # (scale, shift) of every ResBlock
    for old, new in zip(before, after, strict=True):
        f = levels.shape[1] // old.shape[1]
        where = inside[:, ::f, ::f]
        changed = np.asarray(jnp.max(jnp.abs(new - old), axis=-1))
        assert changed[~where].max() == 0.0
        assert changed[where].min() > 0.0
    conds = predict(model, params, raised, None, method=UNet.conditioning, image_shape=(16, 16))
    assert [c.shape for c in conds] == [(4, 16, 16, 8), (4, 8, 8, 8)]


def test_dit_modulation_changes_only_the_tokens_that_changed():
    model, params, _, levels = tiny("dit")
    raised = levels.at[2, 5, 9].set(1.0)  # one pixel, inside token (2, 4) of the 8x8 grid

    def modulation(lv):
        blocks, final = predict(
            model, params, lv, None, method=DiT.modulation_features, image_shape=(16, 16)
        )
        return (jnp.concatenate(m, axis=-1).reshape(4, 8, 8, -1) for m in (blocks, final))

    for old, new in zip(modulation(levels), modulation(raised), strict=True):
        changed = np.array(jnp.max(jnp.abs(new - old), axis=-1))
        assert changed[2, 2, 4] > 0.0
        changed[2, 2, 4] = 0.0
        assert changed.max() == 0.0


def test_dit_blocks_start_as_identity():
    model, _, z, levels = tiny("dit")
    params = jit(lambda: model.init(KEY, z, levels, None)["params"])()
    for block in (params[f"DiTBlock_{i}"] for i in range(model.depth)):
        np.testing.assert_array_equal(block["table"][jnp.array([2, 5])], 0.0)  # gates
        assert float(jnp.std(block["table"][jnp.array([0, 1, 3, 4])])) > 0.0
    np.testing.assert_array_equal(params["shared_modulation"]["kernel"], 0.0)
    np.testing.assert_array_equal(predict(model, params, z, levels, None), 0.0)


def test_dit_bf16_activations_track_float32_activations():
    """activation_dtype=bfloat16 keeps the residual stream, q/k/v and the MLP hidden in bf16;
    outputs and gradients stay float32 and close to the float32-activation model's."""
    model32, params, z, levels = tiny("dit", dtype="bfloat16")
    model16 = models.build(TINY["dit"][0], dtype="bfloat16", activation_dtype="bfloat16")
    target = jax.random.normal(jax.random.key(5), z.shape)

    def loss(model, p):
        return jnp.mean(jnp.square(model.apply({"params": p}, z, levels, None) - target))

    (l32, g32), (l16, g16) = (
        jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (model32, model16)
    )
    out16, out32 = (predict(m, params, z, levels, None) for m in (model16, model32))
    assert out16.dtype == jnp.float32
    assert float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)) < 0.03
    assert abs(float(l16 - l32)) < 0.03 * float(l32)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(b)) + 1e-6
    with pytest.raises(ValueError, match="activation_dtype 'float16'"):
        models.build(TINY["dit"][0], activation_dtype="float16").init(KEY, z, levels, None)


def test_unet_bf16_activations_track_float32_activations():
    """activation_dtype=bfloat16 keeps the U-Net's feature maps (convolution, block and
    attention outputs) in bf16; FiLM parameters, outputs and gradients stay float32 and close to
    the float32-activation model's."""
    model32, params, z, levels = tiny("unet", dtype="bfloat16")
    model16 = models.build(TINY["unet"][0], dtype="bfloat16", activation_dtype="bfloat16")
    target = jax.random.normal(jax.random.key(5), z.shape)

    def loss(model, p):
        return jnp.mean(jnp.square(model.apply({"params": p}, z, levels, None) - target))

    (l32, g32), (l16, g16) = (
        jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (model32, model16)
    )
    out16, state = model16.apply(
        {"params": params}, z, levels, None, capture_intermediates=True, mutable="intermediates"
    )
    out32 = predict(model32, params, z, levels, None)
    inter = state["intermediates"]
    assert out16.dtype == jnp.float32
    assert inter["ResBlock_0"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["ResBlock_0"]["Conv_0"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["AttentionBlock_0"]["__call__"][0].dtype == jnp.bfloat16
    scale, shift = inter["ResBlock_0"]["FiLM_0"]["__call__"][0]
    assert scale.dtype == shift.dtype == jnp.float32
    assert float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)) < 0.03
    assert abs(float(l16 - l32)) < 0.03 * float(l32)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b)) <= 0.05 * float(jnp.linalg.norm(b)) + 1e-6
    with pytest.raises(ValueError, match="activation_dtype 'float16'"):
        models.build(TINY["unet"][0], activation_dtype="float16").init(KEY, z, levels, None)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_remat_policies_give_the_loss_and_gradients_of_none(kind):
    """Every remat policy recomputes the same float32 operations as plain autodiff: the loss
    agrees to 1e-6 and every gradient to 1e-5 of its norm (only XLA's fusion, hence float32
    rounding, may differ). And each policy keeps less for the backward pass than the one before
    it: the residuals of `jax.vjp` shrink from none to dots, projections and full. (XLA:CPU's
    scheduler computes the recomputation early, so the compiled CPU program's peak memory does
    not show the saving.)"""
    model, params, z, levels = tiny(kind)
    target = jax.random.normal(jax.random.key(5), z.shape)
    labels = None

    def loss(remat, p):
        pred = model.clone(remat=remat).apply({"params": p}, z, levels, labels, train=True)
        return jnp.mean(jnp.square(pred - target))

    results, saved = {}, {}
    for remat in layers.REMAT_POLICIES:
        fn = functools.partial(loss, remat)
        results[remat] = jit(jax.value_and_grad(fn))(params)
        residuals = jax.eval_shape(lambda p, fn=fn: jax.vjp(fn, p)[1], params)
        saved[remat] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
    l0, g0 = results["none"]
    for remat, (l, g) in results.items():
        np.testing.assert_allclose(l, l0, rtol=1e-6, err_msg=remat)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
            assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b)) + 1e-9, remat
    assert saved["none"] > saved["dots"] > saved["projections"] > saved["full"], saved
    with pytest.raises(ValueError, match="remat policy 'per_layer'"):
        model.clone(remat="per_layer").init(KEY, z, levels, None)


def _norm_reference(x, gain, shift, groups, spatial_axes, eps, silu):
    """The unfused computation, differentiated by autodiff."""
    C = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, C // groups)
    axes = (*spatial_axes, x.ndim)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    gain, shift = (layers.to_rank(v, x.ndim) for v in (gain, shift))
    y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * gain + shift
    return (jax.nn.silu(y) if silu else y).astype(x.dtype)


@pytest.mark.parametrize(
    ("shape", "mod_shape", "groups", "spatial", "silu"),
    [
        ((2, 4, 6, 8), (2, 4, 6, 8), 4, (1, 2), True),  # U-Net: GroupNorm + per-pixel FiLM + SiLU
        ((2, 4, 6, 8), (2, 1, 1, 8), 2, (1, 2), True),  # per-sample FiLM
        ((2, 4, 6, 8), (8,), 8, (1, 2), False),  # affine GroupNorm
        ((2, 5, 16), (2, 5, 16), 1, (), False),  # DiT: LayerNorm + per-token adaLN
    ],
)
def test_norm_modulate_equals_the_unfused_computation(shape, mod_shape, groups, spatial, silu):
    """Values to 1e-5 and the gradients of x, gain and shift to 1e-4 (float32 rounding of two
    orders of summation); in bf16, the output and x's gradient are bf16 and track float32."""
    kx, kg, ks, kd = jax.random.split(jax.random.key(3), 4)
    x = 3.0 * jax.random.normal(kx, shape) + 1.0
    gain = 1.0 + 0.5 * jax.random.normal(kg, mod_shape)
    shift = 0.5 * jax.random.normal(ks, mod_shape)
    dy = jax.random.normal(kd, shape)

    def fused(x, gain, shift):
        return layers.norm_modulate(
            x, gain, shift, groups=groups, spatial_axes=spatial, eps=1e-5, silu=silu
        )

    def reference(x, gain, shift):
        return _norm_reference(x, gain, shift, groups, spatial, 1e-5, silu)

    out, vjp = jax.vjp(fused, x, gain, shift)
    ref_out, ref_vjp = jax.vjp(reference, x, gain, shift)
    ref_grads = ref_vjp(dy)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(vjp(dy), ref_grads, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    out16, vjp16 = jax.vjp(fused, x.astype(jnp.bfloat16), gain, shift)
    dx16, dgain16, _ = vjp16(dy.astype(jnp.bfloat16))
    assert out16.dtype == dx16.dtype == jnp.bfloat16 and dgain16.dtype == jnp.float32
    for a, b in ((out16, ref_out), (dx16, ref_grads[0])):
        rel = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert rel < 0.02, rel


def test_group_norm_is_flax_group_norm_and_refuses_bad_groups():
    """apd's fused GroupNorm has flax's parameters and values (checkpoints are unchanged)."""
    x = jax.random.normal(KEY, (2, 4, 4, 12)) * 2.0 + 0.5
    ours, theirs = layers.GroupNorm(8), flax.linen.GroupNorm(num_groups=4, epsilon=1e-5)
    params = random_params(theirs, 1, x)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(ours, 1, x))
    np.testing.assert_allclose(
        ours.apply({"params": params}, x, silu=True),
        jax.nn.silu(theirs.apply({"params": params}, x)),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="positive divisor of the channels 12; got 5"):
        layers.norm_modulate(x, jnp.ones(12), jnp.zeros(12), groups=5, spatial_axes=(1, 2))
    with pytest.raises(ValueError, match="12 or 1 channels"):
        layers.norm_modulate(x, jnp.ones(6), jnp.zeros(12), groups=4, spatial_axes=(1, 2))


# ---------------------------------------------------------------------------------------------
# Labels and input checks


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_null_label_path(kind):
    model, params, z, levels = tiny(kind, num_classes=3)
    null = predict(model, params, z, levels, None)
    explicit = predict(model, params, z, levels, jnp.full((4,), 3, jnp.int32))
    np.testing.assert_array_equal(null, explicit)
    real = predict(model, params, z, levels, jnp.zeros((4,), jnp.int32))
    assert float(jnp.max(jnp.abs(real - null))) > 1e-4
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
            model.apply({"params": params}, z, levels, jnp.full((4,), bad, jnp.int32))
    with pytest.raises(ValueError, match="integer array of shape"):
        model.apply({"params": params}, z, levels, jnp.zeros((4,), jnp.float32))


def test_unconditional_model_accepts_only_the_null_label():
    model, params, z, levels = tiny("unet")
    np.testing.assert_array_equal(
        predict(model, params, z, levels, jnp.zeros((4,), jnp.int32)),
        predict(model, params, z, levels, None),
    )
    with pytest.raises(ValueError, match=r"\[0, 0\]"):
        model.apply({"params": params}, z, levels, jnp.ones((4,), jnp.int32))


def test_bad_levels_raise():
    model, params, z, levels = tiny("dit")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.apply({"params": params}, z, levels.at[0, 0, 0].set(1.5), None)
    with pytest.raises(ValueError, match="do not match"):
        model.apply({"params": params}, z, levels[:, :8], None)


def test_dropout_only_in_training():
    model, params, z, levels = tiny("dit", dropout=0.5)
    inference = predict(model, params, z, levels, None)

    @jit
    def train(key):
        return model.apply({"params": params}, z, levels, None, train=True, rngs={"dropout": key})

    a, b = train(jax.random.key(1)), train(jax.random.key(2))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
    assert float(jnp.max(jnp.abs(a - inference))) > 1e-4
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda: model.apply({"params": params}, z, levels, None, train=True))


# ---------------------------------------------------------------------------------------------
# Training on 8 devices, sharding rules


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_sharded_training_step_reduces_the_loss(kind):
    name, (H, W, C) = TINY[kind]
    model = models.build(name, num_classes=2)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    rng = np.random.default_rng(0)
    x, eps = (jax.device_put(rng.standard_normal((8, H, W, C), np.float32), data) for _ in range(2))
    levels = jax.device_put(rng.uniform(0.05, 1.0, (8, H, W)).astype(np.float32), data)
    labels = jax.device_put(np.arange(8, dtype=np.int32) % 3, data)
    schedule = schedules.RectifiedFlow()
    params = jax.device_put(random_params(model, 3, x, levels, labels), replicated)
    optimizer = optax.adam(3e-3)
    opt_state = jit(optimizer.init, out_shardings=replicated)(params)

    @functools.partial(jit, out_shardings=replicated)
    def step(params, opt_state):
        def loss_fn(p):
            z = schedule.alpha(levels)[..., None] * x + schedule.sigma(levels)[..., None] * eps
            pred = model.apply({"params": p}, z, levels, labels)
            per_example, _ = losses.weighted_loss(pred, x, eps, levels, schedule)
            return jnp.mean(per_example)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    history = []
    for _ in range(6):
        params, opt_state, loss = step(params, opt_state)
        history.append(float(loss))
    assert np.all(np.isfinite(history))
    assert np.all(np.diff(history) < 0) and history[-1] < 0.9 * history[0], history
    assert params["conv_out" if kind == "unet" else "out"]["kernel"].sharding.is_fully_replicated


@pytest.mark.parametrize("name", ["unet-620m", "unet-60m", "dit-xl/2", "dit-b/4"])
def test_sharding_rules_give_valid_specs(name):
    params = abstract(name)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    specs = models.param_specs(params, mesh)
    shardings = models.param_shardings(params, mesh)
    sharded = 0
    for (path, leaf), spec, sharding in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)),
        jax.tree.leaves(shardings),
        strict=True,
    ):
        assert len(spec) <= leaf.ndim
        for dim, axis in zip(leaf.shape, spec, strict=False):
            assert axis is None or (axis == "fsdp" and dim % 4 == 0)
        shard = sharding.shard_shape(leaf.shape)
        is_kernel = path[-1].key in ("kernel", "embedding")
        if is_kernel and leaf.size >= partitioning.MIN_SHARD_SIZE and max(leaf.shape) % 4 == 0:
            assert spec != PartitionSpec(), path
        if not is_kernel:
            assert spec == PartitionSpec(), path
        if spec != PartitionSpec():
            assert np.prod(shard) * 4 == leaf.size
            sharded += leaf.size
    total = sum(leaf.size for leaf in jax.tree.leaves(params))
    assert sharded / total > 0.95


def test_fsdp_spec_picks_the_largest_divisible_dimension_or_replicates():
    assert partitioning.fsdp_spec((3, 3, 256, 512), 8) == PartitionSpec(None, None, None, "fsdp")
    assert partitioning.fsdp_spec((1536, 384), 8) == PartitionSpec("fsdp")
    assert partitioning.fsdp_spec((1001, 384), 8) == PartitionSpec(None, "fsdp")
    assert partitioning.fsdp_spec((3, 5), 4) == PartitionSpec()


def test_conv_as_matmul_equals_convolution():
    x = jax.random.normal(KEY, (2, 7, 5, 3))
    for k in (1, 3, 5):
        kernel = jax.random.normal(jax.random.key(k), (k, k, 3, 4))
        ref = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        np.testing.assert_allclose(
            jit(layers.conv_as_matmul, static_argnums=2)(x, kernel, jnp.float32),
            ref,
            atol=1e-4,
        )


def test_upsample_conv_equals_upsampling_then_convolution():
    """The folded form gives the values and gradients of nearest x2 upsampling + 3x3 conv."""
    x = jax.random.normal(KEY, (2, 5, 7, 6))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 6, 4))

    def ref(x, kernel):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(
            up, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def loss(fn):
        return lambda x, kernel: jnp.sum(jnp.sin(fn(x, kernel)))

    folded = functools.partial(layers.upsample_conv, dtype=jnp.float32)
    out = jit(folded)(x, kernel)
    assert out.shape == (2, 10, 14, 4)
    np.testing.assert_allclose(out, ref(x, kernel), atol=1e-4)
    grads = jit(jax.grad(loss(folded), argnums=(0, 1)))(x, kernel)
    for g, r in zip(grads, jax.grad(loss(ref), argnums=(0, 1))(x, kernel), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-3)
    with pytest.raises(ValueError, match="3x3"):
        layers.upsample_conv(x, kernel[:1], jnp.float32)


def test_matmul_gradients_in_both_precisions():
    a = jax.random.normal(KEY, (2, 3, 16, 8))
    b = jax.random.normal(jax.random.key(1), (2, 3, 8, 12))
    ref = jax.grad(lambda a, b: jnp.sum(jnp.sin(a @ b)), argnums=(0, 1))(a, b)

    def loss(a, b, dtype):
        return jnp.sum(jnp.sin(layers.matmul(a, b, dtype)))

    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 0.05)):
        grads = jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(a, b, dtype)
        for g, r in zip(grads, ref, strict=True):
            assert g.dtype == jnp.float32
            assert float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))) < tol


# ---------------------------------------------------------------------------------------------
# Precision and the uncertainty head


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_bfloat16_compute_is_close_to_float32(kind):
    model, params, z, levels = tiny(kind)
    ref = predict(model, params, z, levels, None)
    out = predict(model.clone(dtype="bfloat16"), params, z, levels, None)  # as configs spell it
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize(("patch", "width"), [(1, 12), (2, 64)])
def test_uncertainty_head_reads_frozen_features(patch, width):
    # Features shaped like the U-Net's (patch 1) and the DiT's (patch 2) on 16x16 images.
    features = jax.random.normal(KEY, (4, 16 // patch, 16 // patch, width))
    levels = jax.random.uniform(KEY, (4, 16, 16))
    head = models.UncertaintyHead(hidden=16, depth=1, patch=patch, norm_groups=4)
    head_params = random_params(head, 4, features, levels)
    run = jit(lambda f, lv: head.apply({"params": head_params}, f, lv))
    out = run(features, levels)
    assert out.shape == levels.shape and out.dtype == jnp.float32
    assert run(features, levels[:, :1, :1]).shape == levels.shape
    grad = jit(jax.grad(lambda f: jnp.sum(head.apply({"params": head_params}, f, levels))))(
        features
    )
    assert float(jnp.max(jnp.abs(grad))) == 0.0
    moved = run(features, levels.at[0, 3, 3].set(0.0))
    diff = np.asarray(jnp.abs(moved - out))
    assert diff[0, 3, 3] > 0 and diff[1:].max() == 0.0


def test_conv_output_dtype_is_bf16_only_for_bf16_on_gpu():
    assert layers.conv_output_dtype(jnp.bfloat16, "gpu") == jnp.bfloat16
    for dtype, backend in [(jnp.float32, "gpu"), (jnp.bfloat16, "cpu"), (jnp.bfloat16, "tpu")]:
        assert layers.conv_output_dtype(dtype, backend) == jnp.float32


def test_fused_attention_matches_explicit_attention():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 19, 4, 8))
    explicit = layers.explicit_attention(q, k, v, jnp.float32)
    fused = layers.fused_attention(q, k, v, jnp.float32, implementation="xla")
    assert fused.dtype == jnp.float32
    np.testing.assert_allclose(fused, explicit, atol=1e-5)
    # Off GPU, `attention` is the explicit form (float32 logits) in every precision.
    np.testing.assert_array_equal(
        layers.attention(q, k, v, jnp.bfloat16), layers.explicit_attention(q, k, v, jnp.bfloat16)
    )
