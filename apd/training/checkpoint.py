"""Checkpoints under WORKDIR/checkpoints: one Orbax CheckpointManager for the whole run.

Each step directory holds three items, committed together and atomically (Orbax writes to a
temporary directory and renames it when complete, so a kill mid-save leaves the previous
checkpoint as the latest):
  state  the TrainState (params, EMA, optimizer state, step, base RNG), sharded arrays;
  data   the grain iterator's state, so a resumed run sees the identical data stream;
  model  a JSON description of the model (name, options, parameter shapes), checked on restore so
         a checkpoint from a different model is refused with a clear message.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a different model."""


class Checkpointer:
    """Saves and restores (state, data iterator, model description) by step."""

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        keep_last: int,
        keep_every: int | None,
        async_save: bool = True,
    ):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep_last,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "model"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "model": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iter: Any, description: dict, *, force: bool = False
    ) -> bool:
        """Saves if the step is due (every_steps) or `force`; returns whether a save started."""
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                model=ocp.args.JsonSave(description),
            ),
            force=force,
        )
        if saved:
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def check_model(self, step: int, description: dict) -> None:
        """Raises IncompatibleCheckpointError if the stored model differs from `description`."""
        stored = self.manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.JsonRestore())
        ).model
        if stored.get("param_shapes_sha256") != description["param_shapes_sha256"]:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} was written by a different "
                f"model: stored {stored.get('model')} with {stored.get('num_params')} parameters, "
                f"but the config builds {description['model']} with {description['num_params']} "
                "parameters. Use a new --workdir, or the config that wrote this one "
                "(its config.json)."
            )

    def restore(self, step: int, abstract_state: Any, data_iter: Any, description: dict) -> Any:
        """Restores the state onto `abstract_state`'s shardings and the iterator in place."""
        self.check_model(step, description)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        logging.info("Restored checkpoint at step %d from %s", step, self.directory)
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(
    workdir: str, step: int | None = None, which: str = "ema_params"
) -> tuple[int, Any, dict]:
    """Restores one parameter tree of a training checkpoint onto this host, whatever mesh wrote it.

    Only the requested tree is read (partial restore), onto the first local device.

    Args:
      workdir: the training workdir (holding `checkpoints/`).
      step: the checkpoint step; None for the latest.
      which: 'ema_params' (for evaluation) or 'params'.
    Returns:
      (step, params, model description).
    """
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {directory}: train first (python -m apd.train)."
        )
    manager = ocp.CheckpointManager(
        directory,
        item_names=("state", "model"),
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "model": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {directory}.")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; available: {steps}.")
        metadata = manager.item_metadata(step).state
        if which not in metadata:
            raise ValueError(
                f"unknown parameter tree {which!r}; expected one of {sorted(metadata)}."
            )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[which]
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={which: target},
                    restore_args=jax.tree.map(
                        lambda _: ocp.ArrayRestoreArgs(sharding=device), {which: target}
                    ),
                    partial_restore=True,
                ),
                model=ocp.args.JsonRestore(),
            ),
        )
    finally:
        manager.close()
    return step, restored.state[which], restored.model
