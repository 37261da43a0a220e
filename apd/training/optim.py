"""The optimizer from config: Adam(W) with linear warmup and global-norm gradient clipping."""

import ml_collections as mc
import optax

DECAYS = ("constant", "cosine", "cooldown")


def learning_rate(cfg: mc.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup over `cfg.warmup_steps`, then one of `DECAYS`: constant, cosine decay to
    zero at `total_steps`, or constant with a linear cooldown to zero over the last
    `cfg.cooldown_steps` steps (warmup-stable-decay: a run extended by more steps keeps its
    constant phase and cools down at its new end)."""
    if cfg.decay not in DECAYS:
        raise ValueError(
            f"unknown optimizer.decay {cfg.decay!r}; expected one of {sorted(DECAYS)}."
        )
    warmup = max(int(cfg.warmup_steps), 0)
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1))
    else:
        cooldown = cfg.get("cooldown_steps", 0)
        if not isinstance(cooldown, int) or not 0 < cooldown <= total_steps - warmup:
            raise ValueError(
                "optimizer.decay='cooldown' needs optimizer.cooldown_steps, an int in "
                f"(0, total_steps - warmup_steps] = (0, {total_steps - warmup}]; "
                f"got {cooldown!r}."
            )
        after = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, 0.0, cooldown)],
            boundaries=[total_steps - warmup - cooldown],
        )
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
