"""Sampling from a trained run in fixed-size chunks: the library behind `apd.sample` and the
evaluators of `apd.evaluate`, for notebooks as much as for the binaries.

    run = apd.runs.load("runs/fmnist")                           # or export_dir=...
    sampler = Sampler(run, batch=64)
    out = sampler.generate(16, steps=50, seed=0)                  # out.images [16, 28, 28, 1]
    x, y = apd.runs.first_images(run, "test", 16)
    known = apd.evaluation.masks.make_masks("wide", 0, 16, run.image_shape[:2])
    out = sampler.inpaint(x, known, steps=50, labels=y, seed=0)  # out.network_calls: 50

Every method takes N images (or draws N samples) and works in chunks of `batch`: the last chunk
is padded by repeating its last row, so every chunk has one shape and each kind of plan compiles
once per setting (step count, eta, guidance scales). The parameters are replicated over the local
devices and each chunk is split over them (over the most devices, up to all, that divide
`batch`). Chunk i draws from `fold_in(key(seed), i)`, split in three: the start noise, the
sampler's own noise, and the plan's random choices (the autoregressive order). The same seed and
batch give the same images.

Labels are int32 [N] in [0, num_classes] (`resolve_labels` makes them from a mode such as
'random' or 'data'); None gives a class-conditional model the null label (unconditional samples).
Each method returns `Samples`: images float32 [N, H, W, C] in [-1, 1], the network cost of each
chunk (`apd.sampling.Cost`) and the per-sample arrays a plan adds (adaptive: steps per pixel and
the predicted log error).
"""

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from apd import checks, plans, runs, sampling
from apd.sampling import images as images_lib

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


def steps_per_pixel(plan: plans.Plan) -> np.ndarray:
    """[B, *tokens] int32: the steps in which each token's level falls (its network calls)."""
    lv = np.broadcast_to(np.asarray(plan.levels), (plan.levels.shape[0], *plan.shape))
    return np.sum(lv[1:] < lv[:-1], axis=0).astype(np.int32)


def default_min_steps(steps: int) -> int:
    """The adaptive plan's default fewest steps per pixel: max(1, 2 steps // 5)."""
    return max(1, 2 * steps // 5)


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
        self._head: tuple[Any, Callable] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """(H, W) of the run's images."""
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
                channels=self.run.image_shape[-1],
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

    def uncertainty_head(self) -> tuple[Any, Callable]:
        """(head parameters on the devices, jitted predict) of the run's uncertainty head.

        Raises `runs.MissingUncertaintyHeadError` (naming the command that trains one) without one.
        """
        if self._head is None:
            head = runs.load_uncertainty(self.run)
            predict = jax.jit(runs.log_error_fn(self.run.model, head.head))
            self._head = (jax.device_put(head.params, self.replicated), predict)
        return self._head

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
            images = self._check_images(images)
        fn = self._sample_fn(eta, cfg_scale, input_guidance, context_level)
        outputs, extras, costs = [], [], []
        for key, n, (x, lab, *rest) in self._chunks(num, seed, (images, labels, *inputs)):
            k_noise, k_sample, k_plan = jax.random.split(key, 3)
            noise = jax.random.normal(k_noise, (self.batch, *self.run.image_shape), jnp.float32)
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

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[1:] != tuple(self.run.image_shape):
            raise ValueError(
                f"images must be float [N, H, W, C] with (H, W, C) = {self.run.image_shape}; got "
                f"shape {arr.shape}."
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"images must be float in [-1, 1]; got dtype {arr.dtype}.")
        return arr.astype(np.float32)

    def _check_known(self, known: np.ndarray) -> np.ndarray:
        arr = np.asarray(known)
        if arr.ndim != 3 or arr.shape[1:] != self.grid or not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"masks must be [N, H, W] with (H, W) = {self.grid}, 0 (generate) or 1 (known); "
                f"got {arr.dtype} of shape {arr.shape}."
            )
        return arr.astype(np.uint8)

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
        return self._sample(
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
        return self._sample(
            known.shape[0],
            seed,
            lambda key, x, noise, lab, ms: (plans.inpaint(jnp.asarray(ms), steps), {}),
            images=images,
            labels=labels,
            inputs=(known,),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
            context_level=context_level,
        )

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
        if strength.ndim != 3 or strength.shape[1:] != self.grid:
            raise ValueError(
                f"strength must be [N, H, W] with (H, W) = {self.grid}; got shape {strength.shape}."
            )
        checks.check_levels(strength, "edit strength")
        return self._sample(
            strength.shape[0],
            seed,
            lambda key, x, noise, lab, s: (plans.edit(s, steps), {}),
            images=images,
            labels=labels,
            inputs=(strength,),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )

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
        order is drawn per sample from the chunk's plan key)."""
        return self._sample(
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

    def adaptive(
        self,
        num: int,
        *,
        steps: int = 250,
        min_steps: int | None = None,
        images: np.ndarray | None = None,
        known: np.ndarray | None = None,
        align: str = "end",
        difficulty_low: float | None = None,
        difficulty_high: float | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        eta: float = 0.25,
        cfg_scale: float = 0.0,
        input_guidance: float = 0.0,
    ) -> Samples:
        """Uncertainty-guided sampling with the run's head (`python -m apd.train_uncertainty`).

        The head predicts each pixel's log squared error at the start state (the noise, and the
        known pixels of `images` where `known` is given: adaptive inpainting);
        `plans.difficulty_from_log_error` maps it to [0, 1] (per image, or by the absolute range
        difficulty_low..difficulty_high) and pixel i takes round(min_steps + (steps - min_steps)
        d_i) steps. min_steps defaults to `default_min_steps(steps)`.

        Extras: steps_per_pixel int32 [N, H, W] (0 for known pixels) and log_error float32
        [N, H, W], the head's prediction.
        """
        low = default_min_steps(steps) if min_steps is None else min_steps
        if (images is None) != (known is None):
            raise ValueError(
                "adaptive inpainting takes images and known masks together; got "
                f"images={'set' if images is not None else None}, "
                f"known={'set' if known is not None else None}."
            )
        if known is not None:
            known = self._check_known(known)
        head_params, predict = self.uncertainty_head()

        def make_plan(key, x, noise, lab, ms):
            if ms is None:
                start = jnp.ones((self.batch, *self.grid), jnp.float32)
            else:
                start = 1.0 - jnp.asarray(ms, jnp.float32)
            x0 = jnp.zeros_like(noise) if x is None else x
            z0 = sampling.noised(x0, start, noise, self.run.schedule)
            log_error = predict(self.params, head_params, z0, start, lab)
            difficulty = plans.difficulty_from_log_error(
                log_error, start > 0, low=difficulty_low, high=difficulty_high
            )
            plan = plans.adaptive(lambda _: difficulty, (low, steps), start, align=align)
            return plan, {"steps_per_pixel": steps_per_pixel(plan), "log_error": log_error}

        return self._sample(
            num,
            seed,
            make_plan,
            images=images,
            labels=labels,
            inputs=(known,),
            eta=eta,
            cfg_scale=cfg_scale,
            input_guidance=input_guidance,
        )

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
        images, known = self._check_images(images), self._check_known(known)
        fn = self._repaint_fn(steps, jump, resample, eta)
        cost = sampling.repaint_cost(self.batch, steps, jump, resample)
        outputs = []
        for key, n, chunk in self._chunks(known.shape[0], seed, (images, known, labels)):
            k_sample = jax.random.split(key, 3)[1]
            x, ms, lab = (self.put(a) for a in chunk)
            outputs.append(np.asarray(fn(self.params, x, ms, k_sample, lab))[:n])
            self._log(len(outputs), known.shape[0], n, cost)
        return self._collect(outputs, [cost] * len(outputs), [])
