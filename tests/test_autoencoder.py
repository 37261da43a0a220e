"""The mask-aware autoencoder: shapes (f = 4, VQ and FSQ, bf16), the latent mask rule, mask
modulation, the training rule, a trained toy (leakage and reconstruction), the discriminator and
the GAN losses, training masks, RMSNorm in `layers.norm_modulate`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apd.evaluation import masks
from apd.models import autoencoder as ae
from apd.models import layers, quantizers

KEY = jax.random.key(0)
# The tests' programs are tiny: XLA's backend optimisations only lengthen their compilation.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
FSQ = {"kind": "fsq", "levels": (5, 5, 5)}


def random_variables(model, seed: int, *args, live: bool = True):
    """Random variables for `model` without compiling its initialiser (slow on 2 cores).

    live=True: kernels normal / sqrt(fan-in), everything else 0.1 * normal, so zero-initialised
    convolutions are live and every FiLM matters. live=False: the initialisers' distributions
    (kernels normal / sqrt(fan-in), biases 0, the residual branches' last convolutions and the
    attention output projections 0). A VQ codebook's statistics as `init` makes them (cluster
    sizes 1, code sums normal, no unused steps)."""
    shapes = jax.eval_shape(lambda: model.init(KEY, *args))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name, owner = path[-1].key, path[-2].key
        if path[0].key == quantizers.STATS:
            if name == "cluster_size":
                return np.ones(leaf.shape, np.float32)
            return x if name == "embed_sum" else np.zeros(leaf.shape, leaf.dtype)
        if name == "kernel" and (live or owner not in ("conv2", "out")):
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.1 * x if live else np.zeros(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def images(seed: int, batch: int, side: int) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, side, side, 3), minval=-1, maxval=1)


def square_masks(seed: int, batch: int, side: int) -> jax.Array:
    return jnp.asarray(masks.make_masks("square", seed, batch, side), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Shapes and sizes


@pytest.mark.parametrize(
    ("side", "overrides"),
    [
        (16, {}),  # VQ, RMSNorm, no attention
        (64, {"quantizer_config": FSQ, "attention": True}),
        (
            16,
            {
                "quantizer_config": FSQ,
                "dtype": jnp.bfloat16,
                "norm": "group",
                "attention": True,
                "remat": "dots",
            },
        ),
    ],
)
def test_shapes_of_encode_quantize_decode_and_call(side, overrides):
    model = ae.build_autoencoder("ae-f4-tiny", **overrides)
    assert model.factor == 4
    batch = 2 if side == 16 else 1
    x, known = images(1, batch, side), square_masks(0, batch, side)
    variables = random_variables(model, 0, x, known)

    out = jit(model.apply)(variables, x, known)
    h = side // 4
    assert out.z.shape == out.quantized.quantized.shape == (batch, h, h, 3)
    assert out.quantized.codes.shape == (batch, h, h) and out.x_hat.shape == x.shape
    for a in (out.z, out.quantized.quantized, out.x_hat):
        assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
    num_codes = 125 if "quantizer_config" in overrides else 64
    assert np.all((out.quantized.codes >= 0) & (out.quantized.codes < num_codes))


def test_named_sizes():
    """The paper's size is LDM vq-f4's shape (~56M parameters with its 8192-code codebook); the
    CPU demo size stays at a few million."""

    def count(name, side):
        model = ae.build_autoencoder(name)
        shapes = jax.eval_shape(
            lambda: model.init(KEY, jnp.zeros((1, side, side, 3)), jnp.ones((1, side, side)))
        )
        return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"])), shapes

    paper, shapes = count("ae-f4-paper", 256)
    assert 50e6 < paper < 60e6
    stats = shapes[quantizers.STATS]["quantizer"]
    assert stats["embed_sum"].shape == (8192, 3)
    assert count("ae-f4-small", 64)[0] < 4e6
    fsq = ae.build_autoencoder("ae-f4-paper", quantizer_config={"kind": "fsq"})
    assert dict(fsq.quantizer_config) == {"kind": "fsq"}  # a kind replaces the block
    vq = ae.build_autoencoder("ae-f4-paper", quantizer_config={"num_codes": 4096})
    assert dict(vq.quantizer_config) == {"kind": "vq", "num_codes": 4096}  # fields update it


def test_bad_configurations_and_inputs_raise():
    with pytest.raises(ValueError, match="unknown autoencoder size 'ae-f8'"):
        ae.build_autoencoder("ae-f8")
    with pytest.raises(ValueError, match=r"unknown attributes \['width'\]"):
        ae.build_autoencoder("ae-f4-tiny", width=3)
    with pytest.raises(ValueError, match="norm must be one of"):
        ae.build_autoencoder("ae-f4-tiny", norm="layer")
    with pytest.raises(ValueError, match="multipliers must be a non-empty tuple"):
        ae.build_autoencoder("ae-f4-tiny", multipliers=())
    with pytest.raises(ValueError, match="quantizer kind must be one of"):
        ae.build_autoencoder("ae-f4-tiny", quantizer_config={"kind": "rvq"})
    with pytest.raises(ValueError, match=r"FSQ levels .* quantise 2 channels"):
        ae.build_autoencoder("ae-f4-tiny", quantizer_config={"kind": "fsq", "levels": (8, 8)})
    model = ae.build_autoencoder("ae-f4-tiny", quantizer_config=FSQ)
    x = jnp.zeros((1, 8, 8, 3))
    variables = random_variables(model, 0, x, None)
    with pytest.raises(
        ValueError, match=r"image size \(10, 10\) must be divisible by the factor 4"
    ):
        model.apply(variables, jnp.zeros((1, 10, 10, 3)), method="encode")
    with pytest.raises(ValueError, match=r"x must be images \[B, H, W, 3\]"):
        model.apply(variables, jnp.zeros((1, 8, 8, 1)), method="encode")
    with pytest.raises(ValueError, match=r"known must be a pixel mask \[B, H, W\] = \(1, 8, 8\)"):
        model.apply(variables, x, jnp.ones((1, 8, 4)), method="encode")
    with pytest.raises(ValueError, match=r"only 0 \(hole\) and 1 \(known pixel\); got a value 0.5"):
        model.apply(variables, x, jnp.full((1, 8, 8), 0.5), method="encode")
    with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 3\]"):
        model.apply(variables, jnp.zeros((1, 2, 2, 4)), method="decode")
    with pytest.raises(ValueError, match="consistency_weight must be a real number >= 0"):
        ae.mask_aware_targets(model, variables, x, None, consistency_weight=-1.0)


# ---------------------------------------------------------------------------------------------
# The latent mask


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_latent_mask_is_the_all_pixels_known_rule(factor):
    rng = np.random.default_rng(factor)
    known = (rng.random((3, 8, 12)) < 0.9).astype(np.uint8)
    known[0] = 1  # an all-known mask
    tokens = np.asarray(ae.latent_mask(jnp.asarray(known), factor))
    assert tokens.shape == (3, 8 // factor, 12 // factor) and tokens.dtype == np.float32
    for b in range(3):
        for i in range(8 // factor):
            for j in range(12 // factor):
                block = known[b, i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                assert tokens[b, i, j] == float(block.all())
    assert np.all(tokens[0] == 1) and 0 < tokens.mean() < 1


def test_latent_mask_rejects_bad_factors():
    with pytest.raises(ValueError, match=r"size \(8, 6\) must be divisible by the factor 4"):
        ae.latent_mask(jnp.ones((1, 8, 6)), 4)
    with pytest.raises(ValueError, match="factor must be an int >= 1; got 0"):
        ae.latent_mask(jnp.ones((1, 8, 8)), 0)


# ---------------------------------------------------------------------------------------------
# Mask modulation


def test_mask_modulation():
    """Aware: the hole's pixel values never reach the latents (holes are zeroed), while the mask
    itself changes encoder and decoder (modulation). Unaware (same parameters): the mask enters
    only through the zeroed holes, so encode(x, known) = encode(x * known, None) and decoding
    ignores the mask; it equals the aware network run with an all-known mask."""
    aware = ae.build_autoencoder("ae-f4-tiny", quantizer_config=FSQ)
    unaware = aware.clone(mask_aware=False)
    x, known = images(1, 2, 16), square_masks(3, 2, 16)
    other = jnp.where(known[..., None] > 0, x, images(2, 2, 16))  # new pixels in the holes
    variables = random_variables(aware, 0, x, known)

    @jit
    def run(variables, x, other, known):
        def encode(model, *args):
            return model.apply(variables, *args, method="encode")

        def decode(model, *args):
            return model.apply(variables, *args, method="decode")

        z = encode(aware, x, known)
        zeroed = x * known[..., None]
        return {
            "aware": (z, encode(aware, other, known), encode(aware, zeroed, None)),
            "aware_decode": (decode(aware, z, known), decode(aware, z, None)),
            "unaware": (
                encode(unaware, x, known),
                encode(unaware, other, known),
                encode(unaware, zeroed, None),
            ),
            "unaware_decode": (decode(unaware, z, known), decode(unaware, z, None)),
        }

    out = run(variables, x, other, known)
    known_tokens = np.asarray(ae.latent_mask(known, 4)) > 0
    assert 0 < known_tokens.mean() < 1
    for kind in ("aware", "unaware"):
        z, z_other, _ = out[kind]
        np.testing.assert_allclose(z[known_tokens], z_other[known_tokens], rtol=1e-6, atol=1e-6)
    z, _, z_unmodulated = out["aware"]
    assert np.abs(z - z_unmodulated).max() > 1e-2
    x_hat, x_hat_unmodulated = out["aware_decode"]
    assert np.abs(x_hat - x_hat_unmodulated).max() > 1e-2
    z_unaware, _, z_unaware_zeroed = out["unaware"]
    np.testing.assert_array_equal(z_unaware, z_unaware_zeroed)
    np.testing.assert_array_equal(z_unaware, z_unmodulated)
    np.testing.assert_array_equal(*out["unaware_decode"])
    np.testing.assert_array_equal(out["unaware_decode"][0], x_hat_unmodulated)


# ---------------------------------------------------------------------------------------------
# The training rule


def test_training_rule():
    """z_mix takes z_masked on the known tokens and z_full elsewhere; the consistency term is
    the mean squared latent difference over known tokens; with every pixel known the rule is an
    ordinary autoencoder step (no consistency term, the model's own reconstruction); train=True
    updates a VQ codebook's statistics."""
    model = ae.build_autoencoder("ae-f4-tiny")
    x, known = images(1, 2, 16), square_masks(3, 2, 16)
    variables = random_variables(model, 0, x, known)
    rngs = {quantizers.RNG: jax.random.key(5)}

    @jit
    def run(variables, x, known):
        masked = ae.mask_aware_targets(model, variables, x, known, train=False)[0]
        full = ae.mask_aware_targets(
            model, variables, x, None, train=False, consistency_weight=2.0
        )[0]
        trained = ae.mask_aware_targets(model, variables, x, known, rngs, consistency_weight=3.0)
        return masked, full, trained, model.apply(variables, x)

    masked, full, (trained, updated), plain = run(variables, x, known)
    m = np.asarray(ae.latent_mask(known, 4))[..., None]
    np.testing.assert_array_equal(masked.known_tokens, m[..., 0])
    np.testing.assert_array_equal(masked.z_mix, np.where(m > 0, masked.z_masked, masked.z_full))
    consistency = np.sum(m * np.square(masked.z_masked - masked.z_full)) / (m.sum() * 3)
    np.testing.assert_allclose(masked.metrics["consistency"], consistency, rtol=1e-5)
    np.testing.assert_allclose(
        masked.aux_loss, consistency + masked.quantized.loss, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        masked.metrics["leakage"],
        ae.leakage(masked.z_masked, masked.z_full, m[..., 0]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(trained.aux_loss, 3.0 * consistency + trained.quantized.loss, 1e-5)

    np.testing.assert_allclose(full.z_masked, full.z_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full.z_mix, plain.z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full.x_hat, plain.x_hat, rtol=1e-5, atol=1e-5)
    assert float(full.metrics["consistency"]) < 1e-10
    np.testing.assert_allclose(full.aux_loss, plain.quantized.loss, rtol=1e-5, atol=1e-8)

    stats, new_stats = variables[quantizers.STATS], updated[quantizers.STATS]
    assert jax.tree.structure(stats) == jax.tree.structure(new_stats)
    assert not np.allclose(
        stats["quantizer"]["cluster_size"], new_stats["quantizer"]["cluster_size"]
    )


def blobs(rng: np.random.Generator, n: int, side: int = 16) -> np.ndarray:
    """n toy images [n, side, side, 3] in [-1, 1]: three soft Gaussian blobs of random colours
    and radii 2-5 pixels on a background of a random colour."""
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    out = np.broadcast_to(rng.uniform(-1, 1, (n, 1, 1, 3)), (n, side, side, 3)).copy()
    for _ in range(3):
        cy, cx = rng.uniform(0, side, (2, n, 1, 1))
        radius = rng.uniform(2, 5, (n, 1, 1))
        w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
        out = out * (1 - w) + w * rng.uniform(-1, 1, (n, 1, 1, 3))
    return out.astype(np.float32)


def test_trained_toy_the_mask_aware_rule_lowers_leakage_and_reconstructions_improve():
    """Two copies of a small f = 4 autoencoder train side by side (one vmapped program, 300
    steps of 8 blob images): the mask-aware one by the mask-aware rule on square, extrema and
    half masks (a quarter of the rows unmasked), the unaware baseline as an ordinary autoencoder
    (every pixel known: a first stage trained without masks). Then held-out masked images are
    encoded as each model would encode them at inpainting time (aware: with the mask; unaware:
    holes zeroed, mask ignored, which is the aware network with an all-known mask, see
    `test_mask_modulation`). The aware model's known-token latents move less with the hole
    (leakage 0.09 against 0.15 when this test was written), and both reconstruction losses fall
    (by 42% and 30%).

    What lowers the leakage is the rule's consistency term, not the modulation. Measured on
    this toy (one seed, leakage / final training reconstruction loss): aware with the rule
    0.09 / 0.26, unaware with the same rule 0.07 / 0.31, both with masks but no consistency
    term (consistency_weight=0) 0.14 / 0.28 (aware) and 0.12 / 0.29 (unaware), the ordinary
    autoencoder 0.15 / 0.29."""
    steps, batch, side = 300, 8, 16
    model = ae.build_autoencoder(
        "ae-f4-tiny",
        channels=4,
        multipliers=(1, 2, 2),
        mask_emb_dim=8,
        mask_rank=4,
        quantizer_config={"kind": "fsq", "levels": (16, 16, 16)},
    )
    rng = np.random.default_rng(0)
    data = blobs(rng, steps * batch).reshape(steps, batch, side, side, 3)
    train_masks = np.stack(
        [
            ae.sample_training_masks(
                step, batch, side, families=("square", "extrema", "half"), p_unmasked=0.25
            )
            for step in range(steps)
        ]
    ).astype(np.float32)
    # Model axis: 0 = aware (masks), 1 = unaware baseline (all known).
    pair_masks = np.stack([train_masks, np.ones_like(train_masks)], axis=1)
    params = jax.tree.map(
        lambda *p: jnp.stack(p),
        *(random_variables(model, seed, data[0], None, live=False)["params"] for seed in (0, 1)),
    )
    optimizer = optax.adam(3e-3)
    opt_state = jax.vmap(optimizer.init)(params)

    def loss_fn(params, x, known):
        out, _ = ae.mask_aware_targets(model, {"params": params}, x, known, train=False)
        reconstruction = ae.reconstruction_loss(out.x_hat, x)
        return reconstruction + out.aux_loss, reconstruction

    @jit
    def train_step(params, opt_state, x, known):
        def one(params, opt_state, known):
            grads, reconstruction = jax.grad(loss_fn, has_aux=True)(params, x, known)
            updates, opt_state = optimizer.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, reconstruction

        return jax.vmap(one)(params, opt_state, known)

    reconstruction = []
    for step in range(steps):
        params, opt_state, rec = train_step(params, opt_state, data[step], pair_masks[step])
        reconstruction.append(rec)
    reconstruction = np.asarray(reconstruction)  # [steps, 2]

    test_x = jnp.asarray(blobs(np.random.default_rng(1), 64))
    test_known = square_masks(7, 64, side)
    # The latents each model gives the masked images (the aware model modulated by the mask,
    # the baseline by an all-known mask) and the full images.
    modulation = jnp.stack([test_known, jnp.ones_like(test_known)])

    @jit
    def test_leakage(params):
        def one(params, modulation):
            x = jnp.concatenate([test_x * test_known[..., None], test_x])
            known = jnp.concatenate([modulation, jnp.ones_like(test_known)])
            z = model.apply({"params": params}, x, known, method="encode")
            return ae.leakage(z[:64], z[64:], ae.latent_mask(test_known, 4))

        return jax.vmap(one)(params, modulation)

    leak = np.asarray(test_leakage(params))
    assert leak[0] < 0.8 * leak[1], leak
    first, last = reconstruction[:10].mean(0), reconstruction[-20:].mean(0)
    assert np.all(last < 0.8 * first), (first, last)


# ---------------------------------------------------------------------------------------------
# Losses


def test_reconstruction_loss_and_leakage_values():
    x = jnp.zeros((1, 2, 2, 1))
    x_hat = jnp.asarray([1.0, -2.0, 3.0, 0.0]).reshape(1, 2, 2, 1)
    assert float(ae.reconstruction_loss(x_hat, x, "l1")) == pytest.approx(1.5)
    assert float(ae.reconstruction_loss(x_hat, x, "l2")) == pytest.approx(3.5)
    weights = jnp.asarray([2.0, 0.0, 1.0, 1.0]).reshape(1, 2, 2)
    assert float(ae.reconstruction_loss(x_hat, x, "l1", weights)) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'"):
        ae.reconstruction_loss(x_hat, x, "l3")
    with pytest.raises(ValueError, match=r"weight_map must be \[B, H, W\]"):
        ae.reconstruction_loss(x_hat, x, "l1", jnp.ones((1, 2, 2, 1)))

    z_full = jnp.asarray([1.0, -1.0, 1.0, -1.0]).reshape(1, 2, 2, 1)  # std 1
    z_masked = z_full + jnp.asarray([0.5, 4.0, -0.25, 9.0]).reshape(1, 2, 2, 1)
    tokens = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]]])
    assert float(ae.leakage(z_masked, z_full, tokens)) == pytest.approx(0.375)
    assert np.isnan(ae.leakage(z_masked, z_full, jnp.zeros_like(tokens)))


def test_gan_losses_on_known_logits():
    real = jnp.asarray([2.0, 0.5, -1.0])
    fake = jnp.asarray([-2.0, 0.0, 1.0])
    assert float(ae.discriminator_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert float(ae.generator_loss(fake)) == pytest.approx(1 / 3)

    def softplus(v):
        return np.log1p(np.exp(np.asarray(v, np.float64)))

    assert float(ae.discriminator_loss(real, fake, "non_saturating")) == pytest.approx(
        softplus(-real).mean() + softplus(fake).mean(), rel=1e-6
    )
    assert float(ae.generator_loss(fake, "non_saturating")) == pytest.approx(
        softplus(-fake).mean(), rel=1e-6
    )
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
        ae.generator_loss(fake, "wgan")


def test_patch_discriminator_shapes():
    x = images(0, 2, 32)
    for norm in ("none", "group"):
        disc = ae.PatchDiscriminator(channels=8, num_layers=3, norm=norm)
        logits = jit(disc.init_with_output)(KEY, x)[0]
        assert logits.shape == (2, 4, 4, 1) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"image size \(12, 12\) must be divisible by 8"):
        ae.PatchDiscriminator(channels=8).init(KEY, jnp.zeros((1, 12, 12, 3)))


def test_r1_penalty_equals_finite_differences():
    """R1 = mean over examples of the squared norm of d(sum of its logits)/d(image); the
    network is piecewise linear (convolutions and LeakyReLU), so central differences are exact
    away from the kinks."""
    disc = ae.PatchDiscriminator(channels=4, num_layers=1)
    x = images(3, 2, 4)[..., :1]  # [2, 4, 4, 1]: 16 coordinates per example
    params = jit(disc.init)(KEY, x)
    logits_fn = functools.partial(disc.apply, params)
    penalty = float(jit(functools.partial(ae.r1_penalty, logits_fn))(x))
    logits_fn = jit(logits_fn)
    eps = 1e-3  # at 1e-2 a few differences straddle a kink
    basis = np.eye(16, dtype=np.float32).reshape(16, 4, 4, 1) * eps
    estimate = 0.0
    for b in range(2):
        plus = logits_fn(x[b][None] + basis).sum(axis=(1, 2, 3))
        minus = logits_fn(x[b][None] - basis).sum(axis=(1, 2, 3))
        estimate += float(np.sum(np.square((plus - minus) / (2 * eps))))
    assert penalty == pytest.approx(estimate / 2, rel=2e-3)
    assert penalty > 0


# ---------------------------------------------------------------------------------------------
# Training masks


def test_training_masks_are_deterministic_and_mix_families_with_unmasked_rows():
    families = ("square", "half")
    draw = functools.partial(ae.sample_training_masks, families=families, p_unmasked=0.3)
    a = draw(11, 400, 16)
    assert a.shape == (400, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, draw(11, 400, 16))
    np.testing.assert_array_equal(draw(KEY, 8, 16), draw(jax.random.key(0), 8, 16))
    assert not np.array_equal(a, draw(12, 400, 16))
    unknown = masks.unknown_fraction(a)
    # Rows are unmasked (0), a square hole (1/4) or half the image (1/2).
    assert set(np.round(unknown, 4)) == {0.0, 0.25, 0.5}
    assert abs(np.mean(unknown == 0) - 0.3) < 0.08
    assert np.all(ae.sample_training_masks(0, 5, 16, families=("half",), p_unmasked=1.0) == 1)
    holes = ae.sample_training_masks(11, 50, (16, 8), families=("square",), p_unmasked=0.0)
    assert np.all(masks.unknown_fraction(holes) > 0)
    # Not the evaluation's stream of masks for the same seed.
    assert not np.array_equal(holes, masks.make_masks("square", 11, 50, (16, 8)))
    with pytest.raises(ValueError, match="unknown mask family 'blob'"):
        ae.sample_training_masks(0, 2, 16, families=("blob",))
    with pytest.raises(ValueError, match="p_unmasked must be a probability in"):
        ae.sample_training_masks(0, 2, 16, p_unmasked=1.5)
    with pytest.raises(ValueError, match="mask grid must be an int n >= 4"):
        ae.sample_training_masks(0, 2, 2)


# ---------------------------------------------------------------------------------------------
# RMSNorm in layers.norm_modulate


def test_rms_norm_modulate_equals_the_unfused_computation():
    """center=False: x / sqrt(mean(x^2) + eps) per location over the channels, then the
    per-location FiLM and SiLU; values and the gradients of x, gain and shift."""
    kx, kg, ks, kd = jax.random.split(jax.random.key(3), 4)
    x = 2.0 * jax.random.normal(kx, (2, 4, 6, 8)) + 0.7
    gain = 1.0 + 0.5 * jax.random.normal(kg, (2, 4, 6, 8))
    shift = 0.5 * jax.random.normal(ks, (2, 1, 1, 8))
    dy = jax.random.normal(kd, x.shape)

    def fused(x, gain, shift):
        return layers.norm_modulate(x, gain, shift, eps=1e-6, silu=True, center=False)

    def reference(x, gain, shift):
        xhat = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
        return jax.nn.silu(xhat * gain + shift)

    @jit
    def run(x, gain, shift, dy):
        out, vjp = jax.vjp(fused, x, gain, shift)
        ref_out, ref_vjp = jax.vjp(reference, x, gain, shift)
        centred = layers.norm_modulate(x, gain, shift, eps=1e-6, silu=True)
        return out, vjp(dy), ref_out, ref_vjp(dy), centred

    out, grads, ref_out, ref_grads, centred = run(x, gain, shift, dy)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The mean matters: centring gives a different result on data with a non-zero mean.
    assert np.abs(centred - out).max() > 0.1
