"""A trained run, loaded for sampling and evaluation: config, model, parameters, uncertainty head.

    run = apd.runs.load(workdir="runs/fmnist")            # latest checkpoint, EMA parameters
    run = apd.runs.load(export_dir="exports/fmnist")      # an `apd.export` directory
    x = run.model.apply({"params": run.params}, z, levels, labels)

A run is read from a training workdir (`checkpoints/` and the `config.json` the training binary
writes) or from an export directory (`params/`, `model.json`, `config.json`). The model is
rebuilt from the checkpoint's own model description, and its parameter shapes are checked
against it, so a checkpoint and the code that reads it cannot silently disagree.

The uncertainty head of a run (`python -m apd.train_uncertainty`) lives in `DIR/uncertainty/`:
`params/` (an Orbax standard checkpoint of the head's parameters), `opt_state/` (for resuming)
and `head.json` (the head's attributes, the backbone step and parameter hash it was trained
against, its losses). `load_uncertainty(run)` reads it back.
"""

import dataclasses
import json
import logging as pylogging
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections as mc
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging

from apd import data as data_lib
from apd import export, models, schedules
from apd.training import builder
from apd.training import checkpoint as checkpoint_lib

Array = jax.Array

UNCERTAINTY_DIR = "uncertainty"
UNCERTAINTY_JSON = "head.json"


class MissingUncertaintyHeadError(FileNotFoundError):
    """The run has no trained uncertainty head; the message says how to train one."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained backbone and what is needed to sample from it."""

    config: mc.ConfigDict  # the run's final training config (its config.json)
    model: nn.Module  # the backbone, rebuilt from the checkpoint's model description
    params: Any  # the loaded parameter tree (EMA by default), on the first local device
    schedule: schedules.Schedule
    prediction: str  # 'x', 'eps' or 'v'
    num_classes: int  # 0 for an unconditional model; else label num_classes is the null label
    step: int  # the training step of the checkpoint
    image_shape: tuple[int, int, int]  # (H, W, C) of the images (decoded, for a latent run)
    description: dict  # the checkpoint's model description (name, options, shape hash)
    directory: str  # the workdir or export directory it came from
    # A latent run's autoencoder (`apd.latents.Codec`, with its dataset's normalisation); None
    # for a pixel run.
    codec: Any = None
    # (h, w, D) of what the model reads: the latent shape of a latent run, else image_shape.
    token_shape: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.token_shape is None:
            object.__setattr__(self, "token_shape", tuple(self.image_shape))

    @property
    def latent(self) -> bool:
        """Whether the model runs on an autoencoder's latents (`config.data.name == 'latents'`)."""
        return self.codec is not None


def load(
    workdir: str | None = None,
    *,
    export_dir: str | None = None,
    step: int | None = None,
    which: str = "ema_params",
) -> Run:
    """Loads a run from a training workdir or an export directory (exactly one of them).

    Args:
      workdir: a training workdir (holding `checkpoints/` and `config.json`).
      export_dir: an `apd.export` directory.
      step: the checkpoint step (workdir only); None for the latest.
      which: 'ema_params' or 'params' (workdir only; an export holds one tree).
    Raises:
      FileNotFoundError: no such directory, no checkpoint, or no config.json.
      ValueError: both or neither of workdir/export_dir, an unknown step, or parameters that do
        not fit the model the description names.
    """
    if (workdir is None) == (export_dir is None):
        raise ValueError(
            f"load takes exactly one of workdir (a training workdir) or export_dir (an apd.export "
            f"directory); got workdir={workdir!r}, export_dir={export_dir!r}."
        )
    directory = os.path.abspath(workdir if workdir is not None else export_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no such directory: {directory}.")
    if workdir is not None:
        step, params, description = checkpoint_lib.restore_params(directory, step, which)
    else:
        if step is not None:
            raise ValueError(
                f"an export directory holds one step; got step={step!r} with export_dir."
            )
        params, description = export.load(directory)
        step = int(description["step"])
    config = read_config(directory)
    model_cfg = description["model"]
    num_classes = int(model_cfg.get("num_classes", 0))
    model = models.build(
        model_cfg["name"], num_classes=num_classes, **_tuples(model_cfg["options"])
    )
    codec = load_codec(config, directory)
    if codec is None:
        token_shape, _ = data_lib.dataset_info(
            config.data.name, config.data.image_size, path=config.data.path
        )
        image_shape = token_shape
    else:
        image_shape = tuple(image_data(config, directory).image_shape)
        token_shape = codec.latent_shape(image_shape)
    _check_model(model, token_shape, description)
    return Run(
        config=config,
        model=model,
        params=params,
        schedule=schedules.get(config.diffusion.schedule, config.diffusion.shift),
        prediction=config.diffusion.prediction,
        num_classes=num_classes,
        step=int(step),
        image_shape=tuple(image_shape),
        description=description,
        directory=directory,
        codec=codec,
        token_shape=tuple(token_shape),
    )


LATENT_DATA = "latents"
"""`config.data.name` of a latent diffusion run (`apd.data.latents`)."""


def _exported_codec(directory: str | None) -> str | None:
    """The codec directory of an export (`apd.latents.EXPORT_DIR`), or None."""
    from apd import latents  # apd.latents reads run configs with this module

    if directory is None:
        return None
    path = os.path.join(directory, latents.EXPORT_DIR)
    return path if os.path.isdir(path) else None


def load_codec(config: mc.ConfigDict, directory: str | None = None):
    """A latent run's codec: the one its export directory holds (`directory`, written by
    apd.export), else `apd.latents.Codec.from_latents`: the autoencoder its latent dataset
    names, or the one in `config.autoencoder.workdir` when the config names one (checked to be
    the same autoencoder), with the dataset's normalisation. None for a pixel run."""
    if config.data.name != LATENT_DATA:
        return None
    from apd import latents

    exported = _exported_codec(directory)
    if exported is not None:
        return latents.Codec.from_export(exported)

    workdir = config.get("autoencoder", {}).get("workdir") if config.get("autoencoder") else None
    return latents.Codec.from_latents(config.data.path, ae_workdir=workdir)


def image_data(config: mc.ConfigDict, directory: str | None = None) -> mc.ConfigDict:
    """The images a run generates: `name`, `path`, `data_dir`, `image_size` and `image_shape`
    of its dataset, for a latent run the dataset its latents were encoded from (the latent
    dataset's manifest, or the codec record of an export `directory`). Evaluation reads its real
    images and reference statistics from here."""
    data = config.data
    if data.name != LATENT_DATA:
        shape, _ = data_lib.dataset_info(data.name, data.image_size, path=data.path)
        return mc.ConfigDict(
            {
                "name": data.name,
                "path": data.get("path"),
                "data_dir": data.get("data_dir"),
                "image_size": data.image_size,
                "image_shape": tuple(shape),
            }
        )
    from apd import latents
    from apd.data import latents as latents_data

    exported = _exported_codec(directory)
    if exported is not None:
        with open(os.path.join(exported, latents.CODEC_JSON), encoding="utf-8") as f:
            dataset = json.load(f)["dataset"]
    else:
        dataset = latents_data.read_manifest(data.path)["dataset"]
    return mc.ConfigDict(
        {
            "name": dataset["name"],
            "path": dataset.get("path"),
            "data_dir": dataset.get("data_dir", data.get("data_dir")),
            "image_size": dataset.get("image_size"),
            "image_shape": tuple(dataset["image_shape"]),
        }
    )


_HARMLESS_ORBAX_WARNINGS = (
    # Reading one tree of a checkpoint (restore_params) leaves its other items unread on purpose.
    "was found in the checkpoint, but could not be restored",
    # Evaluation opens the training's checkpoints read-only on purpose.
    "Given directory is read only",
)


def quiet_orbax(record) -> bool:
    """An absl log filter for the binaries: drops Orbax's INFO chatter and the two warnings
    that read-only partial restores always raise; other warnings still show."""
    if "/orbax/" not in record.pathname:
        return True
    if record.levelno < pylogging.WARNING:
        return False
    message = record.getMessage()
    return not any(text in message for text in _HARMLESS_ORBAX_WARNINGS)


def read_config(directory: str) -> mc.ConfigDict:
    """The config.json of a training workdir or an export directory."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the run's config (schedule, prediction type, dataset) is needed. "
            "The training binary writes it to its workdir; apd.export copies it."
        )
    with open(path, encoding="utf-8") as f:
        return mc.ConfigDict(json.load(f))


def first_images(run: Run, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` images of the run's dataset split: (float32 [num, H, W, C] in [-1, 1],
    labels int32 [num]), as the evaluation pipeline reads them (a latent run's: the images
    its latents were encoded from, `image_data`)."""
    return data_lib.read_images(image_data(run.config, run.directory), split, num)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples model attributes are declared with."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _check_model(model: nn.Module, image_shape: tuple[int, ...], description: dict) -> None:
    """The rebuilt model must have the parameter shapes the checkpoint was written with."""
    abstract = models.abstract_params(model, tuple(image_shape))
    digest = builder.model_description({}, abstract)["param_shapes_sha256"]
    if digest != description.get("param_shapes_sha256"):
        raise ValueError(
            f"the model {description['model']} built by this code has other parameter shapes "
            f"(hash {digest}) than the checkpoint (hash {description.get('param_shapes_sha256')}): "
            "the checkpoint was written by another version of apd.models."
        )


# ---------------------------------------------------------------------------------------------
# The uncertainty head
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UncertaintyHead:
    """A trained uncertainty head of a run."""

    head: models.UncertaintyHead
    params: Any
    info: dict  # the contents of head.json


def uncertainty_dir(run: Run) -> str:
    """Where the run's uncertainty head lives: DIR/uncertainty."""
    return os.path.join(run.directory, UNCERTAINTY_DIR)


def _train_command(run: Run) -> str:
    flag = "--export" if os.path.isdir(os.path.join(run.directory, "params")) else "--workdir"
    return f"python -m apd.train_uncertainty {flag}={run.directory}"


def read_uncertainty_info(directory: str) -> dict | None:
    """head.json of an uncertainty directory, or None if there is none."""
    path = os.path.join(directory, UNCERTAINTY_JSON)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def restore_tree(path: str, target: Any = None) -> Any:
    """An Orbax standard checkpoint onto the first local device (`target` gives the structure;
    default the stored one)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            target = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), target
        )
        return checkpointer.restore(path, target)


def load_uncertainty(run: Run) -> UncertaintyHead:
    """The run's trained uncertainty head.

    Raises:
      MissingUncertaintyHeadError: none trained yet (the message gives the command to train one).
      ValueError: the head was trained against a backbone with other parameter shapes.
    """
    directory = uncertainty_dir(run)
    info = read_uncertainty_info(directory)
    if info is None or not os.path.isdir(os.path.join(directory, "params")):
        raise MissingUncertaintyHeadError(
            f"no uncertainty head in {directory}: the adaptive plan needs one. Train it on the "
            f"frozen model first: {_train_command(run)}"
        )
    backbone = info["backbone"]
    if backbone["param_shapes_sha256"] != run.description["param_shapes_sha256"]:
        raise ValueError(
            f"the uncertainty head in {directory} was trained against another model "
            f"({backbone['model']}); retrain it: {_train_command(run)} --restart"
        )
    if backbone["step"] != run.step:
        logging.warning(
            "The uncertainty head in %s was trained against step %d; the backbone is at step %d. "
            "Retrain it for calibrated predictions: %s",
            directory,
            backbone["step"],
            run.step,
            _train_command(run),
        )
    head = models.UncertaintyHead(**info["head"])
    return UncertaintyHead(head, restore_tree(os.path.join(directory, "params")), info)


def parse_binary_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], program: str, doc: str
) -> list[str]:
    """Parses a binary's own flags (then absl's, e.g. --v); returns the leftover arguments.

    Each binary keeps its flags in its own `FlagValues`, so several apd binaries can be imported
    into one process (tests, notebooks); each call starts from the defaults.
    """
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        print(doc)
        print(flag_values.get_help())
        sys.exit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values(list(argv), known_only=True)
        return flags.FLAGS(rest)
    except flags.Error as err:
        sys.exit(f"{program}: error: {err} (see --help)")


def options_from_flags(flag_values: flags.FlagValues, options_type: type):
    """An instance of the dataclass `options_type` from the flags of the same names."""
    return options_type(
        **{f.name: flag_values[f.name].value for f in dataclasses.fields(options_type)}
    )
