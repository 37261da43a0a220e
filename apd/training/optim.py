"""The optimizer from config: Adam(W) with linear warmup and global-norm gradient clipping."""

import ml_collections as mc
import optax

DECAYS = ("constant", "cosine")


def learning_rate(cfg: mc.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over `cfg.warmup_steps`, then constant or cosine decay to zero."""
    if cfg.decay not in DECAYS:
        raise ValueError(
            f"unknown optimizer.decay {cfg.decay!r}; expected one of {sorted(DECAYS)}."
        )
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1))
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), after], boundaries=[warmup]
    )


def make(cfg: mc.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Adam (AdamW when weight_decay > 0) after clipping the gradient's global norm."""
    chain = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
    )
    return optax.chain(*chain)
