"""The jitted training step: sample level maps and noise on device, one update, the metrics.

Everything random is derived from the run's base key folded with the step, and drawn as global
arrays sharded over the batch: each device gets its own slice, and the values do not depend on the
device count (partitionable threefry), so a run on 8 devices matches a run on 1.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import optax

from apd import corruption, levels, losses, schedules
from apd.training import state as state_lib

NUM_LEVEL_BUCKETS = 10


def schedule_from_config(cfg: mc.ConfigDict) -> schedules.Schedule:
    return schedules.get(cfg.diffusion.schedule, cfg.diffusion.shift)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: mc.ConfigDict,
    token_grid: tuple[int, ...],
    num_classes: int,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[state_lib.TrainState, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array]]]:
    """Returns `step(state, batch) -> (state, metrics)` (not yet jitted).

    Args:
      model: the backbone; `model.apply({'params': p}, z, levels, labels, train=True, rngs=...)`.
      tx: the optimizer.
      config: the experiment config (reads `diffusion`, `levels`, `ema_decay`).
      token_grid: the level-map grid (H, W) of one example.
      num_classes: 0 for unconditional; else label `num_classes` is the null label.
      batch_sharding: sharding of batch-major arrays (level maps, noise), or None.
    Returns:
      The step. batch: {'image': [B, H, W, C] float32 in [-1, 1], 'label': [B] int32}.
      metrics: loss and grad_norm (of the parameters the step starts from), param_norm and
      ema_norm (of the updated parameters and EMA: the loop saves no state whose norms are not
      finite), scalars; loss_per_level (sums [10]) and tokens_per_level (counts [10]) over the
      tokens' own levels.
    """
    schedule = schedule_from_config(config)
    diff = config.diffusion
    sampler = config.levels.name
    sampler_params = dict(config.levels.params)
    ema_decay = config.ema_decay

    def constrain(x):
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    def step(state, batch):
        x = batch["image"]
        batch_size = x.shape[0]
        key = jax.random.fold_in(state.key, state.step)
        k_levels, k_noise, k_label, k_dropout = jax.random.split(key, 4)
        level_map = constrain(
            levels.sample(sampler, k_levels, batch_size, token_grid, **sampler_params)
        )
        eps = constrain(jax.random.normal(k_noise, x.shape, jnp.float32))
        z = corruption.corrupt(x, eps, level_map, schedule)
        labels = None
        if num_classes:
            drop = jax.random.bernoulli(k_label, diff.label_dropout, (batch_size,))
            labels = jnp.where(drop, num_classes, batch["label"])

        def loss_fn(params):
            pred = model.apply(
                {"params": params}, z, level_map, labels, train=True, rngs={"dropout": k_dropout}
            )
            per_example, per_token = losses.weighted_loss(
                pred,
                x,
                eps,
                level_map,
                schedule,
                prediction=diff.prediction,
                weighting=diff.weighting,
                sid2_bias=diff.sid2_bias,
                min_snr_gamma=diff.min_snr_gamma,
            )
            return jnp.mean(per_example), per_token

        (loss, per_token), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state_lib.update_ema(
            state.ema_params, params, state_lib.ema_decay(state.step, ema_decay)
        )
        sums, counts = losses.bucket_by_level(per_token, level_map, NUM_LEVEL_BUCKETS)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "ema_norm": optax.tree.norm(ema),
            "loss_per_level": sums,
            "tokens_per_level": counts,
        }
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        return new_state, metrics

    return step
