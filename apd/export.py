"""Exports a training checkpoint's EMA parameters for evaluation and sampling elsewhere.

    python -m apd.export --workdir=DIR [--step=N] [--which=ema_params] --out=EXPORT_DIR [--verbose]

Without --step, the newest checkpoint whose parameters can be read is exported. EXPORT_DIR then
holds `params/` (an Orbax standard checkpoint of the parameter tree, restorable on any device
layout), `model.json` (model name, options, parameter count and shape hash, step) and
`config.json` (the training config); a latent run's export adds `autoencoder/` (its codec:
`apd.latents.export_codec`), so it samples without the autoencoder's workdir or the latent
dataset. `load(EXPORT_DIR)` reads it back. A user error (a non-empty
or unwritable --out, no readable checkpoint) ends with one line `apd.export: error: ...` and exit
code 1.
"""

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import app, flags, logging

from apd import cli
from apd.training import checkpoint as checkpoint_lib


def export(workdir: str, out: str, step: int | None = None, which: str = "ema_params") -> int:
    """Writes the export directory; returns the exported step.

    Raises:
      FileExistsError: `out` is a non-empty directory.
      ValueError: `out` cannot be created (a file in the way, no write permission), or an
        unknown step or tree (`restore_params`), checked before anything is written.
      FileNotFoundError: the workdir holds no checkpoint.
    """
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"export directory {out} is not empty; choose a new --out.")
    cli.check_writable_dir(out, "export directory")
    step, params, description = checkpoint_lib.restore_params(workdir, step, which)
    config = os.path.join(workdir, "config.json")
    codec = data = None
    if os.path.exists(config):
        from apd import runs  # apd.runs reads exports with this module

        run_config = runs.read_config(workdir)
        # A latent run's autoencoder travels with it: sampling elsewhere needs neither the
        # autoencoder's workdir nor the latent dataset.
        codec = runs.load_codec(run_config)
        data = runs.image_data(run_config) if codec is not None else None
    os.makedirs(out, exist_ok=True)
    save_tree(os.path.join(out, "params"), params)
    with open(os.path.join(out, "model.json"), "w", encoding="utf-8") as f:
        json.dump(description | {"step": step, "which": which}, f, indent=2, sort_keys=True)
    if os.path.exists(config):
        shutil.copy(config, os.path.join(out, "config.json"))
    if codec is not None:
        from apd import latents

        latents.export_codec(codec, os.path.join(out, latents.EXPORT_DIR), data.to_dict())
    logging.info("Exported %s of step %d from %s to %s", which, step, workdir, out)
    return step


def load(export_dir: str) -> tuple[Any, dict]:
    """(params on the first local device, model description) of an export directory."""
    path = os.path.join(os.path.abspath(export_dir), "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{export_dir} is not an apd export (no params/); see apd.export.")
    with open(os.path.join(export_dir, "model.json"), encoding="utf-8") as f:
        description = json.load(f)
    return restore_tree(path), description


def save_tree(path: str, tree: Any) -> None:
    """A tree of arrays as an Orbax standard checkpoint at `path` (restorable on any layout)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)


def restore_tree(path: str) -> Any:
    """A `save_tree` checkpoint, on the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        return checkpointer.restore(path, target)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    export(f.workdir, f.out, f.step, f.which)


def define_flags() -> None:
    """The binary's flags, defined only when it runs (the module is also imported as a library)."""
    flags.DEFINE_string("workdir", None, "Training workdir.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_enum("which", "ema_params", ["ema_params", "params"], "Which parameters.")
    flags.DEFINE_string("out", None, "Export directory (must not exist or be empty).")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    define_flags()
    cli.run(main, "apd.export")
