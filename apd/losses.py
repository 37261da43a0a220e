"""The per-token weighted denoising loss (paper Eq. 2).

    L = sum_i w(t_i) * || target_i - prediction_i(z_t, t) ||^2

Each token's weight depends only on its own level. Weightings are defined, as in Kingma & Gao
(2023), as a weight on the noise-space error || eps - eps_hat ||^2 and then converted to the
prediction's own space, so the same name means the same objective whatever the network predicts:

  'elbo'     1/2 * (-dlogSNR/dt): the per-token ELBO integrand (t ~ U(0, 1) per token);
  'sid2'     1/2 * (-dlogSNR/dt) * sigmoid(bias - logSNR): SiD2's sigmoid weighting;
  'min_snr'  min(SNR, gamma) / SNR: Min-SNR-gamma (Hang et al. 2023) on the x-space error;
  'uniform'  plain mean squared error in the prediction's own space.

Tokens at level 0 (clean context) carry zero weight.
"""

import jax
import jax.numpy as jnp

from apd import checks, corruption
from apd.schedules import Schedule

Array = jax.Array

WEIGHTINGS = ("sid2", "elbo", "min_snr", "uniform")

# Weights are evaluated at levels clipped to [T_EPS, 1 - T_EPS]: at the exact ends logSNR and its
# derivative are infinite. Clean tokens (t = 0) are masked out afterwards.
T_EPS = 1e-5


def eps_space_factor(alpha: Array, sigma: Array, prediction: str) -> Array:
    """c with || eps - eps_hat ||^2 = c * || target - pred ||^2 for the given prediction type."""
    checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)
    if prediction == "eps":
        return jnp.ones_like(alpha)
    if prediction == "x":
        return jnp.square(alpha / sigma)
    return jnp.square(alpha / (alpha + sigma))


def token_weights(
    levels: Array,
    schedule: Schedule,
    *,
    prediction: str = "v",
    weighting: str = "sid2",
    sid2_bias: float = -1.0,
    min_snr_gamma: float = 5.0,
) -> Array:
    """Per-token weight on the prediction-space squared error.

    Args:
      levels: [B, *tokens] float32 in [0, 1].
      schedule: the noise schedule.
      prediction: 'x', 'eps' or 'v'.
      weighting: one of WEIGHTINGS.
      sid2_bias: the bias b of 'sid2' (sigmoid(b - logSNR)).
      min_snr_gamma: gamma of 'min_snr'.
    Returns:
      [B, *tokens] float32, >= 0, exactly 0 where the level is 0.
    """
    checks.check_choice("loss weighting", weighting, WEIGHTINGS)
    checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)
    levels = jnp.asarray(levels, jnp.float32)
    t = jnp.clip(levels, T_EPS, 1.0 - T_EPS)
    alpha, sigma = schedule.alpha_sigma(t)
    log_snr = schedule.log_snr(t)
    factor = eps_space_factor(alpha, sigma, prediction)
    if weighting == "uniform":
        weight = jnp.ones_like(t)
    elif weighting == "min_snr":
        weight = factor * jnp.minimum(1.0, min_snr_gamma * jnp.exp(-log_snr))
    else:
        weight = 0.5 * (-schedule.d_log_snr(t)) * factor
        if weighting == "sid2":
            weight = weight * jax.nn.sigmoid(sid2_bias - log_snr)
    return jnp.where(levels > 0.0, weight, 0.0)


def weighted_loss(
    pred: Array,
    x: Array,
    eps: Array,
    levels: Array,
    schedule: Schedule,
    *,
    prediction: str = "v",
    weighting: str = "sid2",
    sid2_bias: float = -1.0,
    min_snr_gamma: float = 5.0,
) -> tuple[Array, Array]:
    """The weighted denoising loss.

    Args:
      pred: [B, *tokens, C] network output of type `prediction`.
      x: [B, *tokens, C] clean data.
      eps: [B, *tokens, C] the noise used to make z.
      levels: [B, *tokens] float32 in [0, 1] (size-1 axes broadcast); level-0 tokens are context.
      schedule, prediction, weighting, sid2_bias, min_snr_gamma: see `token_weights`.
    Returns:
      (per_example [B], per_token [B, *tokens]) float32: per_token is the weighted squared error
      averaged over channels; per_example its mean over all tokens (context tokens count as zero,
      so the loss is Eq. 2's sum over tokens divided by the token count).
    """
    err = jnp.mean(
        jnp.square(pred.astype(jnp.float32) - corruption.target(x, eps, prediction)), axis=-1
    )
    weights = token_weights(
        levels,
        schedule,
        prediction=prediction,
        weighting=weighting,
        sid2_bias=sid2_bias,
        min_snr_gamma=min_snr_gamma,
    )
    per_token = weights * err
    per_example = jnp.mean(per_token.reshape(per_token.shape[0], -1), axis=-1)
    return per_example, per_token


def bucket_by_level(values: Array, levels: Array, num_buckets: int = 10) -> tuple[Array, Array]:
    """Sums and counts of per-token values in equal-width buckets of the tokens' own levels.

    Clean context tokens (level 0) are left out. Used for the training metric "loss per level".

    Args:
      values: [B, *tokens] float32, e.g. `weighted_loss`'s per_token.
      levels: broadcastable to values, float32 in [0, 1].
      num_buckets: number of buckets over (0, 1].
    Returns:
      (sums [num_buckets], counts [num_buckets]) float32; mean = sums / max(counts, 1).
    """
    levels = jnp.broadcast_to(jnp.asarray(levels, jnp.float32), values.shape)
    index = jnp.clip(jnp.ceil(levels * num_buckets).astype(jnp.int32) - 1, 0, num_buckets - 1)
    onehot = jax.nn.one_hot(index, num_buckets, dtype=jnp.float32) * (levels > 0.0)[..., None]
    flat = onehot.reshape(-1, num_buckets)
    return values.reshape(-1) @ flat, jnp.sum(flat, axis=0)
