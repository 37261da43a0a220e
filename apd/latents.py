"""The latent codec of latent diffusion (method.md §6) and the encoding of a dataset into latents.

A latent diffusion run trains the diffusion model on the autoencoder's pre-quantisation latents,
normalised to unit variance per channel; generated latents are un-normalised, quantised and
decoded. `Codec` is that map and its inverse, shared by the encoder binary (`apd.encode`), the
sampler and the evaluation:

    codec = Codec.from_workdir("runs/ae")                  # latest checkpoint, EMA parameters
    codec = Codec.from_latents("latents/clipart")          # + the dataset's normalisation
    z = codec.encode(images, known)                        # [B, H/f, W/f, D], normalised
    x = codec.decode(z, known)                             # [B, H, W, C] in [-1, 1]
    m = codec.latent_mask(known)                           # [B, H/f, W/f], 1 = known token

`from_workdir` reads an `apd.train_autoencoder` workdir without writing to it: its config.json,
the model rebuilt from it (`autoencoder_task.build_model`, checked against the checkpoint's
parameter shapes), and the EMA parameters and quantiser statistics (a VQ codebook's EMA
codebook) of the latest readable checkpoint, or of `step`. `identity` names the autoencoder
(workdir, step, model, the checkpoint's parameter-shape hash and a hash of the parameters and
statistics themselves); a latent dataset stores it, and `check_same_autoencoder` compares two.

The methods take concrete arrays (numpy or jax; they check them, then call jitted functions, one
compilation per input shape, cached across codecs of the same model) and are batched: the
parameters are replicated over the local devices and a batch is split over them (padded to a
multiple of the device count by repeating its last row).

`encode_dataset` writes a latent dataset (layout and record format: `apd.data.latents`) in
shards of `shard_size` images, resumably: a shard is written to a temporary file renamed into
place, then its done-file; a rerun with the same settings keeps every shard that has its
done-file and rewrites the others. Process i of n writes shards i, i + n, ... of every split.
The normalisation statistics (per-channel mean and standard deviation of the train split's
latents, unflipped, over every token) are merged from the shards' done-files once every shard is
done, and written with the rest of the manifest into DIR/latents.json (`finalize`; by process 0
when the processes run together). Only the train split's flips are stored: the training
pipeline flips, evaluation reads the other splits unflipped.
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from array_record.python import array_record_module
from jax.sharding import NamedSharding, PartitionSpec

from apd import checks, cli, runs
from apd import data as data_lib
from apd import export as export_lib
from apd.data import latents as latents_data
from apd.evaluation import integrity
from apd.models import autoencoder as ae
from apd.models import quantizers
from apd.training import autoencoder_task, builder
from apd.training import checkpoint as checkpoint_lib

Array = jax.Array

STATS_SPLIT = "train"
"""The split whose latents give the normalisation statistics, and the only split whose flips are
stored (the training pipeline reads it; evaluation reads the other splits unflipped)."""

IDENTITY_KEYS = ("step", "param_shapes_sha256", "params_sha256")
"""The identity entries two descriptions of the same autoencoder share (the workdir may move)."""


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel statistics: normalised = (z - shift) / scale.

    Attributes:
      shift: float32 [D].
      scale: float32 [D], positive.
      measured: how they were measured (a sentence).
    """

    shift: np.ndarray
    scale: np.ndarray
    measured: str

    def __post_init__(self):
        shift = np.asarray(self.shift, np.float32)
        scale = np.asarray(self.scale, np.float32)
        if shift.ndim != 1 or scale.shape != shift.shape:
            raise ValueError(
                f"normalisation shift and scale must both be [D]; got shapes {shift.shape} and "
                f"{scale.shape}."
            )
        if not (np.all(np.isfinite(shift)) and np.all(scale > 0) and np.all(np.isfinite(scale))):
            raise ValueError(
                f"normalisation shift must be finite and scale finite and positive; got shift "
                f"{shift.tolist()}, scale {scale.tolist()}."
            )
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "scale", scale)

    @classmethod
    def identity(cls, dim: int) -> "Normalization":
        """shift 0, scale 1: the raw latents."""
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32), "none (raw latents)")

    def to_json(self) -> dict[str, Any]:
        return {
            "shift": [float(v) for v in self.shift],
            "scale": [float(v) for v in self.scale],
            "measured": self.measured,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "Normalization":
        return cls(record["shift"], record["scale"], record["measured"])


def moments(z: np.ndarray) -> dict[str, Any]:
    """Per-channel count, mean and sum of squared deviations (float64) of latents [..., D]."""
    flat = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
    mean = flat.mean(axis=0) if len(flat) else np.zeros(flat.shape[1])
    return {
        "count": len(flat),
        "mean": mean.tolist(),
        "m2": np.sum(np.square(flat - mean), axis=0).tolist(),
    }


def merge_moments(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The moments of the union of the parts (Chan et al.'s pairwise update, float64)."""
    count, mean, m2 = 0, None, None
    for part in parts:
        n = int(part["count"])
        if n == 0:
            continue
        mu, sq = np.asarray(part["mean"], np.float64), np.asarray(part["m2"], np.float64)
        if count == 0:
            count, mean, m2 = n, mu, sq
            continue
        delta = mu - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + sq + np.square(delta) * (count * n / total)
        count = total
    if count == 0:
        raise ValueError("no latents to measure the normalisation statistics on.")
    return {"count": count, "mean": mean.tolist(), "m2": m2.tolist()}


def normalization_from_moments(stats: Mapping[str, Any], measured: str) -> Normalization:
    """shift = mean, scale = standard deviation; a constant channel (std 0) keeps scale 1."""
    mean = np.asarray(stats["mean"], np.float64)
    std = np.sqrt(np.asarray(stats["m2"], np.float64) / int(stats["count"]))
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        logging.warning(
            "Latent channels %s are constant (std 0): their scale is left at 1.", constant.tolist()
        )
    return Normalization(mean, np.where(std > 0, std, 1.0), measured)


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


def tree_sha256(tree: Any) -> str:
    """A hash of a tree of arrays: its paths, dtypes, shapes and values."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return integrity.arrays_sha256({jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


def check_same_autoencoder(expected: Mapping, found: Mapping, what: str) -> None:
    """Raises ValueError unless two autoencoder identities (`Codec.identity`) agree on
    `IDENTITY_KEYS` (step, parameter shapes, parameter values).

    Args:
      expected: the identity `what` was made with.
      found: the identity of the autoencoder at hand.
      what: what was made with `expected`, for the message (e.g. "the latent dataset in DIR").
    """
    differ = [k for k in IDENTITY_KEYS if expected.get(k) != found.get(k)]
    if differ:
        details = ", ".join(f"{k} {expected.get(k)!r} vs {found.get(k)!r}" for k in differ)
        raise ValueError(
            f"{what} was made with the autoencoder {expected.get('workdir')} at step "
            f"{expected.get('step')}, but the autoencoder at hand ({found.get('workdir')} at step "
            f"{found.get('step')}) differs: {details}. Use the same autoencoder checkpoint, or "
            "encode the dataset again with this one (apd.encode)."
        )


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------


def _stats_shape(x: Array) -> Array:
    return jnp.reshape(x, (1, 1, 1, -1))


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, variables, images, known, shift, scale):
    z = model.apply(variables, images, known, method="encode")
    return (z - _stats_shape(shift)) / _stats_shape(scale)


@functools.partial(jax.jit, static_argnums=0)
def _codes(model, variables, images, known, shift, scale):
    del shift, scale
    z = model.apply(variables, images, known, method="encode")
    return model.apply(variables, z, method="quantize").codes


@functools.partial(jax.jit, static_argnums=0, static_argnames="quantize")
def _decode(model, variables, latents, known, shift, scale, quantize=True):
    z = latents * _stats_shape(scale) + _stats_shape(shift)
    if quantize:
        z = model.apply(variables, z, method="quantize").quantized
    return jnp.clip(model.apply(variables, z, known, method="decode"), -1.0, 1.0)


class Codec:
    """A trained autoencoder as the latent codec (see the module docstring).

    Attributes:
      model: the `apd.models.autoencoder.Autoencoder`.
      variables: {'params': EMA parameters, 'quantizer_stats': ...}, replicated over the local
        devices.
      image_shape: (H, W, C) of the images the autoencoder was trained on (any H, W divisible
        by `factor` can be encoded).
      identity: workdir, step, model, param_shapes_sha256, params_sha256.
      config: the autoencoder run's config (its config.json), or None.
      normalization: the latents' per-channel `Normalization`.
    """

    def __init__(
        self,
        model: ae.Autoencoder,
        variables: Mapping[str, Any],
        *,
        image_shape: Sequence[int],
        identity: Mapping[str, Any],
        config: mc.ConfigDict | None = None,
        normalization: Normalization | None = None,
    ):
        self.model = model
        self.image_shape = tuple(int(n) for n in image_shape)
        self.identity = dict(identity)
        self.config = config
        self.normalization = normalization or Normalization.identity(model.latent_dim)
        if self.normalization.shift.shape != (model.latent_dim,):
            raise ValueError(
                f"the normalisation has {self.normalization.shift.shape[0]} channels; the "
                f"autoencoder's latents have {model.latent_dim}."
            )
        self._mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
        replicated = NamedSharding(self._mesh, PartitionSpec())
        self._split = NamedSharding(self._mesh, PartitionSpec("data"))
        self.variables = jax.device_put(dict(variables), replicated)
        self._shift = jax.device_put(self.normalization.shift, replicated)
        self._scale = jax.device_put(self.normalization.scale, replicated)
        self._raw = (
            jax.device_put(np.zeros(model.latent_dim, np.float32), replicated),
            jax.device_put(np.ones(model.latent_dim, np.float32), replicated),
        )

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_workdir(
        cls, ae_workdir: str, step: int | None = None, normalization: Normalization | None = None
    ) -> "Codec":
        """The autoencoder of an `apd.train_autoencoder` workdir (read-only).

        Args:
          ae_workdir: the autoencoder's training workdir.
          step: the checkpoint step; None for the newest readable one.
          normalization: the latents' statistics; None for the raw latents.
        Raises:
          FileNotFoundError: no such directory, no config.json or no checkpoint.
          ValueError: not an autoencoder run (e.g. a diffusion workdir), an unknown step, or
            parameters that do not fit the model its config builds.
        """
        directory = os.path.abspath(ae_workdir)
        train = (
            f"python -m apd.train_autoencoder --config=experiments/NAME.py --workdir={directory}"
        )
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"no autoencoder workdir {directory}: the directory does not exist. Train an "
                f"autoencoder first: {train}"
            )
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise FileNotFoundError(
                f"{directory} is not an autoencoder workdir: it has no config.json (written by "
                "python -m apd.train_autoencoder)."
            )
        config = runs.read_config(directory)
        task = config.get("task", "diffusion")
        if task != autoencoder_task.TASK:
            raise ValueError(
                f"{directory} is not an autoencoder run: its config.json has task {task!r}. Pass "
                "the workdir of python -m apd.train_autoencoder (config.task = 'autoencoder')."
            )
        try:
            step, params, description = checkpoint_lib.restore_params(directory, step)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"the autoencoder workdir {directory} has no checkpoint ({e}). Train it first: "
                f"{train}"
            ) from e
        model_desc = description.get("model", {})
        if model_desc.get("task") != autoencoder_task.TASK:
            raise ValueError(
                f"the checkpoint at step {step} in {directory} is not an autoencoder's (its model "
                f"is {model_desc}); pass the workdir of python -m apd.train_autoencoder."
            )
        image_shape = tuple(int(n) for n in model_desc["image_shape"])
        model = autoencoder_task.build_model(config, image_shape[-1])
        abstract = jax.eval_shape(
            functools.partial(model.init, jax.random.key(0)),
            jnp.zeros((1, *image_shape), jnp.float32),
            jnp.ones((1, *image_shape[:2]), jnp.float32),
        )
        built = builder.model_description({}, abstract["params"])["param_shapes_sha256"]
        stored = builder.model_description({}, params)["param_shapes_sha256"]
        if built != stored:
            raise ValueError(
                f"the autoencoder {model_desc.get('name')!r} built from {directory}/config.json "
                f"has other parameter shapes (hash {built}) than the EMA parameters of its "
                f"checkpoint at step {step} (hash {stored}): the checkpoint was written by another "
                "version of apd.models."
            )
        stats = {}
        if abstract.get(quantizers.STATS):
            stats = _restore_quantizer_stats(directory, step)
        variables = autoencoder_task.variables(params, stats)
        identity = {
            "workdir": directory,
            "step": int(step),
            "model": model_desc,
            "param_shapes_sha256": description["param_shapes_sha256"],
            "params_sha256": tree_sha256(variables),
        }
        return cls(
            model,
            variables,
            image_shape=image_shape,
            identity=identity,
            config=config,
            normalization=normalization,
        )

    @classmethod
    def from_export(cls, directory: str) -> "Codec":
        """The codec `export_codec` wrote into `directory` (an export's `autoencoder/`): the
        model rebuilt from its config, its variables checked against the recorded hash."""
        directory = os.path.abspath(directory)
        record = integrity.read_json(os.path.join(directory, CODEC_JSON))
        config = runs.read_config(directory)
        image_shape = tuple(int(n) for n in record["image_shape"])
        model = autoencoder_task.build_model(config, image_shape[-1])
        variables = export_lib.restore_tree(os.path.join(directory, "variables"))
        identity = record["identity"]
        found = tree_sha256(variables)
        if found != identity["params_sha256"]:
            raise ValueError(
                f"the autoencoder variables in {directory} have hash {found}, not the "
                f"{identity['params_sha256']} recorded in its {CODEC_JSON}: the export is corrupt."
            )
        return cls(
            model,
            variables,
            image_shape=image_shape,
            identity=identity,
            config=config,
            normalization=Normalization.from_json(record["normalization"]),
        )

    @classmethod
    def from_latents(cls, latent_dir: str, ae_workdir: str | None = None) -> "Codec":
        """The codec of a latent dataset (`apd.encode`'s DIR): the autoencoder it names (or the
        one in `ae_workdir`, e.g. after the workdir moved) at the step it names, checked to be
        the same (`check_same_autoencoder`), with the dataset's normalisation."""
        manifest = latents_data.read_manifest(latent_dir)
        recorded = manifest["autoencoder"]
        codec = cls.from_workdir(ae_workdir or recorded["workdir"], step=recorded["step"])
        check_same_autoencoder(
            recorded, codec.identity, f"the latent dataset in {os.path.abspath(latent_dir)}"
        )
        return codec.with_normalization(Normalization.from_json(manifest["normalization"]))

    def with_normalization(self, normalization: Normalization) -> "Codec":
        """The same autoencoder with other normalisation statistics."""
        return Codec(
            self.model,
            self.variables,
            image_shape=self.image_shape,
            identity=self.identity,
            config=self.config,
            normalization=normalization,
        )

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def factor(self) -> int:
        """The spatial downsampling factor f."""
        return self.model.factor

    @property
    def latent_dim(self) -> int:
        """D, the latent channels."""
        return self.model.latent_dim

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) of an image -> (H / f, W / f, D) of its latents."""
        shape = tuple(image_shape)
        channels = self.model.image_channels
        if len(shape) != 3 or shape[-1] != channels:
            raise ValueError(
                f"the autoencoder encodes images (H, W, {channels}); got image shape {shape}."
            )
        height, width = shape[:2]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"image size {(height, width)} must be divisible by the autoencoder's factor "
                f"{self.factor}."
            )
        return height // self.factor, width // self.factor, self.latent_dim

    def latent_mask(self, known: Any) -> Array:
        """Pixel mask [B, H, W] -> token mask [B, H / f, W / f] (`autoencoder.latent_mask`: a
        token is known only when all the pixels it covers are known)."""
        return ae.latent_mask(known, self.factor)

    # -- encode and decode -----------------------------------------------------------------------

    def encode(self, images: Any, known: Any = None) -> Array:
        """Images and their pixel mask -> normalised pre-quantisation latents.

        Args:
          images: float [B, H, W, C] in [-1, 1]; H, W divisible by `factor`.
          known: [B, H, W] in {0, 1} (1 = known pixel; holes are zeroed before encoding) or
            None (all known).
        Returns:
          float32 [B, H / f, W / f, D]: (z - shift) / scale.
        """
        self._check_images(images, known)
        return self._run(_encode, images, known, self._shift, self._scale)

    def encode_raw(self, images: Any, known: Any = None) -> Array:
        """As `encode`, without the normalisation: the encoder's output z."""
        self._check_images(images, known)
        return self._run(_encode, images, known, *self._raw)

    def codes(self, images: Any, known: Any = None) -> Array:
        """The code of every latent token: int32 [B, H / f, W / f] in [0, `num_codes`)."""
        self._check_images(images, known)
        return self._run(_codes, images, known, *self._raw)

    @property
    def num_codes(self) -> int:
        """The size of the quantiser's code space (a VQ codebook's entries, FSQ's grid)."""
        return int(
            quantizers.from_config(dict(self.model.quantizer_config), self.latent_dim).num_codes
        )

    def decode(self, latents: Any, known: Any = None, quantize: bool = True) -> Array:
        """Normalised latents -> images: un-normalise (z * scale + shift), quantise, decode.

        Args:
          latents: float [B, h, w, D] (normalised, as `encode` returns them).
          known: [B, h f, w f] in {0, 1}, the pixel mask the decoder is conditioned on, or None.
          quantize: False decodes the latents as they are, skipping the quantiser (a diagnostic:
            what the quantiser costs; the decoder was trained on quantised latents).
        Returns:
          float32 [B, h f, w f, C], clipped to [-1, 1].
        """
        self._check_latents(latents, known)
        fn = functools.partial(_decode, quantize=bool(quantize))
        return self._run(fn, latents, known, self._shift, self._scale)

    def _run(self, fn, x: Any, known: Any, shift: Array, scale: Array) -> Array:
        """fn(model, variables, x, known, shift, scale) on the batch split over the devices."""
        rows = np.shape(x)[0]
        x, known = self._put(x), self._put(known)
        return fn(self.model, self.variables, x, known, shift, scale)[:rows]

    def _put(self, x: Any) -> Array | None:
        """A batch on the local devices, split along axis 0 (padded with its last row)."""
        if x is None:
            return None
        pad = -np.shape(x)[0] % self._mesh.size
        x = jnp.asarray(x, jnp.float32)
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        return jax.device_put(x, self._split)

    def _check_images(self, images: Any, known: Any) -> None:
        channels = self.model.image_channels
        shape = tuple(np.shape(images))
        if len(shape) != 4 or shape[-1] != channels or shape[0] < 1:
            raise ValueError(
                f"encode: images must be [B, H, W, {channels}] with B >= 1; got shape {shape}."
            )
        if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
            raise ValueError(
                f"encode: images must be floats in [-1, 1]; got dtype {jnp.result_type(images)} "
                "(uint8 pixels: apd.data.transforms.to_float)."
            )
        self.latent_shape(shape[1:])
        checks.check_mask(known, shape[:3], "encode: known", optional=True)

    def _check_latents(self, latents: Any, known: Any) -> None:
        shape = tuple(np.shape(latents))
        if len(shape) != 4 or shape[-1] != self.latent_dim or shape[0] < 1:
            raise ValueError(
                f"decode: latents must be [B, h, w, {self.latent_dim}] with B >= 1; got shape "
                f"{shape}."
            )
        grid = (shape[0], shape[1] * self.factor, shape[2] * self.factor)
        checks.check_mask(known, grid, "decode: known", optional=True)


EXPORT_DIR = "autoencoder"
"""Where `apd.export` puts a latent run's codec in its export directory."""
CODEC_JSON = "codec.json"


def export_codec(codec: Codec, out: str, dataset: Mapping[str, Any]) -> None:
    """Writes a codec into the new directory `out` for `Codec.from_export`: `variables/` (the
    autoencoder's parameters and quantiser statistics, an Orbax standard checkpoint),
    `config.json` (the autoencoder's config) and `codec.json` (identity, image shape,
    normalisation, and `dataset`: the images the latents encode, `apd.runs.image_data`)."""
    os.makedirs(out)
    export_lib.save_tree(os.path.join(out, "variables"), jax.device_get(codec.variables))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        f.write(codec.config.to_json(indent=2, sort_keys=True))
    record = {
        "identity": codec.identity,
        "image_shape": list(codec.image_shape),
        "normalization": codec.normalization.to_json(),
        "dataset": {k: list(v) if isinstance(v, tuple) else v for k, v in dataset.items()},
    }
    integrity.write_json(os.path.join(out, CODEC_JSON), record)


def _restore_quantizer_stats(directory: str, step: int) -> Any:
    """The quantiser statistics of the checkpoint at `step` (read-only, one tree)."""
    manager = checkpoint_lib._read_only_manager(
        os.path.join(directory, checkpoint_lib.CHECKPOINT_DIR),
        {"state": ocp.PyTreeCheckpointHandler(), "model": ocp.JsonCheckpointHandler()},
    )
    try:
        stats, _ = checkpoint_lib._restore_tree(manager, step, quantizers.STATS)
    except Exception as err:  # Orbax, TensorStore, OS errors
        raise checkpoint_lib.UnreadableCheckpointError(
            f"the quantiser statistics of the checkpoint at step {step} in {directory} cannot be "
            f"read ({checkpoint_lib.describe_error(err)})."
        ) from err
    finally:
        manager.close()
    return stats


# ---------------------------------------------------------------------------------------------
# Encoding a dataset
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodeResult:
    """What one `encode_dataset` call did."""

    images: int  # images encoded by this call (their flips not counted)
    flips: int  # flipped images encoded by this call
    shards_written: int
    shards_kept: int  # shards a previous call had completed
    seconds: float  # time spent reading, encoding and writing shards (compilation excluded)
    manifest: dict | None  # latents.json once every shard of every process is done, else None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class _Slice:
    """Records [start, stop) of a source."""

    def __init__(self, source: data_lib.Source, start: int, stop: int):
        self._source, self._start, self._stop = source, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, index: int) -> dict:
        return self._source[self._start + index]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


def make_plan(
    codec: Codec,
    data: Mapping[str, Any],
    splits: Sequence[str] | None,
    shard_size: int,
    command: str | None = None,
) -> tuple[dict[str, Any], dict[str, data_lib.Source]]:
    """The plan of an encode (what plan.json holds) and the sources of its splits.

    Args:
      codec: the autoencoder.
      data: the image dataset: `name`, and optionally `path`, `data_dir`, `image_size`,
        `random_flip` (a config's `data` block).
      splits: the splits to encode (must include `STATS_SPLIT`); None for all of the dataset's.
      shard_size: images per shard.
      command: the command line, recorded for the message of an unfinished encode.
    """
    name = data["name"]
    if name == data_lib.LATENTS:
        raise ValueError(
            "the config names the dataset 'latents' (a latent diffusion config); apd.encode "
            "needs the image dataset to encode: pass the config of the image dataset, or omit "
            "--config to use the autoencoder's."
        )
    shard_size = _positive_int("shard_size", shard_size)
    path, data_dir = data.get("path"), data.get("data_dir")
    image_size = data.get("image_size")
    available = data_lib.dataset_splits(name)
    splits = tuple(splits or available)
    for split in splits:
        checks.check_choice(f"split of {name}", split, available)
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits {list(splits)} name a split twice.")
    if STATS_SPLIT not in splits:
        raise ValueError(
            f"splits {list(splits)} must include {STATS_SPLIT!r}: the normalisation statistics "
            "are measured on its latents."
        )
    image_shape, num_classes = data_lib.dataset_info(name, image_size, path=path)
    latent_shape = codec.latent_shape(image_shape)
    flips = bool(data.get("random_flip", False))
    sources = {s: data_lib.get_source(name, s, data_dir=data_dir, path=path) for s in splits}
    split_plans = {}
    for split, source in sources.items():
        count = math.ceil(len(source) / shard_size)
        if count == 0:
            raise ValueError(f"split {split!r} of dataset {name!r} holds no images.")
        split_flips = flips and split == STATS_SPLIT
        split_plans[split] = {
            "records": len(source),
            "flips": split_flips,
            "record_bytes": latents_data.record_bytes(latent_shape, split_flips),
            "shards": [latents_data.shard_name(split, i, count) for i in range(count)],
        }
    plan = {
        "format": latents_data.FORMAT,
        "version": latents_data.VERSION,
        "autoencoder": codec.identity,
        "latent_shape": list(latent_shape),
        "factor": codec.factor,
        "dataset": {
            "name": name,
            "path": os.path.abspath(path) if path else None,
            "data_dir": os.path.abspath(data_dir) if data_dir else None,
            "image_size": image_size,
            "image_shape": list(image_shape),
            "num_classes": num_classes,
        },
        "record": {"label": "int32", "latents": str(latents_data.LATENT_DTYPE.name)},
        "shard_size": shard_size,
        "splits": split_plans,
        "command": command,
    }
    return plan, sources


def _check_plan(out: str, stored: Mapping[str, Any], plan: Mapping[str, Any]) -> None:
    """Raises ValueError unless a stored plan is the plan of this encode."""
    what = f"the encode in {out}"
    check_same_autoencoder(stored.get("autoencoder", {}), plan["autoencoder"], what)
    for key in plan:
        if key in ("autoencoder", "command"):
            continue
        if stored.get(key) != plan[key]:
            raise ValueError(
                f"{what} has other settings: {key} is {stored.get(key)!r} there, "
                f"{plan[key]!r} now. Pass a new --out (or delete {out} to start afresh)."
            )


def write_plan(out: str, plan: Mapping[str, Any], write: bool = True) -> None:
    """Writes DIR/plan.json, or checks an existing one against `plan` (a resumed encode).

    Args:
      out: the latent dataset's directory.
      plan: `make_plan`'s.
      write: False only checks (processes other than 0, after process 0 wrote it).
    Raises:
      ValueError: DIR holds files of something other than an encode, or an encode with other
        settings, or (write False) no plan.json.
    """
    cli.check_writable_dir(out, "latent dataset directory")
    path = os.path.join(out, latents_data.PLAN)
    if os.path.isfile(path):
        _check_plan(out, integrity.read_json(path), plan)
        return
    if not write:
        raise ValueError(
            f"{out} holds no {latents_data.PLAN}: process 0 writes it before the other "
            "processes encode (pass a barrier to encode_dataset, as apd.encode does)."
        )
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(
            f"latent dataset directory {out} is not empty and holds no {latents_data.PLAN} (no "
            "encode was started there); pass a new or empty --out."
        )
    os.makedirs(out, exist_ok=True)
    integrity.write_json(path, dict(plan))


def shard_done(out: str, shard: str, records: int, record_bytes: int) -> dict | None:
    """The done-file of a completed shard, or None when the shard must be (re)written: no
    done-file, no shard file, or a done-file for another record count or file size."""
    path = os.path.join(out, shard)
    done = os.path.join(out, latents_data.done_name(shard))
    if not (os.path.isfile(path) and os.path.isfile(done)):
        return None
    try:
        record = integrity.read_json(done)
    except (OSError, ValueError):
        return None
    if record.get("records") != records or record.get("bytes") != os.path.getsize(path):
        return None
    if records * record_bytes > record["bytes"]:
        return None
    return record


def write_shard(
    codec: Codec,
    source: data_lib.Source,
    out: str,
    shard: str,
    start: int,
    stop: int,
    *,
    flips: bool,
    batch: int,
    image_size: int | None,
) -> dict[str, Any]:
    """Encodes images [start, stop) of `source` (and their flips) into the shard file, atomically
    (a temporary file renamed into place), then writes its done-file; returns the done-file's
    record (records, bytes, start, stop, and the moments of the unflipped latents)."""
    path = os.path.join(out, shard)
    done = os.path.join(out, latents_data.done_name(shard))
    tmp = f"{path}.tmp"
    if os.path.exists(done):
        os.unlink(done)
    batches = data_lib.make_eval_dataset(
        _Slice(source, start, stop),
        global_batch_size=batch,
        image_size=image_size,
        process_index=0,
        process_count=1,
    )
    parts = []
    writer = array_record_module.ArrayRecordWriter(tmp, latents_data.RECORD_OPTIONS)
    try:
        for i in range(len(batches)):
            chunk = batches[i]
            x, valid = chunk["image"], np.asarray(chunk["mask"])
            if flips:
                z = np.asarray(codec.encode_raw(np.concatenate([x, x[:, :, ::-1]])))
                z, z_flipped = z[: len(x)][valid], z[len(x) :][valid]
            else:
                z, z_flipped = np.asarray(codec.encode_raw(x))[valid], None
            labels = np.asarray(chunk["label"])[valid]
            parts.append(moments(z))
            for j in range(len(z)):
                flipped = None if z_flipped is None else z_flipped[j]
                writer.write(latents_data.encode_record(int(labels[j]), z[j], flipped))
    except BaseException:
        writer.close()
        os.unlink(tmp)
        raise
    writer.close()
    os.replace(tmp, path)
    record = {
        "records": stop - start,
        "bytes": os.path.getsize(path),
        "start": start,
        "stop": stop,
        "moments": merge_moments(parts),
    }
    integrity.write_json(done, record)
    return record


def encode_dataset(
    codec: Codec,
    data: Mapping[str, Any],
    out: str,
    *,
    splits: Sequence[str] | None = None,
    batch: int = 64,
    shard_size: int = 1024,
    process_index: int | None = None,
    process_count: int | None = None,
    max_shards: int | None = None,
    command: str | None = None,
    barrier: Callable[[str], None] | None = None,
) -> EncodeResult:
    """Encodes the dataset's splits into a latent dataset in `out` (see the module docstring).

    Args:
      codec: the autoencoder (`Codec.from_workdir`).
      data: the image dataset (`make_plan`); `random_flip` stores the train split's flips.
      out: the latent dataset's directory (new, empty, or an earlier encode with the same
        settings, which is resumed).
      splits: the splits to encode; None for all of the dataset's (must include 'train').
      batch: images per encoder call (with flips, the call holds 2 x batch).
      shard_size: images per shard.
      process_index, process_count: this process writes shards process_index::process_count of
        every split; default the JAX process's.
      max_shards: write at most this many shards in this call (the rest in a later call).
      command: the command line, recorded in plan.json.
      barrier: for processes running at the same time, a function every process calls with
        the same name (e.g. `multihost_utils.sync_global_devices`): after process 0 has written
        plan.json, and after every process has written its shards; process 0 then writes
        latents.json. None: calls run one after another (one process, or the processes of a
        test), and each writes latents.json when it finds every shard done.
    Returns:
      An `EncodeResult`; its manifest is set (on the process that wrote it) once every shard
      is done.
    """
    batch = _positive_int("batch", batch)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not (
        isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count
    ):
        raise ValueError(
            f"process_index={index!r}, process_count={count!r}: expected 0 <= process_index < "
            "process_count."
        )
    if max_shards is not None:
        max_shards = _positive_int("max_shards", max_shards)
    out = os.path.abspath(out)
    plan, sources = make_plan(codec, data, splits, shard_size, command)
    if index == 0 or barrier is None:
        write_plan(out, plan)
    if barrier is not None:
        barrier("apd_encode_plan_written")
        if index != 0:
            write_plan(out, plan, write=False)
    pending, kept = [], 0
    for split, entry in plan["splits"].items():
        for i, shard in enumerate(entry["shards"]):
            start = i * plan["shard_size"]
            stop = min(start + plan["shard_size"], entry["records"])
            if i % count != index:
                continue
            if shard_done(out, shard, stop - start, entry["record_bytes"]) is not None:
                kept += 1
            else:
                pending.append((split, shard, start, stop, entry["flips"]))
    pending = pending[:max_shards]
    # Compiled before the clock starts: the throughput is the encoder's, not XLA's.
    image_shape = tuple(plan["dataset"]["image_shape"])
    for rows in sorted({2 * batch if flipped else batch for *_, flipped in pending}):
        codec.encode_raw(np.zeros((rows, *image_shape), np.float32)).block_until_ready()
    images = flips = 0
    began = time.perf_counter()
    for split, shard, start, stop, flipped in pending:
        write_shard(
            codec,
            sources[split],
            out,
            shard,
            start,
            stop,
            flips=flipped,
            batch=batch,
            image_size=plan["dataset"]["image_size"],
        )
        images += stop - start
        flips += (stop - start) if flipped else 0
        logging.info("Wrote %s (%d images) to %s", shard, stop - start, out)
    seconds = time.perf_counter() - began
    if barrier is not None:
        barrier("apd_encode_shards_written")
    manifest = finalize(out) if index == 0 or barrier is None else None
    return EncodeResult(images, flips, len(pending), kept, seconds, manifest)


def finalize(out: str) -> dict | None:
    """Writes DIR/latents.json once every shard of the plan is done; returns it, or None while
    some shard (of any process) is not done. The normalisation statistics are merged from the
    train split's done-files."""
    out = os.path.abspath(out)
    plan = integrity.read_json(os.path.join(out, latents_data.PLAN))
    train_moments = []
    for split, entry in plan["splits"].items():
        size = plan["shard_size"]
        for i, shard in enumerate(entry["shards"]):
            records = min((i + 1) * size, entry["records"]) - i * size
            done = shard_done(out, shard, records, entry["record_bytes"])
            if done is None:
                return None
            if split == STATS_SPLIT:
                train_moments.append(done["moments"])
    stats = merge_moments(train_moments)
    h, w, _ = plan["latent_shape"]
    measured = (
        f"per-channel mean (shift) and standard deviation (scale) of the pre-quantisation "
        f"latents of all {plan['splits'][STATS_SPLIT]['records']} images of split "
        f"{STATS_SPLIT!r}, unflipped ({stats['count']} tokens of {h} x {w} per image), from the "
        "encoder's float32 output"
    )
    normalization = normalization_from_moments(stats, measured)
    manifest = {**plan, "normalization": normalization.to_json()}
    integrity.write_json(os.path.join(out, latents_data.MANIFEST), manifest)
    return manifest
