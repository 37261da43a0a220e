"""Checkpoints under WORKDIR/checkpoints: one Orbax CheckpointManager for the whole run.

Each step directory holds three items, committed together and atomically (Orbax writes to a
temporary directory and renames it when complete, so a kill mid-save leaves the previous
checkpoint as the latest):
  state  the TrainState (params, EMA, optimizer state, step, base RNG), sharded arrays;
  data   the grain iterator's state, so a resumed run sees the identical data stream;
  model  a JSON description of the model (name, options, parameter shapes), checked on restore so
         a checkpoint from a different model is refused with a clear message.

A committed step can still be damaged afterwards (a truncated or deleted file, an emptied
directory) or, when written by an older apd, hold non-finite parameters. A resumed run restores
the newest step that restores completely with finite parameters and EMA
(`Checkpointer.restore_latest`); each newer step is logged with the reason and moved to
WORKDIR/checkpoints_unreadable/STEP, kept for inspection and out of the way of the run's next
saves. `restore_params` (sampling, evaluation, export) reads the newest step whose parameters
restore, or names the step it cannot read. A save that fails (a full disk) raises
`CheckpointSaveError` naming the step, the directory and the OS error; the previous checkpoint
stays intact.
"""

import contextlib
import gc
import logging as pylogging
import os
import re
import sys
import threading
import time
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from apd.training import state as state_lib

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
PARAM_TREES = ("ema_params", "params")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a different model."""


class UnreadableCheckpointError(ValueError):
    """No checkpoint of the workdir, or not the step asked for, can be read."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (e.g. no space left); the previous checkpoint is intact."""


def describe_error(err: BaseException) -> str:
    """One short line for an error from Orbax, TensorStore, grain or the OS: the OS error's text
    where one is named (TensorStore reports it as os_error_code), else the exception's type and
    the first line of its message (at most 200 characters)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    first = text.splitlines()[0] if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


_QUIETED: set[str] = set()  # the filters _quiet_aborted_io has installed


def _quiet_aborted_io(failed: bool = True) -> None:
    """Silences the echoes of a failed Orbax read or write; the caller reports the failure once.

    An aborted Orbax operation leaves TensorStore futures, asyncio tasks and coroutines behind:
    - their completion callbacks meet the closed event loop ("RuntimeError: Event loop is
      closed", printed as an unraisable exception, hundreds of times, by Orbax's threads before
      the failure reaches the caller): filtered from the first checkpoint I/O on;
    - asyncio logs each future or task whose exception nobody read ("... exception was never
      retrieved", each with the whole TensorStore spec) and Python warns of each coroutine never
      started: filtered from the first failure on (`failed`).
    With `failed`, the leftovers are also collected at once, while the interpreter can still run
    their clean-up; at interpreter exit each would fail with "ImportError: sys.meta_path is None".
    """
    if "unraisable" not in _QUIETED:
        _QUIETED.add("unraisable")
        previous = sys.unraisablehook

        def hook(unraisable):
            error = unraisable.exc_value
            if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
                previous(unraisable)

        sys.unraisablehook = hook
    if not failed:
        return
    if "asyncio" not in _QUIETED:
        _QUIETED.add("asyncio")
        pylogging.getLogger("asyncio").addFilter(
            lambda record: "exception was never retrieved" not in record.getMessage()
        )
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    gc.collect()


def steps_on_disk(directory: str) -> list[int]:
    """The committed steps in a checkpoint directory: its subdirectories with an integer name
    (Orbax renames a step's temporary directory to its number only once it is complete)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# What Orbax logs, as warnings, on every read-only partial restore: that the manager is read-only
# and that the items not asked for (the input pipeline's state, the other trees) were not read.
_PARTIAL_READ_ECHOES = (
    "Given directory is read only",
    "was found in the checkpoint, but could not be restored",
)


def _quiet_partial_reads() -> None:
    """Filters Orbax's warnings about what a read-only partial restore leaves unread."""
    if "partial" not in _QUIETED:
        _QUIETED.add("partial")
        pylogging.getLogger("absl").addFilter(
            lambda record: not any(e in record.getMessage() for e in _PARTIAL_READ_ECHOES)
        )


def _read_only_manager(directory: str, handlers: dict[str, Any]) -> ocp.CheckpointManager:
    _quiet_partial_reads()
    return ocp.CheckpointManager(
        directory,
        item_names=tuple(handlers),
        item_handlers=handlers,
        # Read-only options spelled out: Orbax warns about each one it has to change itself.
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    )


def _check_model(manager: ocp.CheckpointManager, step: int, description: dict) -> None:
    """Raises IncompatibleCheckpointError if the model stored at `step` differs from
    `description`; other errors (an unreadable description) pass through."""
    stored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore())).model
    if stored.get("param_shapes_sha256") != description["param_shapes_sha256"]:
        raise IncompatibleCheckpointError(
            f"the checkpoint at step {step} in {manager.directory} was written by a different "
            f"model: stored {stored.get('model')} with {stored.get('num_params')} parameters, "
            f"but the config builds {description['model']} with {description['num_params']} "
            "parameters. Use a new --workdir, or the config that wrote this one "
            "(its config.json)."
        )


def check_compatible(workdir: str, description: dict) -> None:
    """Raises IncompatibleCheckpointError if the newest readable checkpoint of `workdir` was
    written by a model other than `description`'s. Reads only the model descriptions, writes
    nothing; a workdir without checkpoints passes. A step whose description cannot be read is
    passed over here (resuming skips it and says why)."""
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not steps_on_disk(directory):
        return
    manager = _read_only_manager(directory, {"model": ocp.JsonCheckpointHandler()})
    try:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                _check_model(manager, step, description)
            except IncompatibleCheckpointError:
                raise
            except Exception:  # unreadable: Orbax, JSON and OS errors alike
                continue
            return
    finally:
        manager.close()


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
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
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
        self._in_flight: int | None = None  # step of an asynchronous save not yet complete
        self._last_saved: int | None = None  # step of the last save started
        self._failed = False  # a save failed (reported once, by CheckpointSaveError)
        _quiet_aborted_io(failed=False)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iter: Any, description: dict, *, force: bool = False
    ) -> bool:
        """Saves if the step is due (every_steps) or `force`; returns whether a save started.

        Raises:
          CheckpointSaveError: this save, or the previous asynchronous one, failed.
        """
        self.wait()
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iter),
                    model=ocp.args.JsonSave(description),
                ),
                force=force,
            )
        except Exception as err:
            raise self._save_failed(step, err) from err
        if saved:
            self._in_flight = self._last_saved = step
            logging.info("Saving checkpoint at step %d to %s", step, self.directory)
        return saved

    def wait(self) -> None:
        """Blocks until an asynchronous save is complete.

        Raises:
          CheckpointSaveError: it failed (reported once; later calls return at once).
        """
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(self._in_flight, err) from err
        self._in_flight = None

    def _save_failed(self, step: int | None, err: Exception) -> CheckpointSaveError:
        self._failed = True
        # The other threads of the aborted save (one per Orbax operation) may still be writing:
        # let them fail now, not at interpreter exit, where each would report that it cannot
        # schedule work after shutdown. Their errors are this failure's (Orbax's join re-raises).
        deadline = time.monotonic() + 60.0
        for thread in threading.enumerate():
            if (
                type(thread).__module__.startswith("orbax.")
                and thread is not threading.current_thread()
            ):
                with contextlib.suppress(Exception):
                    thread.join(max(0.0, deadline - time.monotonic()))
        _quiet_aborted_io()
        done = steps_on_disk(self.directory)
        intact = (
            f"the last complete checkpoint, step {done[-1]}, is intact"
            if done
            else "no checkpoint was completed before it"
        )
        return CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory} failed: {describe_error(err)}; {intact}."
        )

    def check_model(self, step: int, description: dict) -> None:
        """Raises IncompatibleCheckpointError if the stored model differs from `description`."""
        _check_model(self.manager, step, description)

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

    def restore_latest(
        self, abstract_state: Any, data_iter: Any, description: dict
    ) -> tuple[int, Any] | None:
        """Restores the newest step that restores completely with finite parameters and EMA.

        Each newer step (a file unreadable or missing, an empty step directory, non-finite
        parameters or EMA) is logged with the reason and moved to WORKDIR/checkpoints_unreadable/
        (kept for inspection; the run's next saves then create those steps afresh).

        Returns:
          (step, state), or None when there is no checkpoint.
        Raises:
          IncompatibleCheckpointError: a checkpoint of another model (never passed over).
          UnreadableCheckpointError: there are checkpoints, but none restores.
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state, data_iter, description)
            except IncompatibleCheckpointError:
                raise
            except Exception as err:  # Orbax, TensorStore, grain, JSON, OS errors
                reason = describe_error(err)
                _quiet_aborted_io()
            else:
                if state_lib.is_finite(state.params) and state_lib.is_finite(state.ema_params):
                    self._set_aside(failed)
                    return step, state
                reason = "its parameters or EMA are not finite"
            logging.warning(
                "Cannot resume from the checkpoint at step %d in %s (%s); trying the one before.",
                step,
                self.directory,
                reason,
            )
            failed.append((step, reason))
        if not failed:
            return None
        raise UnreadableCheckpointError(
            f"no checkpoint in {self.directory} can be resumed from ("
            + "; ".join(f"step {step}: {reason}" for step, reason in failed)
            + f"). Move {self.directory} away to start the run afresh."
        )

    def _set_aside(self, failed: list[tuple[int, str]]) -> None:
        """Moves the step directories that failed to restore to WORKDIR/checkpoints_unreadable."""
        if not failed:
            return
        aside = os.path.join(self.workdir, UNREADABLE_DIR)
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step, reason in failed:
                target = os.path.join(aside, str(step))
                copy = 1
                while os.path.exists(target):
                    copy += 1
                    target = os.path.join(aside, f"{step}.{copy}")
                os.rename(os.path.join(self.directory, str(step)), target)
                logging.warning(
                    "Moved the checkpoint of step %d (%s) to %s for inspection.",
                    step,
                    reason,
                    target,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("apd_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for an asynchronous save and releases the manager.

        Raises:
          CheckpointSaveError: the save failed (unless already reported).
        """
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as err:
                # Orbax may report a failed write only here, after wait_until_finished returned.
                if not self._failed:
                    raise self._save_failed(self._last_saved, err) from err


def restore_params(
    workdir: str, step: int | None = None, which: str = "ema_params"
) -> tuple[int, Any, dict]:
    """Restores one parameter tree of a training checkpoint onto this host, whatever mesh wrote it.

    Only the requested tree is read (partial restore), onto the first local device. Without a
    step, the newest step whose tree restores with finite values is read (each newer one is
    logged with the reason).

    Args:
      workdir: the training workdir (holding `checkpoints/`).
      step: the checkpoint step; None for the newest readable one.
      which: 'ema_params' (for evaluation) or 'params'.
    Returns:
      (step, params, model description).
    Raises:
      FileNotFoundError: no checkpoints.
      ValueError: an unknown step or tree.
      UnreadableCheckpointError: the step asked for, or every step, cannot be read (one line
        naming each step and why).
    """
    if which not in PARAM_TREES:
        raise ValueError(f"unknown parameter tree {which!r}; expected one of {list(PARAM_TREES)}.")
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {directory}: train first (python -m apd.train)."
        )
    manager = _read_only_manager(
        directory,
        {"state": ocp.PyTreeCheckpointHandler(), "model": ocp.JsonCheckpointHandler()},
    )
    _quiet_aborted_io(failed=False)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {directory}.")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {directory}; available: {steps}.")
        failed: list[tuple[int, str]] = []
        for candidate in sorted(steps, reverse=True) if step is None else [step]:
            try:
                params, description = _restore_tree(manager, candidate, which)
            except Exception as err:  # Orbax, TensorStore, JSON, OS errors
                reason = describe_error(err)
                _quiet_aborted_io()
            else:
                if state_lib.is_finite(params):
                    return candidate, params, description
                reason = f"its {which} are not finite"
            logging.warning(
                "Cannot read %s of the checkpoint at step %d in %s (%s).",
                which,
                candidate,
                directory,
                reason,
            )
            failed.append((candidate, reason))
    finally:
        manager.close()
    if step is not None:
        raise UnreadableCheckpointError(
            f"the checkpoint at step {step} in {directory} cannot be read ({failed[0][1]}); "
            f"choose another of the steps {steps}, or none for the newest readable one."
        )
    raise UnreadableCheckpointError(
        f"no checkpoint in {directory} can be read ("
        + "; ".join(f"step {s}: {reason}" for s, reason in failed)
        + ")."
    )


def _restore_tree(manager: ocp.CheckpointManager, step: int, which: str) -> tuple[Any, dict]:
    """(tree `which` of the state at `step` on the first local device, model description)."""
    metadata = manager.item_metadata(step).state
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
    return restored.state[which], restored.model
