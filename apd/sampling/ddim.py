"""Per-token DDIM steps for z = alpha(t) x + sigma(t) eps, with any schedule.

Each token i has its own level: it moves from t_i (now) to s_i (next). The forward process is
independent per token, so the DDIM family of method.md §7 is the scalar one applied per token.
With a_t, s_t = alpha(t_i), sigma(t_i) and a_s, s_s = alpha(s_i), sigma(s_i), the posterior of the
per-token process is

    q(z_s | z_t, x) = N(mu, c_1^2),  c_1^2 = s_s^2 (1 - SNR(t) / SNR(s)),
    mu = a_s x + sqrt(s_s^2 - c_1^2) (z_t - a_t x) / s_t,

(SNR = alpha^2 / sigma^2; for a variance-preserving schedule c_1 is DDPM's posterior standard
deviation). The DDIM step with stochastic coefficient eta replaces x and (z_t - a_t x) / s_t by
the network's x_hat and eps_hat and uses c = eta * c_1:

    z_s = a_s x_hat + sqrt(s_s^2 - c^2) eps_hat + c * noise.

eta = 1 is the ancestral sampler (exact posterior sampling given x), eta = 0 deterministic DDIM.
A token with s_i = t_i is returned unchanged, bit for bit.

Both coefficients are computed from r^2 = SNR(t) / SNR(s) = (a_t s_s / (a_s s_t))^2 without a
difference of squares of sigmas:

    c = eta s_s sqrt(1 - r^2),    sqrt(s_s^2 - c^2) = s_s sqrt((1 - eta^2) + eta^2 r^2).

Written as sqrt(s_s^2 - c^2), the float32 rounding of c^2 (and XLA's fused multiply-adds under
jit) leaves a residue of order 1e-8 s_s^2 where the true value is 0 (eta = 1, first step from a
level with alpha = 0), which the square root turns into up to ~5e-4 s_s (measured on CPU). At
alpha_t = 0 (level 1 of the built-in schedules) r = 0 exactly, so the eta = 1 step from pure
noise has no eps_hat term.
"""

import jax
import jax.numpy as jnp

from apd.schedules import Schedule

Array = jax.Array


def ddim_step(
    z: Array,
    x_hat: Array,
    eps_hat: Array,
    t: Array,
    s: Array,
    noise: Array,
    eta: float | Array,
    schedule: Schedule,
) -> Array:
    """One per-token DDIM step from levels t to levels s <= t.

    Args:
      z: [B, *tokens, C] float32, the state at levels t.
      x_hat, eps_hat: like z, the predicted clean data and noise.
      t: [B, *tokens] float32 in [0, 1], the levels now.
      s: [B, *tokens] float32 in [0, 1], the levels next, s <= t.
      noise: like z, standard normal.
      eta: scalar in [0, 1] (may be traced).
      schedule: the noise schedule.
    Returns:
      z at levels s, like z; tokens with s == t are z unchanged.
    """
    t, s = t[..., None], s[..., None]
    moves = s < t
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    # r = sqrt(SNR(t) / SNR(s)) in [0, 1]; a_s > 0 and s_t > 0 wherever s < t <= 1; r = 0
    # exactly where a_t = 0.
    ratio_sq = jnp.square((a_t * s_s) / jnp.where(moves, a_s * s_t, 1.0))
    eta_sq = jnp.square(eta)
    c = eta * s_s * jnp.sqrt(jnp.clip(1.0 - ratio_sq, 0.0, 1.0))
    # sqrt(s_s^2 - c^2) without the subtraction (see the module docstring).
    direction = s_s * jnp.sqrt((1.0 - eta_sq) + eta_sq * jnp.minimum(ratio_sq, 1.0))
    z_s = a_s * x_hat + direction * eps_hat + c * noise
    return jnp.where(moves, z_s, z)


def forward_step(z: Array, t: Array, s: Array, noise: Array, schedule: Schedule) -> Array:
    """Adds noise per token from level t to a noisier level s >= t: a draw of q(z_s | z_t).

        z_s = (a_s / a_t) z_t + sqrt(s_s^2 - (a_s / a_t)^2 s_t^2) noise.

    Args:
      z: [B, *tokens, C] float32 at levels t.
      t, s: [B, *tokens] float32 in [0, 1], s >= t.
      noise: like z, standard normal.
      schedule: the noise schedule.
    Returns:
      z at levels s; tokens with s == t unchanged, bit for bit.
    """
    t, s = t[..., None], s[..., None]
    moves = s > t
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    gain = a_s / jnp.where(moves, a_t, 1.0)  # a_t > 0 wherever t < s <= 1
    spread = jnp.sqrt(jnp.maximum(jnp.square(s_s) - jnp.square(gain * s_t), 0.0))
    return jnp.where(moves, gain * z + spread * noise, z)


def noised(x: Array, levels: Array, noise: Array, schedule: Schedule) -> Array:
    """alpha(t) x + sigma(t) noise per token, and exactly x where the level is 0.

    This is the sampler's start state (a draw of q(z_t | x)): a token at level 1 starts at
    alpha(1) x + sigma(1) noise = sigma(1) noise, which is the plain standard normal noise that
    diffusers-style samplers start from only when sigma(1) = 1 (true of the built-in schedules,
    with or without a shift; a schedule with sigma(1) != 1 starts from scaled noise here).

    Args:
      x: [B, *tokens, C] float32; levels: [B, *tokens] in [0, 1]; noise: like x.
    """
    alpha, sigma = schedule.alpha_sigma(levels[..., None])
    return jnp.where(levels[..., None] == 0.0, x, alpha * x + sigma * noise)
