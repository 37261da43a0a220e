"""Quantisers for the latent autoencoder: a learned codebook (`VectorQuantizer`) and finite scalar
quantisation (`FSQ`), behind one interface.

Every quantiser is a Flax module called as

    out = quantizer.apply(variables, z, train, mutable=[STATS], rngs={RNG: key})

with z [..., D] (any leading axes, e.g. [B, h, w, D]) and returns a `QuantizerOutput`:
`quantized` (like z, float32, straight-through gradients to z), `codes` (int32, z's leading
shape), `loss` (scalar auxiliary loss to add to the autoencoder's loss; 0 where there is none)
and `metrics` (float32 scalars). `decode_codes(codes)` maps codes back to the vectors the decoder
reads (`quantizer.apply(variables, codes, method='decode_codes')`, the round trip of pre-encoded
datasets) and `num_codes` is the size of the code space. `from_config(config, dim)` builds one
from a config block.

Statistics over a batch (code usage, perplexity, the EMA codebook update, dead codes) are taken
with jnp operations on the whole array, so under `jax.jit` with a data-sharded batch they are the
global batch's (XLA inserts the reductions), with no named axis.
"""

import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from apd import checks
from apd.models.layers import Dense, to_rank

Array = jax.Array

# The variable collection of the codebook statistics (EMA cluster sizes and sums, restart
# offsets, steps since each code was last used): pass it as mutable when train=True.
STATS = "quantizer_stats"
# The rng stream that draws dead-code restarts (needed when train=True and restarts are on).
RNG = "quantizer"

KINDS = ("vq", "fsq")
UPDATES = ("ema", "straight_through")

# FSQ bounds z to slightly inside [-(L - 1) / 2, (L - 1) / 2] so that rounding yields exactly L
# values (Mentzer et al. 2023, appendix A.1).
_FSQ_MARGIN = 1e-3


@flax.struct.dataclass
class QuantizerOutput:
    """What a quantiser returns (a pytree, so it passes through jit).

    Attributes:
      quantized: like z, float32; its value is the code vector (mapped back to z's width where a
        projection is configured), its gradient flows straight through to z.
      codes: int32, z's leading shape, in [0, num_codes).
      loss: float32 scalar to add to the autoencoder's loss (0 where the quantiser has none).
      metrics: name -> float32 scalar: 'usage' (fraction of the codes used in the batch),
        'perplexity' (exp of the entropy of the batch's code histogram), and for the
        VectorQuantizer 'commitment' (mean squared distance between the encoder output and its
        code), 'codebook_loss' (the same distance as the codebook's loss; straight_through
        only) and 'restarted' (codes restarted in this step).
    """

    quantized: Array
    codes: Array
    loss: Array
    metrics: dict[str, Array]


def usage_metrics(codes: Array, num_codes: int) -> tuple[dict[str, Array], Array]:
    """The batch's code usage and perplexity, and the count of each code ([num_codes] float32)."""
    counts = jnp.bincount(codes.ravel(), length=num_codes).astype(jnp.float32)
    p = counts / codes.size
    metrics = {
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
        "perplexity": jnp.exp(-jnp.sum(jax.scipy.special.xlogy(p, p))),
    }
    return metrics, counts


def _check_codes(codes, num_codes: int) -> None:
    """Codes must be integers in [0, num_codes) (values checked when concrete)."""
    if not jnp.issubdtype(jnp.result_type(codes), jnp.integer):
        raise ValueError(f"codes must be an integer array; got dtype {jnp.result_type(codes)}.")
    if checks.is_concrete(codes):
        arr = np.asarray(codes)
        if arr.size and (arr.min() < 0 or arr.max() >= num_codes):
            bad = arr[(arr < 0) | (arr >= num_codes)].ravel()[0]
            raise ValueError(f"codes must lie in [0, {num_codes}); got a code {int(bad)}.")


def _check_width(z: Array, dim: int, what: str) -> None:
    if z.ndim < 1 or z.shape[-1] != dim:
        raise ValueError(
            f"{what} expects vectors of width {dim} on the last axis ([..., {dim}]); got an "
            f"array of shape {tuple(z.shape)}."
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _l2_normalize(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


class Quantizer(nn.Module):
    """The interface of apd's quantisers (see the module docstring): `__call__(z, train)` ->
    `QuantizerOutput`, `decode_codes(codes)` -> vectors [..., D], and `num_codes`."""


class VectorQuantizer(Quantizer):
    """A learned codebook of `num_codes` vectors; each latent vector takes its nearest code.

    Distances are computed in float32 at full matmul precision. With `code_dim`, z is projected
    to that width before the lookup and the code vector back to z's width after it (factorised
    codes); with `cosine`, encoder outputs and codes are l2-normalised before the lookup, so the
    nearest code is the one at the smallest angle.

    The codebook is updated in one of two ways:
      'ema': each code is the exponential moving average of the encoder outputs assigned to it:
        cluster sizes N_k and sums m_k (collection `STATS`) decay by `decay` each training step;
        the code is m_k / N~_k with Laplace-smoothed sizes N~_k = (N_k + eps) / (n + K eps) * n,
        n = sum N_k (no code divides by zero). The loss is `beta` * commitment.
      'straight_through': the codebook is a parameter trained by the codebook loss
        ||sg(z) - e||^2; the loss is codebook loss + `beta` * commitment ||z - sg(e)||^2.
    Statistics change only when train=True (and never during `init`).

    Dead codes: a code unused for `restart_after` consecutive training steps is restarted at an
    encoder output of the current batch drawn at random (without replacement where the batch
    holds at least `num_codes` vectors) from the rng stream `RNG`; 0 turns restarts off. The
    'straight_through' codebook is a parameter, which a module cannot overwrite, so a restart
    sets a per-code offset in `STATS` (the code is parameter + offset and the parameter still
    learns).

    The lookup materialises the [N, num_codes] distance matrix of the N latent vectors.

    Attributes:
      dim: width D of the latent vectors.
      num_codes: codebook size K.
      code_dim: width of the code vectors; None (or D) means no projection.
      update: 'ema' or 'straight_through'.
      beta: weight of the commitment loss.
      decay: EMA decay of the cluster statistics ('ema').
      epsilon: Laplace smoothing of the cluster sizes ('ema').
      cosine: l2-normalise encoder outputs and codes.
      restart_after: training steps without use after which a code is restarted (0: never).
      init_scale: standard deviation of the codebook's normal initialisation.
    """

    dim: int
    num_codes: int = 8192
    code_dim: int | None = None
    update: str = "ema"
    beta: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    cosine: bool = False
    restart_after: int = 100
    init_scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if not _is_int(self.dim) or self.dim < 1:
            problems.append(f"dim must be a positive int; got {self.dim!r}")
        if not _is_int(self.num_codes) or self.num_codes < 2:
            problems.append(f"num_codes must be an int >= 2; got {self.num_codes!r}")
        if self.code_dim is not None and (not _is_int(self.code_dim) or self.code_dim < 1):
            problems.append(f"code_dim must be None or a positive int; got {self.code_dim!r}")
        if self.update not in UPDATES:
            problems.append(f"update must be one of {list(UPDATES)}; got {self.update!r}")
        if not _is_real(self.beta) or not self.beta >= 0:
            problems.append(f"beta must be a real number >= 0; got {self.beta!r}")
        if not _is_real(self.decay) or not 0 < self.decay < 1:
            problems.append(f"decay must be a real number in (0, 1); got {self.decay!r}")
        if not _is_real(self.epsilon) or not self.epsilon > 0:
            problems.append(f"epsilon must be a real number > 0; got {self.epsilon!r}")
        if not isinstance(self.cosine, bool):
            problems.append(f"cosine must be a bool; got {self.cosine!r}")
        if not _is_int(self.restart_after) or self.restart_after < 0:
            problems.append(
                f"restart_after must be an int >= 0 (0: no restarts); got {self.restart_after!r}"
            )
        if not _is_real(self.init_scale) or not self.init_scale > 0:
            problems.append(f"init_scale must be a real number > 0; got {self.init_scale!r}")
        if problems:
            raise ValueError("VectorQuantizer: " + "; ".join(problems) + ".")

    @property
    def projected(self) -> bool:
        return self.code_dim is not None and self.code_dim != self.dim

    @property
    def width(self) -> int:
        """Width of the code vectors."""
        return self.code_dim if self.projected else self.dim

    def setup(self):
        K, c = self.num_codes, self.width
        init = nn.initializers.normal(self.init_scale)
        if self.update == "straight_through":
            self.codebook_param = self.param("codebook", init, (K, c), jnp.float32)
            self.offset = self.variable(STATS, "codebook_offset", jnp.zeros, (K, c), jnp.float32)
        else:
            self.cluster_size = self.variable(STATS, "cluster_size", jnp.ones, (K,), jnp.float32)
            self.embed_sum = self.variable(
                STATS, "embed_sum", lambda: init(self.make_rng("params"), (K, c), jnp.float32)
            )
        self.unused_steps = self.variable(STATS, "unused_steps", jnp.zeros, (K,), jnp.int32)
        if self.projected:
            self.project_in = Dense(c)
            self.project_out = Dense(self.dim)

    def code_vectors(self) -> Array:
        """The codebook [num_codes, width] as the lookup sees it (normalised with `cosine`)."""
        if self.update == "straight_through":
            codebook = self.codebook_param + self.offset.value
        else:
            sizes = self.cluster_size.value
            n = jnp.sum(sizes)
            smoothed = (sizes + self.epsilon) / (n + self.num_codes * self.epsilon) * n
            codebook = self.embed_sum.value / smoothed[:, None]
        return _l2_normalize(codebook) if self.cosine else codebook

    def decode_codes(self, codes: Array) -> Array:
        """Codes (int, any shape S) -> the vectors [*S, dim] that `__call__` returns for them."""
        _check_codes(codes, self.num_codes)
        vectors = jnp.take(self.code_vectors(), jnp.asarray(codes, jnp.int32), axis=0)
        return self.project_out(vectors) if self.projected else vectors

    def __call__(self, z: Array, train: bool = False) -> QuantizerOutput:
        _check_width(z, self.dim, "VectorQuantizer")
        lead = z.shape[:-1]
        z = z.astype(jnp.float32)
        ze = self.project_in(z) if self.projected else z
        flat = ze.reshape(-1, self.width)
        if self.cosine:
            flat = _l2_normalize(flat)
        codebook = self.code_vectors()
        codes = _nearest(jax.lax.stop_gradient(flat), jax.lax.stop_gradient(codebook))
        e = jnp.take(codebook, codes, axis=0)

        commitment = jnp.mean(jnp.square(flat - jax.lax.stop_gradient(e)))
        loss = self.beta * commitment
        metrics, counts = usage_metrics(codes, self.num_codes)
        metrics["commitment"] = commitment
        if self.update == "straight_through":
            codebook_loss = jnp.mean(jnp.square(e - jax.lax.stop_gradient(flat)))
            loss = loss + codebook_loss
            metrics["codebook_loss"] = codebook_loss
        restarted = jnp.zeros((), jnp.float32)
        if train and not self.is_initializing():
            restarted = self._update_statistics(jax.lax.stop_gradient(flat), codes, counts)
        metrics["restarted"] = restarted

        quantized = (flat + jax.lax.stop_gradient(e - flat)).reshape(*lead, self.width)
        if self.projected:
            quantized = self.project_out(quantized)
        return QuantizerOutput(quantized, codes.reshape(lead), loss, metrics)

    def _update_statistics(self, flat: Array, codes: Array, counts: Array) -> Array:
        """One training step's EMA update, dead-code bookkeeping and restarts; returns the number
        of codes restarted (float32)."""
        if not self.is_mutable_collection(STATS):
            raise ValueError(
                f"train=True updates the codebook statistics: call apply(..., "
                f"mutable=[{STATS!r}]) (or pass train=False)."
            )
        K = self.num_codes
        if self.update == "ema":
            d = self.decay
            sums = jax.ops.segment_sum(flat, codes, num_segments=K)
            self.cluster_size.value = d * self.cluster_size.value + (1 - d) * counts
            self.embed_sum.value = d * self.embed_sum.value + (1 - d) * sums
        unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
        if not self.restart_after:
            self.unused_steps.value = unused
            return jnp.zeros((), jnp.float32)
        if not self.has_rng(RNG):
            raise ValueError(
                f"dead-code restarts draw from the rng stream {RNG!r}: pass rngs={{{RNG!r}: key}} "
                f"to apply (or set restart_after=0)."
            )
        dead = unused >= self.restart_after
        n = flat.shape[0]
        picks = jax.random.choice(self.make_rng(RNG), n, (K,), replace=n < K)
        fresh = jnp.take(flat, picks, axis=0)
        if self.update == "ema":
            self.embed_sum.value = jnp.where(dead[:, None], fresh, self.embed_sum.value)
            self.cluster_size.value = jnp.where(dead, 1.0, self.cluster_size.value)
        else:
            offset = fresh - jax.lax.stop_gradient(self.codebook_param)
            self.offset.value = jnp.where(dead[:, None], offset, self.offset.value)
        self.unused_steps.value = jnp.where(dead, 0, unused)
        return jnp.sum(dead.astype(jnp.float32))


def _nearest(x: Array, codebook: Array) -> Array:
    """Index of the nearest row of codebook [K, c] for each row of x [N, c]: float32, full
    matmul precision (no TF32 or bf16 passes on accelerators)."""
    x, codebook = x.astype(jnp.float32), codebook.astype(jnp.float32)
    dots = jnp.matmul(x, codebook.T, precision=jax.lax.Precision.HIGHEST)
    # ||x||^2 is the same for every code, so it does not change the argmin.
    distances = to_rank(jnp.sum(jnp.square(codebook), -1), 2) - 2.0 * dots
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)


class FSQ(Quantizer):
    """Finite scalar quantisation (Mentzer et al. 2023): each of the D = len(levels) channels is
    bounded and rounded to one of L_i values; the codes are the prod(levels) points of the grid.

    Channel i is bounded to f(z) = tanh(z + s) * h - o with h = (L - 1)(1 - 1e-3) / 2, o = 0 for
    odd L and 1/2 for even L, s = atanh(o / h) (so f(0) = 0; s = 0 for L = 2, whose two values
    then meet at z = 0), then rounded (straight-through)
    to the integers {-floor(L/2), ..., ceil(L/2) - 1} and divided by floor(L/2): odd L gives L
    values symmetric in [-1, 1], even L gives [-1, 1 - 2/L] (the half offset). A code is the
    mixed-radix number of the channels' digits (digit + floor(L/2)), channel 0 least
    significant. Nothing is learned, so no code can die; `loss` is 0.

    Attributes:
      levels: number of values per channel, each >= 2 (e.g. (16, 16, 32): 8192 codes for 3
        channels).
    """

    levels: tuple[int, ...] = (16, 16, 32)

    def __post_init__(self):
        super().__post_init__()
        levels = self.levels
        ok = isinstance(levels, tuple | list) and len(levels) >= 1
        ok = ok and all(_is_int(n) and n >= 2 for n in levels)
        if not ok:
            raise ValueError(
                f"FSQ levels must be a non-empty sequence of ints >= 2, e.g. (16, 16, 32); got "
                f"{levels!r}."
            )
        if math.prod(levels) > np.iinfo(np.int32).max:
            raise ValueError(
                f"FSQ levels {tuple(levels)} give {math.prod(levels)} codes; int32 codes allow at "
                f"most {np.iinfo(np.int32).max}."
            )

    @property
    def num_codes(self) -> int:
        return math.prod(self.levels)

    def _constants(self, ndim: int) -> dict[str, Array]:
        """Per-channel constants shaped to broadcast against a rank-`ndim` array."""
        L = np.asarray(self.levels, np.float64)
        half_l = (L - 1) * (1 - _FSQ_MARGIN) / 2
        offset = np.where(np.asarray(self.levels) % 2 == 0, 0.5, 0.0)
        basis = np.cumprod([1, *self.levels[:-1]])
        values = {
            "half_l": half_l,
            "offset": offset,
            # L = 2 has no room for the shift (its bound lies below 1/2): its two values meet
            # at z = 0.
            "shift": np.arctanh(np.where(offset < half_l, offset, 0.0) / half_l),
            "half_width": np.asarray(self.levels) // 2,
        }
        consts = {k: to_rank(jnp.asarray(v, jnp.float32), ndim) for k, v in values.items()}
        consts["basis"] = to_rank(jnp.asarray(basis, jnp.int32), ndim)
        consts["levels"] = to_rank(jnp.asarray(self.levels, jnp.int32), ndim)
        return consts

    def bound(self, z: Array) -> Array:
        """The continuous value that is rounded: f(z) / floor(L/2) per channel ([..., D],
        float32); `quantized` is its rounding with this function's gradient."""
        c = self._constants(z.ndim)
        return self._bounded(z.astype(jnp.float32), c) / c["half_width"]

    @staticmethod
    def _bounded(z: Array, c: dict[str, Array]) -> Array:
        return jnp.tanh(z + c["shift"]) * c["half_l"] - c["offset"]

    def _codes(self, digits: Array, c: dict[str, Array]) -> Array:
        return jnp.sum(digits.astype(jnp.int32) * c["basis"], axis=-1)

    def __call__(self, z: Array, train: bool = False) -> QuantizerOutput:
        del train  # nothing to update
        _check_width(z, len(self.levels), f"FSQ with levels {tuple(self.levels)}")
        c = self._constants(z.ndim)
        bounded = self._bounded(z.astype(jnp.float32), c)
        rounded = jnp.round(bounded)
        quantized = (bounded + jax.lax.stop_gradient(rounded - bounded)) / c["half_width"]
        codes = self._codes(rounded + c["half_width"], c)
        metrics, _ = usage_metrics(codes, self.num_codes)
        return QuantizerOutput(quantized, codes, jnp.zeros((), jnp.float32), metrics)

    def decode_codes(self, codes: Array) -> Array:
        """Codes (int, any shape S) -> the grid points [*S, D] that `__call__` returns."""
        _check_codes(codes, self.num_codes)
        codes = jnp.asarray(codes, jnp.int32)[..., None]
        c = self._constants(codes.ndim)
        digits = (codes // c["basis"]) % c["levels"]
        return (digits.astype(jnp.float32) - c["half_width"]) / c["half_width"]

    def codes_from_quantized(self, quantized: Array) -> Array:
        """The inverse of `decode_codes`: grid points [..., D] -> int32 codes (each channel is
        rounded to its nearest grid value)."""
        _check_width(quantized, len(self.levels), f"FSQ with levels {tuple(self.levels)}")
        c = self._constants(quantized.ndim)
        digits = jnp.round(quantized.astype(jnp.float32) * c["half_width"]) + c["half_width"]
        digits = jnp.clip(digits, 0, c["levels"] - 1)
        return self._codes(digits, c)


def from_config(config: Mapping[str, Any], dim: int) -> Quantizer:
    """A quantiser for latent vectors of width `dim` from a config block (an ml_collections
    ConfigDict or a dict): `kind` ('vq' or 'fsq') and that kind's attributes, e.g.

        {'kind': 'vq', 'num_codes': 8192, 'update': 'ema', 'restart_after': 100}
        {'kind': 'fsq', 'levels': (16, 16, 32)}

    Unset attributes take the class defaults. Raises ValueError naming a bad kind, an unknown
    attribute, a bad value, or FSQ levels whose count is not `dim`.
    """
    fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    kind = fields.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"quantizer kind must be one of {list(KINDS)}; got {kind!r}.")
    cls = VectorQuantizer if kind == "vq" else FSQ
    allowed = sorted(f for f in cls.__dataclass_fields__ if f not in ("parent", "name", "dim"))
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown attributes {unknown} for quantizer kind {kind!r}; expected some of {allowed}."
        )
    if kind == "vq":
        return VectorQuantizer(dim=dim, **fields)
    if "levels" in fields and isinstance(fields["levels"], list):
        fields["levels"] = tuple(fields["levels"])
    fsq = FSQ(**fields)
    if len(fsq.levels) != dim:
        raise ValueError(
            f"FSQ levels {tuple(fsq.levels)} quantise {len(fsq.levels)} channels, but the latent "
            f"has {dim}; give one level count per latent channel."
        )
    return fsq
