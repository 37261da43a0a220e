"""Sampling from a trained run in fixed-size chunks: the library behind `apd.sample` and the
evaluators of `apd.evaluate`, for notebooks as much as for the binaries.

    run = apd.runs.load("runs/fmnist")                           # or export_dir=...
    sampler = Sampler(run, batch=64)
    out = sampler.generate(16, steps=50, seed=0)                  # out.images [16, 28, 28, 1]
    x, y = apd.runs.first_images(run, "test", 16)
    known = apd.evaluation.masks.make_masks("wide", 0, 16, run.image_shape[:2])
    out = sampler.inpaint(x, known, steps=50, labels=y, seed=0)  # out.network_calls: 50

Every method but `adaptive` takes N images (or draws N samples) and works in chunks of
`batch`: the last chunk is padded by repeating its last row, so every chunk has one shape and
each kind of plan compiles once per setting (step count, eta, guidance scales). The parameters
are replicated over the local devices and each chunk is split over them (over the most devices,
up to all, that divide `batch`). Chunk i draws from `fold_in(key(seed), i)`, split in three: the
start noise, the sampler's own noise, and the plan's random choices (the autoregressive order).
The same seed and batch give the same images. `adaptive` instead runs a pool of `batch` slots
(split over the devices the same way) that takes the next image as soon as one is done, image j
drawing from its own key (`AdaptivePool`).

Labels are int32 [N] in [0, num_classes] (`resolve_labels` makes them from a mode such as
'random' or 'data'); None gives a class-conditional model the null label (unconditional samples).
Each method returns `Samples`: images float32 [N, H, W, C] in [-1, 1], the network cost of each
chunk (`apd.sampling.Cost`; adaptive: one for the pool) and the per-sample arrays a plan adds
(adaptive: each image's network calls, steps per pixel and the predicted log error).
"""

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from apd import checks, corruption, plans, runs, sampling
from apd.sampling import ddim, guidance
from apd.sampling import images as images_lib
from apd.sampling import inputs as sampling_inputs

Array = jax.Array

LABEL_MODES = ("auto", "random", "data", "null")


@dataclasses.dataclass(frozen=True)
class Samples:
    """What a `Sampler` method returns."""

    images: np.ndarray  # float32 [N, H, W, C] in [-1, 1]
    costs: tuple[sampling.Cost, ...]  # the network work of each chunk, in order
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-sample arrays

    @property
    def network_calls(self) -> int:
        """Batched network calls over all chunks."""
        return sum(c.network_calls for c in self.costs)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def pad_rows(arr: np.ndarray | None, size: int) -> np.ndarray | None:
    """Pads axis 0 to `size` by repeating the last row (None passes through)."""
    if arr is None or arr.shape[0] == size:
        return arr
    return np.concatenate([arr, np.repeat(arr[-1:], size - arr.shape[0], axis=0)])


def parse_label_ids(spec: str, name: str = "labels") -> list[int]:
    """'3' or '0,1,2' -> [3] or [0, 1, 2]; ValueError naming `name` for anything else."""
    try:
        return [int(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"{name} must be one of {LABEL_MODES} or class ids such as '3' or '0,1,2'; got "
            f"{spec!r}."
        ) from None


def resolve_labels(
    spec: str,
    num_classes: int,
    num: int,
    seed: int,
    data_labels: np.ndarray | None = None,
    name: str = "labels",
) -> np.ndarray | None:
    """Class labels int32 [num] for a class-conditional model, or None for an unconditional one.

    Args:
      spec: 'auto' (data_labels if given, else random), 'random' (uniform, drawn from seed),
        'data' (data_labels), 'null' (the null label num_classes: unconditional sampling), or
        class ids '3' / '0,1,2' (repeated cyclically to num).
      num_classes: the model's classes (0: unconditional; then every mode gives None).
      num: the number of labels.
      seed: the seed of 'random' (numpy's default_rng([seed, 17])).
      data_labels: the labels of the input images, for 'auto' and 'data'.
      name: how error messages name the setting (a binary passes its flag).
    """
    ids = None if spec in LABEL_MODES else parse_label_ids(spec, name)
    if num_classes == 0:
        if ids is not None:
            raise ValueError(f"the model is unconditional: {name}={spec!r} cannot be used.")
        return None
    if ids is not None:
        arr = np.asarray(ids, np.int32)
        if arr.min() < 0 or arr.max() > num_classes:
            raise ValueError(
                f"{name} ids must lie in [0, {num_classes}] ({num_classes} = null); got {spec!r}."
            )
        return np.resize(arr, num)
    if spec == "auto":
        spec = "data" if data_labels is not None else "random"
    if spec == "data":
        if data_labels is None:
            raise ValueError(
                f"{name}='data' needs input images (plans inpaint, edit and repaint take them)."
            )
        return np.asarray(data_labels, np.int32)
    if spec == "null":
        return np.full(num, num_classes, np.int32)
    return np.random.default_rng([seed, 17]).integers(0, num_classes, num).astype(np.int32)


def default_min_steps(steps: int) -> int:
    """The adaptive plan's default fewest steps per pixel: max(1, 2 steps // 5)."""
    return max(1, 2 * steps // 5)


def difficulty_range(
    head: runs.UncertaintyHead, low: float | None = None, high: float | None = None
) -> tuple[float, float]:
    """The log-error range (difficulty 0, difficulty 1) of the adaptive rule.

    Both `low` and `high` given: those. Neither: the head's calibration (head.json
    `calibration.low/high`, the 5% and 95% quantiles of its held-out predictions; see
    `apd.train_uncertainty`). ValueError for one without the other, or for a head without a
    calibration (the message says how to add one).
    """
    if (low is None) != (high is None):
        raise ValueError(
            "difficulty_low and difficulty_high go together (an absolute log-error range); got "
            f"{low!r} and {high!r}."
        )
    if low is not None:
        return float(low), float(high)
    calibration = head.info.get("calibration")
    if calibration is None:
        raise ValueError(
            "the uncertainty head has no calibration (it was trained before heads recorded one): "
            "run `python -m apd.train_uncertainty` on the run again (it calibrates the existing "
            "head without retraining it), or pass difficulty_low and difficulty_high."
        )
    return float(calibration["low"]), float(calibration["high"])


def _check_count(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be an int >= 1; got {value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


class Sampler:
    """Samples from a loaded run (`apd.runs.load`) in chunks of `batch` (see the module doc)."""

    def __init__(self, run: runs.Run, batch: int = 64):
        self.run = run
        self.batch = _check_count("batch", batch)
        devices = jax.local_devices()
        count = max(d for d in range(1, len(devices) + 1) if self.batch % d == 0)
        self.mesh = jax.sharding.Mesh(np.asarray(devices[:count]), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.sharded = NamedSharding(self.mesh, PartitionSpec("data"))
        self.params = jax.device_put(run.params, self.replicated)
        self._sample_fns: dict[tuple[float, float, float], Callable] = {}
        self._repaint_fns: dict[tuple[int, int, int, float], Callable] = {}
        self._head: runs.UncertaintyHead | None = None
        self._pool: AdaptivePool | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the model's tokens: the run's images, or a latent run's latent grid. Plans
        (`apd.plans`) and per-token extras live on it."""
        return tuple(self.run.token_shape[:-1])

    @property
    def image_grid(self) -> tuple[int, int]:
        """(H, W) of the run's images (decoded, for a latent run): the grid of every method's
        images, masks and strengths."""
        return tuple(self.run.image_shape[:-1])

    def put(self, arr: np.ndarray | Array | None) -> Array | None:
        """A chunk's array [batch, ...] on the devices, split along axis 0 (None passes)."""
        return None if arr is None else jax.device_put(jnp.asarray(arr), self.sharded)

    def map_chunks(
        self, fn: Callable[..., Array], num: int, seed: int, *arrays: np.ndarray | None
    ) -> np.ndarray:
        """Runs `fn(key_i, *chunk_i)` over the chunks and concatenates its first-axis results.

        Each array [num, ...] (or None) is cut into chunks of `batch` rows, padded and split over
        the devices (`put`); key_i = fold_in(key(seed), i). fn returns [batch, ...]; the result is
        the first `num` rows of all chunks, as numpy.
        """
        out = []
        for key, n, chunk in self._chunks(num, seed, arrays):
            out.append(np.asarray(fn(key, *[self.put(a) for a in chunk]))[:n])
        return np.concatenate(out)

    def _chunks(self, num: int, seed: int, arrays: Sequence[np.ndarray | None]):
        """(key_i, rows in chunk i, [array rows of chunk i padded to batch]) per chunk."""
        num = _check_count("the number of images", num)
        for arr in arrays:
            if arr is not None and np.shape(arr)[0] != num:
                raise ValueError(
                    f"every per-sample array needs {num} rows (one per image); got shape "
                    f"{np.shape(arr)}."
                )
        key = jax.random.key(seed)
        for i in range(math.ceil(num / self.batch)):
            part = slice(i * self.batch, min((i + 1) * self.batch, num))
            chunk = [
                None if a is None else pad_rows(np.asarray(a[part]), self.batch) for a in arrays
            ]
            yield jax.random.fold_in(key, i), part.stop - part.start, chunk

    # -- compiled functions -----------------------------------------------------------------------

    def _sample_fn(
        self, eta: float, cfg_scale: float, input_guidance: float, context_level: str | float
    ) -> Callable:
        level = context_level if isinstance(context_level, str) else float(context_level)
        setting = (float(eta), float(cfg_scale), float(input_guidance), level)
        if setting not in self._sample_fns:
            self._sample_fns[setting] = images_lib.make_sample_fn(
                self.run.model.apply,
                schedule=self.run.schedule,
                prediction=self.run.prediction,
                channels=self.run.token_shape[-1],
                eta=setting[0],
                num_classes=self.run.num_classes,
                cfg_scale=setting[1],
                input_guidance=setting[2],
                context_level=setting[3],
            )
        return self._sample_fns[setting]

    def _repaint_fn(self, steps: int, jump: int, resample: int, eta: float) -> Callable:
        setting = (steps, jump, resample, float(eta))
        if setting not in self._repaint_fns:
            run = self.run
            self._repaint_fns[setting] = jax.jit(
                lambda params, x_known, mask, key, labels: sampling.repaint(
                    images_lib.denoiser(run.model.apply, params),
                    x_known,
                    mask,
                    key,
                    schedule=run.schedule,
                    steps=steps,
                    jump_length=jump,
                    resample=resample,
                    prediction=run.prediction,
                    eta=setting[3],
                    labels=labels,
                    num_classes=run.num_classes,
                )
            )
        return self._repaint_fns[setting]

    def uncertainty_head(self) -> runs.UncertaintyHead:
        """The run's uncertainty head, its parameters replicated over the devices.

        Raises `runs.MissingUncertaintyHeadError` (naming the command that trains one) without one.
        """
        if self._head is None:
            head = runs.load_uncertainty(self.run)
            params = jax.device_put(head.params, self.replicated)
            self._head = dataclasses.replace(head, params=params)
        return self._head

    def adaptive_pool(self) -> "AdaptivePool":
        """The pool behind `adaptive`: the backbone's features feed the run's head."""
        if self._pool is None:
            model, head = self.run.model, self.uncertainty_head().head

            def predict(params, z, levels, labels):
                return model.apply({"params": params[0]}, z, levels, labels, return_features=True)

            def log_error(params, features, levels):
                return head.apply({"params": params[1]}, features, levels)

            self._pool = AdaptivePool(
                predict,
                log_error,
                batch=self.batch,
                image_shape=self.run.token_shape,
                schedule=self.run.schedule,
                prediction=self.run.prediction,
                num_classes=self.run.num_classes,
                sharding=self.sharded,
            )
        return self._pool

    # -- the DDIM sampler along a plan --------------------------------------------------------

    def _sample(
        self,
        num: int,
        seed: int,
        make_plan: Callable[..., tuple[plans.Plan, dict[str, np.ndarray]]],
        *,
        images: np.ndarray | None,
        labels: np.ndarray | None,
        inputs: Sequence[np.ndarray | None],
        eta: float,
        cfg_scale: float,
        input_guidance: float,
        context_level: str | float = "match",
    ) -> Samples:
        """`make_plan(key, x_known, noise, labels, *inputs)` per chunk (device arrays but the
        inputs, which stay on the host) -> (plan, per-sample extras); then DDIM along it."""
        if images is not None:
            images = self._check_images(images, self.run.token_shape)
        fn = self._sample_fn(eta, cfg_scale, input_guidance, context_level)
        outputs, extras, costs = [], [], []
        for key, n, (x, lab, *rest) in self._chunks(num, seed, (images, labels, *inputs)):
            k_noise, k_sample, k_plan = jax.random.split(key, 3)
            noise = jax.random.normal(k_noise, (self.batch, *self.run.token_shape), jnp.float32)
            x, noise, lab = self.put(x), self.put(noise), self.put(lab)
            plan, extra = make_plan(k_plan, x, noise, lab, *rest)
            outputs.append(np.asarray(fn(self.params, plan, k_sample, x, noise, lab))[:n])
            extras.append({k: np.asarray(v)[:n] for k, v in extra.items()})
            costs.append(
                sampling.sample_cost(plan, cfg_scale=cfg_scale, input_guidance=input_guidance)
            )
            self._log(len(outputs), num, n, costs[-1])
        return self._collect(outputs, costs, extras)

    def _log(self, chunks: int, num: int, n: int, cost: sampling.Cost) -> None:
        done = (chunks - 1) * self.batch + n
        logging.info("Sampled %d/%d (%d network calls per chunk).", done, num, cost.network_calls)

    @staticmethod
    def _collect(outputs, costs, extras) -> Samples:
        merged = {k: np.concatenate([e[k] for e in extras]) for k in (extras[0] if extras else {})}
        return Samples(np.concatenate(outputs), tuple(costs), merged)

    def _check_images(self, images: np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
        """float32 [N, *shape] (default: the run's image shape), or a ValueError."""
        shape = tuple(self.run.image_shape if shape is None else shape)
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[1:] != shape:
            raise ValueError(
                f"images must be float [N, H, W, C] with (H, W, C) = {shape}; got shape "
                f"{arr.shape}."
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"images must be float in [-1, 1]; got dtype {arr.dtype}.")
        return arr.astype(np.float32)

    def _check_known(self, known: np.ndarray) -> np.ndarray:
        arr = np.asarray(known)
        grid = self.image_grid
        if arr.ndim != 3 or arr.shape[1:] != grid:
            raise ValueError(
                f"masks must be [N, H, W] with (H, W) = {grid} (1 = known, 0 = generate); got "
                f"shape {arr.shape}."
            )
        checks.check_mask(arr, arr.shape, "masks", form="[N, H, W]", zero="generate", one="known")
        return arr.astype(np.uint8)

    # -- a latent run's pixel side ----------------------------------------------------------------
    #
    # Every public method takes and returns images (and masks, strengths) on the image grid. For a
    # latent run (`run.codec`) the inputs are encoded first and the samples decoded last:
    #
    #   known tokens  m = codec.latent_mask(known)  (a token is known only when all its pixels are)
    #   inputs        z = m * encode(x, known) + (1 - m) * encode(x)   (the autoencoder's training
    #                 rule, `autoencoder.mask_aware_targets`: known tokens from the masked image)
    #   the sampler   runs on z with the token masks (known tokens held at level 0)
    #   outputs       x_hat = decode(z_0, known), then the known pixels composited exactly:
    #                 known * x + (1 - known) * x_hat
    #
    # Generation decodes with no mask. The autoencoder runs in chunks of `batch` images.

    def map_rows(self, fn: Callable[..., Array], *arrays: np.ndarray | None) -> np.ndarray:
        """fn(*rows) over chunks of `batch` rows of the arrays (None passes), concatenated as
        numpy: a latent run's autoencoder (`run.codec`) on many images."""
        num = np.shape(arrays[0])[0]
        out = []
        for start in range(0, num, self.batch):
            part = slice(start, start + self.batch)
            out.append(np.asarray(fn(*[None if a is None else a[part] for a in arrays])))
        return np.concatenate(out)

    def _to_tokens(
        self, images: np.ndarray, known: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Checked images [N, H, W, C] and pixel masks [N, H, W] (or None: all known) -> the
        model's inputs and token masks (the same arrays for a pixel run)."""
        images = self._check_images(images)
        codec = self.run.codec
        if codec is None:
            return images, known
        full = self.map_rows(codec.encode, images)
        if known is None:
            return full, None
        tokens = self.map_rows(codec.latent_mask, known).astype(np.uint8)
        masked = self.map_rows(codec.encode, images, known)
        return np.where(tokens[..., None] == 1, masked, full), tokens

    def _to_images(
        self, out: Samples, images: np.ndarray | None = None, known: np.ndarray | None = None
    ) -> Samples:
        """A latent run's samples decoded (with the pixel masks), known pixels composited."""
        codec = self.run.codec
        if codec is None:
            return out
        decoded = self.map_rows(codec.decode, out.images, known)
        if known is not None:
            decoded = np.where(known[..., None] == 1, self._check_images(images), decoded)
        # Per-token maps (adaptive's steps and predicted errors) onto the image grid: each pixel
        # shows its token's value.
        f = codec.factor
        extras = {
            k: np.repeat(np.repeat(v, f, axis=1), f, axis=2)
            if v.ndim == 3 and v.shape[1:] == self.grid
            else v
            for k, v in out.extras.items()
        }
        return dataclasses.replace(out, images=decoded.astype(np.float32), extras=extras)

    def _token_levels(self, levels: np.ndarray) -> np.ndarray:
        """Per-pixel levels [N, H, W] -> per-token levels [N, h, w] for a latent run: a token
        takes the highest level of the pixels it covers (so it is kept, level 0, only when all of
        them are: `latent_mask`'s rule)."""
        if self.run.codec is None:
            return levels
        f = self.run.codec.factor
        n, h, w = levels.shape[0], *self.grid
        return levels.reshape(n, h, f, w, f).max(axis=(2, 4))

    # -- public sampling methods ----------------------------------------------------------------

    def generate(
        self,
        num: int,
        *,
        steps: int = 250,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
    ) -> Samples:
        """`num` samples along the synchronous plan (every pixel 1 -> 0 in `steps` steps)."""
        plan = plans.synchronous(steps, self.batch, self.grid)
        out = self._sample(
            num,
            seed,
            lambda *_: (plan, {}),
            images=None,
            labels=labels,
            inputs=(),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )
        return self._to_images(out)

    def inpaint(
        self,
        images: np.ndarray,
        known: np.ndarray,
        *,
        steps: int = 250,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
        context_level: str | float = "match",
    ) -> Samples:
        """The pixels with known == 0 generated in `steps` steps, the others kept exactly.

        Args:
          images: float32 [N, H, W, C] in [-1, 1].
          known: [N, H, W], 1 = known (`apd.evaluation.masks`), 0 = to generate.
          context_level: input guidance's noisier context: 'match' (each image's mean level of
            the generated pixels) or a level in [0, 1] (`apd.sampling.sample`).
        """
        known = self._check_known(known)
        tokens, token_known = self._to_tokens(images, known)
        out = self._sample(
            known.shape[0],
            seed,
            lambda key, x, noise, lab, ms: (plans.inpaint(jnp.asarray(ms), steps), {}),
            images=tokens,
            labels=labels,
            inputs=(token_known,),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
            context_level=context_level,
        )
        return self._to_images(out, images, known)

    def edit(
        self,
        images: np.ndarray,
        strength: np.ndarray,
        *,
        steps: int = 250,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
    ) -> Samples:
        """Each pixel from its strength (the image noised to it) to 0; strength 0 keeps it.

        Args:
          images: float32 [N, H, W, C] in [-1, 1].
          strength: float [N, H, W] in [0, 1].
        """
        strength = np.asarray(strength, np.float32)
        grid = self.image_grid
        if strength.ndim != 3 or strength.shape[1:] != grid:
            raise ValueError(
                f"strength must be [N, H, W] with (H, W) = {grid}; got shape {strength.shape}."
            )
        checks.check_levels(strength, "edit strength")
        # Pixels of strength 0 are kept: for a latent run they are the known pixels.
        kept = (strength == 0).astype(np.uint8) if self.run.latent else None
        tokens, _ = self._to_tokens(images, kept)
        out = self._sample(
            strength.shape[0],
            seed,
            lambda key, x, noise, lab, s: (plans.edit(s, steps), {}),
            images=tokens,
            labels=labels,
            inputs=(self._token_levels(strength),),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )
        return self._to_images(out, images, kept)

    def autoregressive(
        self,
        num: int,
        *,
        patches: int = 4,
        steps_per_group: int = 16,
        order: str = "raster",
        overlap: int = 0,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
    ) -> Samples:
        """`num` samples generated K x K patch by patch (`apd.plans.autoregressive`; a 'random'
        order is drawn per sample from the chunk's plan key; the patches cut the token grid)."""
        out = self._sample(
            num,
            seed,
            lambda key, *_: (
                plans.autoregressive(
                    self.grid,
                    self.batch,
                    patches,
                    steps_per_group,
                    order=order,
                    overlap=overlap,
                    key=key,
                ),
                {},
            ),
            images=None,
            labels=labels,
            inputs=(),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )
        return self._to_images(out)

    def adaptive(
        self,
        num: int,
        *,
        steps: int = 250,
        min_steps: int | None = None,
        images: np.ndarray | None = None,
        known: np.ndarray | None = None,
        align: str = "start",
        reestimate_every: int = 10,
        difficulty_low: float | None = None,
        difficulty_high: float | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
    ) -> Samples:
        """Uncertainty-guided sampling with the run's head (`python -m apd.train_uncertainty`).

        `AdaptivePool` with `AdaptiveRule((min_steps, steps), low, high, reestimate_every,
        align)`: the head predicts each pixel's log squared error at the image's first step (the
        noise, and the known pixels of `images` where `known` is given: adaptive inpainting) and
        every `reestimate_every` steps after (0: never); d = clip((e - low) / (high - low)) with
        (low, high) the head's calibrated range (`difficulty_range`; difficulty_low/high
        override it), and a pixel with level t left takes round((min_steps + (steps -
        min_steps) d) t) more steps (capped so that no image takes more than `steps`). An image
        costs as many network calls as its slowest pixel takes steps; a done image's slot takes
        the next one. min_steps defaults to `default_min_steps(steps)`.

        Extras: network_calls int32 [N] (each image's steps), steps_per_pixel int32 [N, H, W] (0
        for known pixels) and log_error float32 [N, H, W] (the head's prediction at the first
        step). `costs` holds one `Cost` for the pool: its network_calls are the pool's steps, so
        the forward passes of one image are network_calls x batch.
        """
        n_min = default_min_steps(steps) if min_steps is None else min_steps
        if (images is None) != (known is None):
            raise ValueError(
                "adaptive inpainting takes images and known masks together; got "
                f"images={'set' if images is not None else None}, "
                f"known={'set' if known is not None else None}."
            )
        tokens = token_known = None
        if known is not None:
            known = self._check_known(known)
            tokens, token_known = self._to_tokens(images, known)
        head = self.uncertainty_head()
        low, high = difficulty_range(head, difficulty_low, difficulty_high)
        rule = AdaptiveRule((n_min, steps), low, high, reestimate_every, align)
        out = self.adaptive_pool().run(
            (self.params, head.params),
            num,
            rule,
            seed=seed,
            images=tokens,
            known=token_known,
            labels=labels,
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )
        return self._to_images(out, images, known)

    def repaint(
        self,
        images: np.ndarray,
        known: np.ndarray,
        *,
        steps: int = 250,
        jump: int = 10,
        resample: int = 10,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 1.0,
    ) -> Samples:
        """The RePaint baseline (`apd.sampling.repaint`, jump length `jump`, `resample`
        resamplings) on the same images and masks as `inpaint`."""
        known = self._check_known(known)
        tokens, token_known = self._to_tokens(images, known)
        fn = self._repaint_fn(steps, jump, resample, eta)
        cost = sampling.repaint_cost(self.batch, steps, jump, resample)
        outputs = []
        for key, n, chunk in self._chunks(known.shape[0], seed, (tokens, token_known, labels)):
            k_sample = jax.random.split(key, 3)[1]
            x, ms, lab = (self.put(a) for a in chunk)
            outputs.append(np.asarray(fn(self.params, x, ms, k_sample, lab))[:n])
            self._log(len(outputs), known.shape[0], n, cost)
        return self._to_images(self._collect(outputs, [cost] * len(outputs), []), images, known)


# ---------------------------------------------------------------------------------------------
# Adaptive sampling: re-estimated step counts in a continuously refilled pool
# ---------------------------------------------------------------------------------------------

# (params, z [N, H, W, C], levels [N, H, W], labels [N] or None) -> (prediction like z, features)
Predict = Callable[[Any, Array, Array, Array | None], tuple[Array, Any]]
# (params, features of the first B rows, levels [B, H, W]) -> predicted log squared error [B, H, W]
LogError = Callable[[Any, Any, Array], Array]


@dataclasses.dataclass(frozen=True)
class AdaptiveRule:
    """The step-count rule of adaptive sampling (`plans.adaptive_counts`, `adaptive_advance`).

    A predicted log error e maps to the difficulty d = clip((e - low) / (high - low), 0, 1); a
    token with a fraction f of its way still ahead gets max(1, round((n_min + (n_max - n_min) d)
    f)) more steps, at most n_max minus the steps its image has taken (so no image takes more
    than n_max network calls). The counts are computed at an image's first step and again every
    `reestimate_every` of its steps (0: only at the first), from the head's prediction at the
    state of that step.

    align (`plans.adaptive_advance`): 'start' (default), every pixel moves from the first step
    and easy ones finish early; 'end', a pixel waits at its start level until its count is the
    image's largest. With re-estimation, 'end' re-estimates the waiting pixels at level 1, where
    predicted errors are the highest of all levels: their counts rise to the cap and the image
    takes n_max calls, so 'end' saves calls only with reestimate_every=0.
    """

    budget: tuple[int, int]  # (n_min, n_max)
    low: float  # log error of difficulty 0
    high: float  # log error of difficulty 1
    reestimate_every: int = 10
    align: str = "start"

    def __post_init__(self):
        plans.check_budget(self.budget)
        checks.check_choice("adaptive align", self.align, plans.ALIGNS)
        every = self.reestimate_every
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 0:
            raise ValueError(f"reestimate_every must be an int >= 0 (0: never); got {every!r}.")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(
                f"the difficulty range needs finite low < high (log errors); got low={self.low!r}, "
                f"high={self.high!r}."
            )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "z",
        "levels",
        "counts",
        "update",
        "moves",
        "log_error",
        "labels",
        "image",
        "age",
        "active",
    ],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class PoolState:
    """The pool's slots (B of them), on the devices, split along the slot axis."""

    z: Array  # [B, H, W, C] float32, the current state
    levels: Array  # [B, H, W] float32, each pixel's level now
    counts: Array  # [B, H, W] int32, each pixel's remaining steps (0: at level 0)
    update: Array  # [B, H, W] bool, False for known pixels (and every pixel of an empty slot)
    moves: Array  # [B, H, W] int32, the steps in which each pixel's level fell so far
    log_error: Array  # [B, H, W] float32, the head's prediction at the image's first step
    labels: Array  # [B] int32 (ignored without labels)
    image: Array  # [B] int32, the index of the slot's image (-1: empty)
    age: Array  # [B] int32, the steps the slot's image has taken: its network calls so far
    active: Array  # [B] bool, the slot holds an image that is not done


class AdaptivePool:
    """Uncertainty-guided sampling with re-estimation and continuous batching.

    A fixed pool of `batch` slots runs one jitted step after another. In each step the network
    runs once on every slot (all guidance branches in one batched call, `guidance`), and every
    pixel moves by `plans.adaptive_advance` with its own remaining step count, with per-pixel
    DDIM (`ddim.ddim_step`). In a slot's first step and every `rule.reestimate_every` steps
    after, the head reads the features of that same call (the first B rows: the actual state and
    labels; no extra backbone call) and the counts of the still-noisy pixels are recomputed
    (`plans.adaptive_counts`, scaled by the level each pixel has left). An image is done when
    every pixel is at level 0; its slot then takes the next image, with fresh noise. Known pixels
    (inpainting) start and stay at level 0, bit for bit.

    Costs: the whole run makes (pool steps) batched network calls, i.e. pool steps x batch
    forward passes of one image; image j's own count is the steps it spent in a slot (int32
    `network_calls` [N] in the extras). The difference is the idle slots at the end of the run,
    when fewer than `batch` images are left.

    Randomness: image j draws from fold_in(k, j), with k the first half of split(key(seed)):
    its start noise from fold_in(., 0), its DDIM noise of its own step a from fold_in(., a + 1).
    An image's result therefore does not depend on the batch or on the other images (up to the
    floating-point effects of the batch size on the network); only input guidance's noisier
    context is drawn per pool step, from the second half.
    """

    def __init__(
        self,
        predict: Predict,
        log_error: LogError,
        *,
        batch: int,
        image_shape: tuple[int, int, int],
        schedule,
        prediction: str,
        num_classes: int = 0,
        sharding: jax.sharding.Sharding | None = None,
    ):
        """
        Args:
          predict: the backbone: (params, z, levels, labels) -> (prediction, features).
          log_error: the head: (params, features, levels) -> predicted log squared error.
          batch: the number of slots.
          image_shape: (H, W, C).
          schedule, prediction: the model's noise schedule and prediction type.
          num_classes: classes of a class-conditional model (0: unconditional).
          sharding: where the slot arrays live (split along the slot axis); default one device.
        """
        checks.check_choice("prediction type", prediction, corruption.PREDICTIONS)
        if prediction == "eps" and sampling_inputs.alpha_at_noise(schedule) == 0.0:
            raise sampling_inputs.eps_at_noise_error("adaptive sampling starts at level 1")
        self.predict, self.log_error = predict, log_error
        self.batch = _check_count("batch", batch)
        self.image_shape = tuple(image_shape)
        self.schedule, self.prediction, self.num_classes = schedule, prediction, num_classes
        self.sharding = sharding
        self._step = jax.jit(
            self._step_impl, static_argnames=("rule", "branches", "has_labels", "match")
        )
        self._refill = jax.jit(self._refill_impl)

    def put(self, arr):
        return jnp.asarray(arr) if self.sharding is None else jax.device_put(arr, self.sharding)

    # -- the jitted step and refill -------------------------------------------------------------

    def _step_impl(
        self,
        params: Any,
        state: PoolState,
        key: Array,
        pool_step: Array,
        eta: Array,
        cfg_scale: Array,
        input_scale: Array,
        level: Array,
        *,
        rule: AdaptiveRule,
        branches: guidance.Branches,
        has_labels: bool,
        match: bool,
    ) -> tuple[PoolState, Array]:
        k_images, k_context = jax.random.split(key)
        rows = state.z.shape[0]
        shape = state.z.shape[1:]
        step_keys = jax.vmap(
            lambda i, a: jax.random.fold_in(jax.random.fold_in(k_images, i), a + 1)
        )(jnp.maximum(state.image, 0), state.age)
        t, z, update = state.levels, state.z, state.update
        labels = state.labels if has_labels else None

        captured = []

        def denoise(z_all, t_all, labels_all):
            pred, features = self.predict(params, z_all, t_all, labels_all)
            captured.append(features)
            return pred

        # One batched call: its first B rows are the actual state with the given labels
        # (`guidance.guided_prediction` puts that branch first), whose features the head reads.
        pred = guidance.guided_prediction(
            denoise,
            z,
            t,
            update,
            labels,
            jax.random.fold_in(k_context, pool_step),
            branches=branches,
            num_classes=self.num_classes,
            cfg_scale=cfg_scale,
            input_scale=input_scale,
            level=None if match else level,
            schedule=self.schedule,
        )
        if len(captured) != 1:
            raise AssertionError(f"expected one batched network call per step; got {len(captured)}")
        features = jax.tree.map(lambda f: f[:rows], captured[0])

        if rule.reestimate_every:
            reestimate = state.active & (state.age % rule.reestimate_every == 0)
        else:
            reestimate = state.active & (state.age == 0)

        def estimate():
            log_error = self.log_error(params, features, t).astype(jnp.float32)
            difficulty = plans.difficulty_from_log_error(
                log_error, update, low=rule.low, high=rule.high
            )
            counts = plans.adaptive_counts(difficulty, t, rule.budget)
            return log_error, jnp.minimum(counts, (rule.budget[1] - state.age)[:, None, None])

        def skip():
            return jnp.zeros(t.shape, jnp.float32), jnp.zeros(t.shape, jnp.int32)

        log_error, fresh = jax.lax.cond(jnp.any(reestimate), estimate, skip)
        counts = jnp.where(reestimate[:, None, None], fresh, state.counts)
        first = (state.active & (state.age == 0))[:, None, None]

        s, counts = plans.adaptive_advance(t, counts, rule.align)
        x_hat, eps_hat = corruption.to_x_eps(pred, z, t, self.schedule, self.prediction)
        noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(step_keys)
        z_next = ddim.ddim_step(z, x_hat, eps_hat, t, s, noise, eta, self.schedule)
        axes = tuple(range(1, counts.ndim))
        new = dataclasses.replace(
            state,
            z=jnp.where(update[..., None], z_next, z),
            levels=s,
            counts=counts,
            moves=state.moves + (s < t).astype(jnp.int32),
            log_error=jnp.where(first, log_error, state.log_error),
            age=state.age + state.active.astype(jnp.int32),
        )
        done = state.active & jnp.all(counts == 0, axis=axes)
        return dataclasses.replace(new, active=state.active & ~done), done

    def _refill_impl(
        self,
        state: PoolState,
        key: Array,
        replace: Array,
        image: Array,
        x: Array,
        known: Array,
        labels: Array,
    ) -> PoolState:
        """Slots with replace True take image `image` (-1: become empty) with fresh noise."""
        k_images = jax.random.split(key)[0]
        noise = jax.vmap(
            lambda i: jax.random.normal(
                jax.random.fold_in(jax.random.fold_in(k_images, i), 0), x.shape[1:], jnp.float32
            )
        )(jnp.maximum(image, 0))
        active = image >= 0
        update = ~known & active[:, None, None]
        start = update.astype(jnp.float32)
        zeros = jnp.zeros(start.shape, jnp.int32)
        new = PoolState(
            z=ddim.noised(x, start, noise, self.schedule),
            levels=start,
            counts=update.astype(jnp.int32),  # replaced by the estimate of the first step
            update=update,
            moves=zeros,
            log_error=jnp.zeros(start.shape, jnp.float32),
            labels=labels,
            image=image,
            age=jnp.zeros_like(image),
            active=active,
        )

        def pick(a, b):
            return jnp.where(replace.reshape(-1, *(1,) * (a.ndim - 1)), a, b)

        return jax.tree.map(pick, new, state)

    # -- the host loop --------------------------------------------------------------------------

    def run(
        self,
        params: Any,
        num: int,
        rule: AdaptiveRule,
        *,
        seed: int = 0,
        images: np.ndarray | None = None,
        known: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
        context_level: str | float = "match",
    ) -> Samples:
        """Samples `num` images (inpaints them where `known` is given) by the rule.

        Args:
          params: the parameters `predict` and `log_error` take.
          num: the number of images.
          rule: the step-count rule.
          seed: see the class docstring.
          images: float32 [num, H, W, C], the known pixels' values (with `known`).
          known: [num, H, W] bool or 0/1, True = known (kept exactly), or None: generate all.
          labels: int32 [num] in [0, num_classes], or None.
          eta, cfg_scale, input_guidance, context_level: as in `apd.sampling.sample`.
        Returns:
          `Samples`: images [num, H, W, C]; one `Cost` for the pool (network_calls = pool
          steps); extras network_calls int32 [num] (the image's steps), steps_per_pixel int32
          [num, H, W] (0 for known pixels) and log_error float32 [num, H, W] (the head's
          prediction at the image's first step; NaN for an image with nothing to generate).
        """
        num = _check_count("the number of images", num)
        H, W, C = self.image_shape
        if (images is None) != (known is None):
            raise ValueError(
                "adaptive inpainting takes images and known masks together; got "
                f"images={'set' if images is not None else None}, "
                f"known={'set' if known is not None else None}."
            )
        if images is None:
            images = np.zeros((num, H, W, C), np.float32)
            known = np.zeros((num, H, W), bool)
        images, known = np.asarray(images, np.float32), np.asarray(known) != 0
        if images.shape != (num, H, W, C) or known.shape != (num, H, W):
            raise ValueError(
                f"adaptive inpainting needs images [{num}, {H}, {W}, {C}] and known masks "
                f"[{num}, {H}, {W}]; got shapes {images.shape} and {known.shape}."
            )
        has_labels = labels is not None
        branches = sampling_inputs.guidance_branches(
            cfg_scale, input_guidance, labels, self.num_classes
        )
        if has_labels:
            labels = np.asarray(sampling_inputs.check_labels(labels, num, self.num_classes))
        sampling_inputs.check_scalar("eta", eta, 0.0, 1.0)
        sampling_inputs.check_scalar("cfg_scale", cfg_scale)
        sampling_inputs.check_scalar("input_guidance", input_guidance)
        match = isinstance(context_level, str)
        if match:
            checks.check_choice("context_level", context_level, ("match",))
        else:
            sampling_inputs.check_scalar("context_level", context_level, 0.0, 1.0)

        B = self.batch
        key = jax.random.key(seed)
        scalars = [sampling_inputs.f32(v) for v in (eta, cfg_scale, input_guidance)]
        scalars.append(sampling_inputs.f32(0.0 if match else context_level))
        out = np.zeros((num, H, W, C), np.float32)
        calls = np.zeros(num, np.int32)
        steps_per_pixel = np.zeros((num, H, W), np.int32)
        first_log_error = np.full((num, H, W), np.nan, np.float32)
        # An image with nothing to generate is done before it takes a slot.
        todo = []
        for j in range(num):
            if known[j].all():
                out[j] = images[j]
            else:
                todo.append(j)
        queue = iter(todo)

        state, slot_image = self._fill(
            self._empty_state(), key, np.ones(B, bool), queue, images, known, labels
        )
        pool_steps, finished = 0, num - len(todo)
        while (slot_image >= 0).any():
            state, done = self._step(
                params,
                state,
                key,
                jnp.int32(pool_steps),
                *scalars,
                rule=rule,
                branches=branches,
                has_labels=has_labels,
                match=match,
            )
            pool_steps += 1
            done = np.asarray(done)
            if not done.any():
                continue
            z, moves, log_error, age = jax.device_get(
                (state.z, state.moves, state.log_error, state.age)
            )
            for slot in np.flatnonzero(done):
                j = slot_image[slot]
                out[j], steps_per_pixel[j] = z[slot], moves[slot]
                first_log_error[j], calls[j] = log_error[slot], age[slot]
            finished += int(done.sum())
            state, refilled = self._fill(state, key, done, queue, images, known, labels)
            slot_image = np.where(done, refilled, slot_image)
            logging.log_every_n_seconds(
                logging.INFO,
                "Sampled %d/%d adaptively (%d pool steps).",
                10,
                finished,
                num,
                pool_steps,
            )
        cost = sampling.Cost(pool_steps, pool_steps * branches.count, B * branches.count)
        logging.info(
            "Adaptive sampling: %d images in %d pool steps of %d slots (%d forward passes, "
            "%.1f per image).",
            num,
            pool_steps,
            B,
            pool_steps * B,
            calls.mean(),
        )
        extras = {
            "network_calls": calls,
            "steps_per_pixel": steps_per_pixel,
            "log_error": first_log_error,
        }
        return Samples(out, (cost,), extras)

    def _empty_state(self) -> PoolState:
        H, W, C = self.image_shape
        B = self.batch
        grid = np.zeros((B, H, W), np.float32)
        state = PoolState(
            z=np.zeros((B, H, W, C), np.float32),
            levels=grid,
            counts=grid.astype(np.int32),
            update=grid.astype(bool),
            moves=grid.astype(np.int32),
            log_error=grid,
            labels=np.zeros(B, np.int32),
            image=np.full(B, -1, np.int32),
            age=np.zeros(B, np.int32),
            active=np.zeros(B, bool),
        )
        return jax.tree.map(self.put, state)

    def _fill(
        self,
        state: PoolState,
        key: Array,
        replace: np.ndarray,
        queue: Iterator[int],
        images: np.ndarray,
        known: np.ndarray,
        labels: np.ndarray | None,
    ) -> tuple[PoolState, np.ndarray]:
        """Gives each slot with replace True the next image of the queue, or makes it empty when
        the queue is exhausted; returns the new state and each slot's new image (-1: empty)."""
        H, W, C = self.image_shape
        B = self.batch
        image = np.full(B, -1, np.int32)
        x = np.zeros((B, H, W, C), np.float32)
        mask = np.ones((B, H, W), bool)
        lab = np.zeros(B, np.int32)
        for slot in np.flatnonzero(replace):
            j = next(queue, -1)
            if j >= 0:
                image[slot], x[slot], mask[slot] = j, images[j], known[j]
                lab[slot] = 0 if labels is None else labels[j]
        arrays = (np.asarray(replace, bool), image, x, mask, lab)
        return self._refill(state, key, *(self.put(a) for a in arrays)), image
