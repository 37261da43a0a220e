"""The `autoencoder` task: the mask-aware autoencoder (`apd.models.autoencoder`) trained through
apd's one training loop (`config.task = 'autoencoder'`; `python -m apd.train_autoencoder`).

State (`AutoencoderState`): the loop's fields (step, params, ema_params, opt_state, rng) and the
quantiser's statistics (collection `quantizers.STATS`: a VQ codebook's EMA cluster sizes and
sums, dead-code counters; empty for FSQ). params = {'autoencoder': ..., 'discriminator': ...},
the discriminator only when `config.adversarial.weight > 0`; ema_params is the EMA of the
autoencoder's parameters; opt_state holds one optimizer state per network, under the same keys.

One step, with every random draw derived from fold_in(state.key, state.step) (exact resume):

    known  = masks for the batch (`draw_masks`: one mask per example from a fixed bank of
             `sample_training_masks`, drawn when the step is compiled, flipped and
             transposed at random)                                                   [B, H, W]
    out    = mask_aware_targets(autoencoder, x, known)     (the training rule; updates the
             quantiser's statistics, dead-code restarts from the 'quantizer' rng stream)
    loss   = reconstruction_weight * reconstruction_loss(out.x_hat, x) + out.aux_loss
             + [weight * generator_loss(D(out.x_hat)) from step `start_step` on]
    D loss = discriminator_loss(D(x), D(sg(out.x_hat))) + r1_gamma / 2 * r1_penalty(D, x)
             (every step from step 0: the discriminator has learned something by the time the
             generator's adversarial term switches on, VQGAN's remedy for a term that otherwise
             starts out as noise)

Both networks are updated from the parameters the step starts from, each by its own optimizer
(`config.optimizer`, `config.adversarial.optimizer`). No perceptual (LPIPS) term: its AlexNet
weights are not part of apd (`apd.evaluation.lpips` reads them from a converted file).

Metrics: loss (the autoencoder's total), grad_norm (both networks' gradients), param_norm (both
networks), ema_norm, reconstruction, psnr (of the batch's reconstructions clipped to [-1, 1]),
the training rule's metrics (consistency, quantizer_loss, leakage, known_tokens, quantizer/usage,
quantizer/perplexity, ...), and with a discriminator adversarial_loss (the weighted term added
to loss: 0 before start_step), discriminator/loss, discriminator/r1,
discriminator/logits_real, discriminator/logits_fake, discriminator/grad_norm.
"""

import math
import numbers
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax

from apd import checks
from apd import data as data_lib
from apd.evaluation import image_metrics
from apd.evaluation import masks as mask_families
from apd.models import autoencoder as ae
from apd.models import quantizers
from apd.sampling import images as sample_images
from apd.training import builder, optim
from apd.training import mesh as mesh_lib
from apd.training import state as state_lib

TASK = "autoencoder"

VISUAL_FAMILIES = (None, "square", "extrema", "thin", "wide", "half", "perlin")
"""The masks of the reconstruction grids' rows, in turn: None (all known), then mask families
(`apd.evaluation.masks`) drawn at the run's seed."""


@flax.struct.dataclass
class AutoencoderState(state_lib.TrainState):
    """TrainState plus quantizer_stats: the quantiser's statistics collection ({} for FSQ).

    A subclass, not a field of TrainState: Orbax refuses to restore a checkpoint into a target
    with keys it does not hold, so diffusion checkpoints keep TrainState's exact fields."""

    quantizer_stats: Any


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def mask_bank(config: mc.ConfigDict, grid: tuple[int, int]) -> np.ndarray:
    """The run's training masks: `sample_training_masks(config.seed, config.masks.bank_size,
    grid, families=config.masks.families, p_unmasked=config.masks.p_unmasked)`, uint8
    [bank_size, H, W] (1 = known pixel); the same on every process and every relaunch."""
    cfg = config.masks
    return ae.sample_training_masks(
        config.seed,
        cfg.bank_size,
        grid,
        families=tuple(cfg.families),
        p_unmasked=cfg.p_unmasked,
    )


def draw_masks(key: jax.Array, bank: jax.Array, batch: int) -> jax.Array:
    """One mask per example, jit-able: a bank mask drawn uniformly, then flipped up-down and
    left-right, each with probability 1/2, and for square masks transposed with probability 1/2
    (up to 8 variants of each bank mask, each of the same kind: a box stays a box of its size, a
    half a half, a stroke a stroke; 'top', a sampling-only family, becomes any half).

    Args:
      key: a PRNG key.
      bank: [N, H, W] masks in {0, 1} (`mask_bank`).
      batch: B.
    Returns:
      float32 [B, H, W] in {0, 1}, 1 = known pixel.
    """
    k_pick, k_map = jax.random.split(key)
    picks = jax.random.randint(k_pick, (batch,), 0, bank.shape[0])
    known = jnp.take(bank, picks, axis=0).astype(jnp.float32)
    maps = jax.random.bernoulli(k_map, 0.5, (3, batch, 1, 1))
    known = jnp.where(maps[0], known[:, ::-1, :], known)
    known = jnp.where(maps[1], known[:, :, ::-1], known)
    if known.shape[1] == known.shape[2]:
        known = jnp.where(maps[2], jnp.swapaxes(known, 1, 2), known)
    return known


def visual_masks(seed: int, num: int, grid: tuple[int, int]) -> np.ndarray:
    """The reconstruction grids' fixed masks: row i takes VISUAL_FAMILIES[i % 7] (None: all
    known), mask i of that family at `seed`. uint8 [num, H, W]."""
    known = np.ones((num, *grid), np.uint8)
    for i in range(num):
        family = VISUAL_FAMILIES[i % len(VISUAL_FAMILIES)]
        if family is not None:
            known[i] = mask_families.make_masks(family, seed, i + 1, grid)[i]
    return known


# ---------------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------------


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_at_least(name: str, value, low, integer: bool = False) -> None:
    ok = (_int(value) if integer else _real(value)) and value >= low
    if not ok or (not integer and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite real number"
        raise ValueError(f"config.{name} must be {kind} >= {low}; got {value!r}.")


def build_model(config: mc.ConfigDict, image_channels: int) -> ae.Autoencoder:
    """The autoencoder `config.model.name` names, with `config.model.options` applied."""
    return ae.build_autoencoder(
        config.model.name, image_channels=image_channels, **config.model.options.to_dict()
    )


def build_discriminator(config: mc.ConfigDict) -> ae.PatchDiscriminator | None:
    """The PatchGAN discriminator of `config.adversarial`, or None when its weight is 0."""
    adv = config.adversarial
    if not adv.weight:
        return None
    return ae.PatchDiscriminator(
        channels=adv.channels, num_layers=adv.num_layers, norm=adv.norm, norm_groups=adv.groups
    )


class Autoencoder:
    """The mask-aware autoencoder with an optional PatchGAN term (see the module docstring)."""

    def check(self, config, image_shape, num_classes) -> None:
        """ValueError naming the first bad value: the model and its options, the image size
        against the factor, the loss kinds and weights, the masks, the adversarial block, the
        EMA decay, the visualisation count."""
        del num_classes
        model = build_model(config, image_shape[-1])
        height, width = image_shape[:2]
        if height % model.factor or width % model.factor:
            raise ValueError(
                f"image size {(height, width)} must be divisible by the autoencoder's factor "
                f"{model.factor} ({config.model.name!r}: {len(model.multipliers)} resolution "
                "levels); set --config.data.image_size to a multiple of it."
            )
        loss = config.loss
        checks.check_choice(
            "config.loss.reconstruction", loss.reconstruction, ae.RECONSTRUCTION_KINDS
        )
        _check_at_least("loss.reconstruction_weight", loss.reconstruction_weight, 0)
        _check_at_least("loss.consistency_weight", loss.consistency_weight, 0)
        _check_at_least("ema_decay", config.ema_decay, 0)
        if not config.ema_decay < 1:
            raise ValueError(f"config.ema_decay must lie in [0, 1); got {config.ema_decay!r}.")

        masks = config.masks
        _check_at_least("masks.bank_size", masks.bank_size, 1, integer=True)
        families = tuple(masks.families)
        if not families:
            raise ValueError(
                f"config.masks.families must name at least one family of "
                f"{list(mask_families.ALL_FAMILIES)}; got none."
            )
        for family in families:
            checks.check_choice("config.masks.families", family, mask_families.ALL_FAMILIES)
        p = masks.p_unmasked
        if not _real(p) or not 0 <= p <= 1:
            raise ValueError(f"config.masks.p_unmasked must be a probability in [0, 1]; got {p!r}.")
        if min(height, width) < 4:
            raise ValueError(
                f"training masks need images of at least 4 x 4 pixels; got {image_shape}."
            )

        adv = config.adversarial
        _check_at_least("adversarial.weight", adv.weight, 0)
        _check_at_least("adversarial.start_step", adv.start_step, 0, integer=True)
        _check_at_least("adversarial.r1_gamma", adv.r1_gamma, 0)
        checks.check_choice("config.adversarial.loss", adv.loss, ae.GAN_KINDS)
        checks.check_choice("config.adversarial.norm", adv.norm, ae.DISCRIMINATOR_NORMS)
        _check_at_least("adversarial.channels", adv.channels, 1, integer=True)
        _check_at_least("adversarial.groups", adv.groups, 1, integer=True)
        _check_at_least("adversarial.num_layers", adv.num_layers, 1, integer=True)
        side = 2**adv.num_layers
        if adv.weight and (height % side or width % side):
            raise ValueError(
                f"image size {(height, width)} must be divisible by 2^adversarial.num_layers = "
                f"{side} (the discriminator's strides); lower config.adversarial.num_layers."
            )
        optim.learning_rate(adv.optimizer, config.total_steps)
        if config.get("sample_every_steps", 0):
            _check_at_least("sample.num", config.sample.num, 1, integer=True)

    def build(self, config, mesh, image_shape, num_classes) -> builder.Run:
        del num_classes
        image_shape = tuple(image_shape)
        model = build_model(config, image_shape[-1])
        disc = build_discriminator(config)
        txs = {"autoencoder": optim.make(config.optimizer, config.total_steps)}
        if disc is not None:
            txs["discriminator"] = optim.make(config.adversarial.optimizer, config.total_steps)

        def init_fn(key):
            x = jnp.zeros((1, *image_shape), jnp.float32)
            k_ae, k_disc = jax.random.split(init_key(key))
            initial = model.init({"params": k_ae}, x, jnp.ones((1, *image_shape[:2])))
            params = {"autoencoder": initial["params"]}
            if disc is not None:
                params["discriminator"] = disc.init(k_disc, x)["params"]
            return AutoencoderState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                ema_params=params["autoencoder"],
                opt_state={name: tx.init(params[name]) for name, tx in txs.items()},
                rng=jax.random.key_data(key),
                quantizer_stats=dict(initial.get(quantizers.STATS, {})),
            )

        abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
        step_fn = make_train_step(
            model, disc, txs, config, image_shape, mesh_lib.batch_sharding(mesh)
        )
        description = builder.model_description(
            {
                "task": TASK,
                **config.model.to_dict(),
                "image_shape": list(image_shape),
                "discriminator": _discriminator_description(config),
            },
            # The quantiser's statistics are part of the hash: a VQ codebook with EMA updates
            # and FSQ have the same parameters but not the same state.
            {"params": abstract.params, quantizers.STATS: abstract.quantizer_stats},
        )
        description["num_params"] = int(sum(x.size for x in jax.tree.leaves(abstract.params)))
        return builder.assemble(config, mesh, model, init_fn, step_fn, abstract, description)

    def visualiser(self, config, prepared):
        """Reconstruction grids of the first `config.sample.num` test images, each row with its
        fixed mask (`visual_masks`): original | masked input | reconstruction, the latter by the
        training rule with the EMA parameters (known tokens from the masked image, the other
        tokens from the full image: what the decoder meets when the diffusion model's latents
        are exact) into WORKDIR/samples/step_N.png."""
        if not config.get("sample_every_steps", 0):
            return None
        model = prepared.run.model
        num = config.sample.num
        x, _ = data_lib.read_images(config.data, "test", num, at_most=True)
        known = visual_masks(config.seed, len(x), prepared.image_shape[:2])
        consistency_weight = float(config.loss.consistency_weight)

        def reconstruct(params, stats, x, known):
            out, _ = ae.mask_aware_targets(
                model,
                variables(params, stats),
                x,
                known,
                train=False,
                consistency_weight=consistency_weight,
            )
            return out.x_hat

        reconstruct = jax.jit(reconstruct, out_shardings=mesh_lib.replicated(prepared.mesh))

        def visualise(state, step: int, workdir: str) -> None:
            x_hat = jax.device_get(reconstruct(state.ema_params, state.quantizer_stats, x, known))
            if jax.process_index() == 0:
                panel = sample_images.side_by_side(
                    x, sample_images.masked_input_image(x, known == 1), np.clip(x_hat, -1, 1)
                )
                sample_images.write_png(
                    os.path.join(workdir, "samples", f"step_{step:08d}.png"),
                    sample_images.grid(panel, columns=1),
                )

        return visualise


def init_key(key: jax.Array) -> jax.Array:
    """The key the initial parameters are drawn from: an 'rbg' key (XLA's RngBitGenerator) made of
    the run's base key's words (repeated to rbg's four).

    XLA:CPU compiles the autoencoder's ~130 threefry parameter draws slowly: 41 CPU-seconds for
    the smoke model with its discriminator, 14 with rbg. rbg draws the same values for any device
    count and sharding (checked for 1 device, 8 data-parallel and 2 x 4 data x fsdp), but unlike
    threefry not necessarily on another backend or XLA version; only the initial values depend on
    it (checkpoints hold the parameters, and every step's randomness is threefry).
    """
    words = jnp.resize(jax.random.key_data(key).ravel(), (4,))
    return jax.random.wrap_key_data(words, impl="rbg")


def variables(params: Any, stats: Any) -> dict[str, Any]:
    """The autoencoder's variables from its parameters and its quantiser's statistics."""
    return {"params": params, quantizers.STATS: stats} if stats else {"params": params}


def _discriminator_description(config: mc.ConfigDict) -> dict | None:
    adv = config.adversarial
    if not adv.weight:
        return None
    return {k: adv[k] for k in ("channels", "num_layers", "norm", "groups")}


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def make_train_step(
    model: ae.Autoencoder,
    disc: ae.PatchDiscriminator | None,
    txs: dict[str, optax.GradientTransformation],
    config: mc.ConfigDict,
    image_shape: tuple[int, int, int],
    batch_sharding: jax.sharding.Sharding | None = None,
):
    """Returns `step(state, batch) -> (state, metrics)` (not yet jitted; module docstring).

    Args:
      model: the autoencoder.
      disc: the discriminator, or None (no adversarial term).
      txs: one optimizer per network, keyed like state.params.
      config: the experiment config (reads `loss`, `masks`, `adversarial`, `ema_decay`, `seed`).
      image_shape: (H, W, C) of one example.
      batch_sharding: sharding of batch-major arrays (the masks), or None.
    """
    loss_cfg, adv = config.loss, config.adversarial
    kind = loss_cfg.reconstruction
    reconstruction_weight = float(loss_cfg.reconstruction_weight)
    consistency_weight = float(loss_cfg.consistency_weight)
    adv_weight, start_step = float(adv.weight), int(adv.start_step)
    r1_gamma, gan_kind = float(adv.r1_gamma), adv.loss
    ema_decay = config.ema_decay
    grid = tuple(image_shape[:2])
    bank_cache: list[np.ndarray] = []

    def bank() -> np.ndarray:
        # Drawn when the step is first traced (not when the run is prepared: `loop.prepare`
        # stays quick), eagerly: the 'perlin' family runs a jitted function of its own.
        if not bank_cache:
            with jax.ensure_compile_time_eval():
                bank_cache.append(mask_bank(config, grid))
        return bank_cache[0]

    def constrain(x):
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    def step(state: AutoencoderState, batch):
        x = batch["image"]
        batch_size = x.shape[0]
        key = jax.random.fold_in(state.key, state.step)
        k_masks, k_quantizer = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
        known = constrain(draw_masks(k_masks, jnp.asarray(bank()), batch_size))
        d_params = state.params.get("discriminator")
        adv_scale = jnp.where(state.step >= start_step, adv_weight, 0.0)

        def ae_loss(params):
            out, updated = ae.mask_aware_targets(
                model,
                variables(params, state.quantizer_stats),
                x,
                known,
                rngs={quantizers.RNG: k_quantizer},
                train=True,
                consistency_weight=consistency_weight,
            )
            reconstruction = ae.reconstruction_loss(out.x_hat, x, kind)
            loss = reconstruction_weight * reconstruction + out.aux_loss
            adversarial = jnp.zeros((), jnp.float32)
            if disc is not None:
                logits = disc.apply({"params": jax.lax.stop_gradient(d_params)}, out.x_hat)
                adversarial = adv_scale * ae.generator_loss(logits, gan_kind)
                loss = loss + adversarial
            return loss, (out, updated, reconstruction, adversarial)

        (loss, (out, updated, reconstruction, adversarial)), ae_grads = jax.value_and_grad(
            ae_loss, has_aux=True
        )(state.params["autoencoder"])
        grads = {"autoencoder": ae_grads}
        x_hat = out.x_hat
        metrics = {
            "loss": loss,
            "reconstruction": reconstruction,
            "psnr": jnp.mean(image_metrics.capped_psnr(jnp.clip(x_hat, -1.0, 1.0), x)),
            **out.metrics,
        }
        if disc is not None:
            fake = jax.lax.stop_gradient(x_hat)

            def d_loss(params):
                def logits_fn(images):
                    return disc.apply({"params": params}, images)

                real_logits, fake_logits = logits_fn(x), logits_fn(fake)
                d = ae.discriminator_loss(real_logits, fake_logits, gan_kind)
                r1 = ae.r1_penalty(logits_fn, x) if r1_gamma else jnp.zeros((), jnp.float32)
                return d + 0.5 * r1_gamma * r1, (d, r1, real_logits, fake_logits)

            (_, (d, r1, real_logits, fake_logits)), d_grads = jax.value_and_grad(
                d_loss, has_aux=True
            )(d_params)
            grads["discriminator"] = d_grads
            metrics |= {
                "adversarial_loss": adversarial,
                "discriminator/loss": d,
                "discriminator/r1": r1,
                "discriminator/logits_real": jnp.mean(real_logits),
                "discriminator/logits_fake": jnp.mean(fake_logits),
                "discriminator/grad_norm": optax.tree.norm(d_grads),
            }

        params, opt_state = {}, {}
        for name, tx in txs.items():
            updates, opt_state[name] = tx.update(
                grads[name], state.opt_state[name], state.params[name]
            )
            params[name] = optax.apply_updates(state.params[name], updates)
        ema = state_lib.update_ema(
            state.ema_params, params["autoencoder"], state_lib.ema_decay(state.step, ema_decay)
        )
        metrics |= {
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "ema_norm": optax.tree.norm(ema),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            quantizer_stats=dict(updated.get(quantizers.STATS, state.quantizer_stats)),
        )
        return new_state, metrics

    return step
