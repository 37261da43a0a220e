"""Noise schedules: elementwise maps from a level t in [0, 1] to (alpha, sigma).

z = alpha(t) * x + sigma(t) * eps, with t = 0 clean and t = 1 pure noise. Every function here is
elementwise over a level array of any shape ([B], [B, H, W], [B, h, w], ...), so one schedule serves
per-sample levels and per-token level maps alike.

Schedules are frozen dataclasses: hashable, so they pass to `jax.jit` as static arguments.

The logSNR shift (`shift`) moves the whole schedule towards noise by `2 * log(shift)`, the
resolution correction of SiD2 / SD3: for rectified flow it is exactly SD3's
t' = shift * t / (1 + (shift - 1) * t). `shift_for_resolution` gives the usual choice.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses define `alpha_sigma`; everything else follows from it."""

    shift: float = 1.0

    def __post_init__(self):
        if not (
            isinstance(self.shift, (int, float)) and self.shift > 0 and math.isfinite(self.shift)
        ):
            raise ValueError(
                f"schedule shift must be a positive finite number; got {self.shift!r}."
            )

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        """(alpha, sigma), each shaped like t, for levels t in [0, 1]."""
        raise NotImplementedError

    def alpha(self, t: Array) -> Array:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Array) -> Array:
        return self.alpha_sigma(t)[1]

    def log_snr(self, t: Array) -> Array:
        """logSNR(t) = 2 log(alpha / sigma); +inf at t = 0, -inf at t = 1, decreasing."""
        alpha, sigma = self.alpha_sigma(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def snr(self, t: Array) -> Array:
        alpha, sigma = self.alpha_sigma(t)
        return jnp.square(alpha / sigma)

    def level_from_log_snr(self, log_snr: Array) -> Array:
        """The level t with log_snr(t) = log_snr, elementwise (closed form, differentiable)."""
        log_snr = jnp.asarray(log_snr, jnp.float32)
        # Every family has alpha / sigma = f(t) / shift; solve f(t) = shift * exp(log_snr / 2).
        log_ratio = 0.5 * log_snr + jnp.log(jnp.float32(self.shift))
        return jnp.clip(self._level_from_log_ratio(log_ratio), 0.0, 1.0)

    def _level_from_log_ratio(self, log_ratio: Array) -> Array:
        raise NotImplementedError

    def d_log_snr(self, t: Array) -> Array:
        """d logSNR / dt elementwise (negative), by a JVP of the schedule as in VDM."""
        t = jnp.asarray(t, jnp.float32)
        return jax.jvp(self.log_snr, (t,), (jnp.ones_like(t),))[1]

    def _shifted(self, alpha: Array, sigma: Array) -> tuple[Array, Array]:
        """Divides alpha / sigma by `shift`, keeping the family's normalisation."""
        if self.shift == 1.0:
            return alpha, sigma
        return self._renormalise(alpha, self.shift * sigma)

    @staticmethod
    def _renormalise(alpha: Array, sigma: Array) -> tuple[Array, Array]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Schedule):
    """alpha = 1 - t, sigma = t (the paper's schedule); with a shift, alpha + sigma = 1 still."""

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t, jnp.float32)
        return self._shifted(1.0 - t, t)

    @staticmethod
    def _renormalise(alpha: Array, sigma: Array) -> tuple[Array, Array]:
        total = alpha + sigma
        return alpha / total, sigma / total

    def _level_from_log_ratio(self, log_ratio: Array) -> Array:
        return jax.nn.sigmoid(-log_ratio)  # (1 - t) / t = exp(log_ratio)


@dataclasses.dataclass(frozen=True)
class CosineVP(Schedule):
    """Variance-preserving cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
        t = jnp.asarray(t, jnp.float32)
        angle = 0.5 * jnp.pi * t
        # cos(pi/2) is not exactly 0 in float32; pin the noisy end.
        alpha = jnp.where(t >= 1.0, 0.0, jnp.cos(angle))
        return self._shifted(alpha, jnp.sin(angle))

    @staticmethod
    def _renormalise(alpha: Array, sigma: Array) -> tuple[Array, Array]:
        norm = jnp.sqrt(jnp.square(alpha) + jnp.square(sigma))
        return alpha / norm, sigma / norm

    def _level_from_log_ratio(self, log_ratio: Array) -> Array:
        return (2.0 / jnp.pi) * jnp.arctan(jnp.exp(-log_ratio))  # cot(pi t / 2) = exp(log_ratio)


SCHEDULES = {"rectified_flow": RectifiedFlow, "cosine_vp": CosineVP}


def get(name: str, shift: float = 1.0) -> Schedule:
    """A schedule by name: 'rectified_flow' (default in configs) or 'cosine_vp'."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](shift=shift)


def shift_for_resolution(resolution: int, base_resolution: int = 64) -> float:
    """The logSNR shift for training at `resolution` a schedule tuned at `base_resolution`.

    Larger images carry more redundant pixels, so the same t destroys less information; shifting
    by resolution / base_resolution keeps the signal-to-noise ratio per unit of content.
    """
    if resolution <= 0 or base_resolution <= 0:
        raise ValueError(
            f"resolutions must be positive; got resolution={resolution!r}, "
            f"base_resolution={base_resolution!r}."
        )
    return resolution / base_resolution
