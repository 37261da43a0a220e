"""`train_and_evaluate(config, workdir)`: the whole training run, resumable from its workdir.

The one training loop of apd: every trained model (diffusion backbones, autoencoders) runs
through it; what differs between them is a task (`apd.training.tasks`, chosen by `config.task`).
"""

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections as mc
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from apd import cli
from apd import data as data_lib
from apd.evaluation import integrity
from apd.training import builder, optim, tasks
from apd.training import checkpoint as checkpoint_lib
from apd.training import mesh as mesh_lib
from apd.training import metrics as metrics_lib

FINITE_METRICS = ("loss", "grad_norm", "param_norm", "ema_norm")
"""Checked on every step before its state can be saved: loss and gradient norm of the step, and
the norms of the new parameters and EMA (a norm that overflows float32 counts as non-finite)."""


class _Interruption:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag; the loop saves the current step and
    returns (`stopped_by` in its result). A second Ctrl-C aborts at once, without saving.

    With several processes, jax.distributed's preemption notifier owns SIGTERM and Orbax's
    `reached_preemption` agrees on a common step across processes; Ctrl-C is passed to it as a
    SIGTERM of this process.
    """

    def __init__(self):
        self.reason: str | None = None
        self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._interrupt)}
        if jax.process_count() == 1:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.reason = self.reason or "preemption"

    def _interrupt(self, signum, frame):
        del signum, frame
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "Ctrl-C"
        logging.warning(
            "Ctrl-C received: saving a checkpoint and stopping (Ctrl-C again aborts unsaved)."
        )
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, checkpointer: checkpoint_lib.Checkpointer, step: int) -> bool:
        if jax.process_count() > 1:
            return checkpointer.manager.reached_preemption(step)
        return self.reason is not None

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def write_config(config: mc.ConfigDict, workdir: str) -> None:
    """Writes WORKDIR/config.json (process 0) atomically: a temporary file renamed into place."""
    if jax.process_index() == 0:
        integrity.write_json(
            os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort())
        )


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` checked and built; nothing written, restored or compiled yet."""

    mesh: jax.sharding.Mesh
    image_shape: tuple[int, int, int]
    num_classes: int
    train_iter: Any  # the grain iterator of this process's blocks of each global batch
    run: builder.Run  # model, sharded state layout, jitted (not yet compiled) step
    task: tasks.Task  # what the config's task adds to the loop


def prepare(config: mc.ConfigDict, workdir: str) -> Prepared:
    """Checks the whole config against the devices, the data and the workdir.

    In order: the workdir (a directory, or a path where one can be created); the task; the step
    counts; the mesh and the global batch split over it; the dataset, its files and the input
    stream; the optimizer; the task's own values (`Task.check`: for diffusion the level
    sampler's parameters on the dataset's token grid, the schedule, prediction type, loss
    weighting and the sample grids' plan); the model (built and traced abstractly, nothing
    allocated); an existing checkpoint's model against it. Nothing is
    written, restored or compiled, so a rejected launch leaves the workdir (its config.json
    included) exactly as it was.

    Raises:
      ValueError (IncompatibleCheckpointError for another model's checkpoint) or
      FileNotFoundError (DatasetNotFoundError), naming the bad value and the expected form.
    """
    cli.check_writable_dir(workdir, "workdir")
    task = tasks.get(config)
    for name, value, low in (
        ("total_steps", config.total_steps, 1),
        ("log_every_steps", config.log_every_steps, 1),
        ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
        ("checkpoint.keep_last", config.checkpoint.keep_last, 1),
        ("checkpoint.keep_every", config.checkpoint.keep_every or 0, 0),
        ("sample_every_steps", config.get("sample_every_steps", 0) or 0, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"config.{name} must be an integer >= {low}; got {value!r}.")
    mesh = mesh_lib.make(config.mesh.data, config.mesh.fsdp)
    mesh_lib.check_batch_size(config.data.global_batch_size, mesh, jax.process_count())
    image_shape, num_classes = data_lib.dataset_info(
        config.data.name, config.data.image_size, path=config.data.path
    )
    if not config.model.class_conditional:
        num_classes = 0
    source = data_lib.get_source(
        config.data.name, "train", data_dir=config.data.data_dir, path=config.data.path
    )
    train_iter = data_lib.make_dataset(
        source,
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        image_size=config.data.image_size,
        random_flip=config.data.random_flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    optim.learning_rate(config.optimizer, config.total_steps)
    task.check(config, image_shape, num_classes)
    run = task.build(config, mesh, image_shape, num_classes)
    checkpoint_lib.check_compatible(workdir, run.description)
    return Prepared(mesh, tuple(image_shape), num_classes, train_iter, run, task)


def _non_finite_message(step: int, values: dict[str, float], checkpointer) -> str:
    """The error of a step whose loss, gradient or new parameters are not finite."""
    checkpointer.wait()
    latest = checkpointer.latest_step()
    found = ", ".join(f"{name}={value:.6g}" for name, value in values.items())
    fix = "lower --config.optimizer.lr (or raise --config.optimizer.warmup_steps) first"
    if latest is None:
        where = f"No checkpoint was written: a relaunch starts afresh; {fix}."
    else:
        where = (
            f"The last checkpoint, step {latest} in {checkpointer.directory}, holds finite "
            f"parameters and EMA; the run is deterministic, so a relaunch resumes from it and "
            f"meets step {step} again unless you {fix}."
        )
    return f"non-finite training state at step {step} ({found}); it was not saved. {where}"


def train_and_evaluate(config: mc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint.

    Every check that can reject the launch (`prepare`) runs before anything is written,
    restored or compiled; config.json is written (atomically) once the state is restored or
    initialised.

    Returns:
      The last logged metrics, with `step` (the last step trained) and `stopped_by`: None, or
      'preemption' (SIGTERM) or 'Ctrl-C' when a signal stopped the run after saving that step.
    """
    prepared = prepare(config, workdir)
    run, train_iter = prepared.run, prepared.train_iter
    os.makedirs(workdir, exist_ok=True)
    sample_every = config.get("sample_every_steps", 0)
    visualise = prepared.task.visualiser(config, prepared)

    checkpointer = checkpoint_lib.Checkpointer(
        workdir,
        every_steps=config.checkpoint.every_steps,
        keep_last=config.checkpoint.keep_last,
        keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save,
    )
    writer = None
    interruption = None
    step = 0
    last: dict[str, Any] = {}
    try:
        restored = checkpointer.restore_latest(run.abstract_state, train_iter, run.description)
        if restored is None:
            state, start = run.init(), 0
        else:
            start, state = restored
        write_config(config, workdir)
        writer = metrics_lib.create_writer(workdir)
        if start == 0:
            parameter_overview.log_parameter_overview(state.params)
            writer.write_hparams(
                {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
            )

        # ------------------------------------------------------------------------------------
        # The loop. Metrics are read one step late so the host never waits on the device;
        # every step's metrics are checked before its state can be saved.
        # ------------------------------------------------------------------------------------
        total = config.total_steps
        progress = periodic_actions.ReportProgress(
            num_train_steps=total, writer=writer, every_secs=config.get("progress_every_secs", 30.0)
        )
        interruption = _Interruption()
        history: list[dict[str, np.ndarray]] = []
        pending = None  # (step, device metrics) of the last dispatched step
        input_wait = 0.0
        t_log = time.perf_counter()

        def drain(pending):
            step_done, device_metrics = pending
            host = jax.device_get(device_metrics)
            values = {name: float(host[name]) for name in FINITE_METRICS}
            if not all(np.isfinite(v) for v in values.values()):
                raise FloatingPointError(_non_finite_message(step_done, values, checkpointer))
            history.append(host)

        step = start
        first = None
        if jax.process_count() > 1 and step < total:
            # CPU collectives (gloo) give the processes a fixed 30 s to meet at their first
            # collective, and a process that compiles its step more slowly (a loaded host)
            # misses it. Compile the step first, then meet at a barrier: the first step then
            # starts together. The jitted step reuses this compilation.
            first = builder.global_batch(next(train_iter), run.batch_sharding)
            run.train_step.lower(state, first).compile()
            multihost_utils.sync_global_devices("apd_train_step_compiled")
        while step < total:
            t0 = time.perf_counter()
            if first is None:
                batch = builder.global_batch(next(train_iter), run.batch_sharding)
            else:
                batch, first = first, None
            input_wait += time.perf_counter() - t0
            state, device_metrics = run.train_step(state, batch)
            if pending is not None:
                drain(pending)
            pending = (step + 1, device_metrics)
            step += 1
            progress(step)

            if step % config.log_every_steps == 0 or step == total:
                drain(pending)
                pending = None
                elapsed = time.perf_counter() - t_log
                last = summarise(history, elapsed, input_wait, config.data.global_batch_size)
                writer.write_scalars(step, last)
                history, input_wait, t_log = [], 0.0, time.perf_counter()

            stop = interruption.reached(checkpointer, step)
            if stop or step == total or checkpointer.manager.should_save(step):
                if pending is not None:
                    drain(pending)
                    pending = None
                checkpointer.save(
                    step, state, train_iter, run.description, force=stop or step == total
                )
            if (
                visualise is not None
                and sample_every
                and (step % sample_every == 0 or step == total)
            ):
                visualise(state, step, workdir)
            if stop:
                logging.warning(
                    "Stopped by %s at step %d; relaunch to resume.",
                    interruption.reason or "preemption",
                    step,
                )
                break
    finally:
        if interruption is not None:
            interruption.restore()
        try:
            checkpointer.close()
        finally:
            if writer is not None:
                writer.flush()
    return last | {"step": step, "stopped_by": interruption.reason if interruption else None}


def summarise(history, elapsed, input_wait, global_batch_size) -> dict[str, float]:
    """Means of the logged interval's scalar metrics (every task's), loss per level bucket when
    the step reports `loss_per_level` / `tokens_per_level` sums (diffusion), throughput."""
    out: dict[str, float] = {}
    if not history:
        return out
    for name, value in history[0].items():
        if np.ndim(value) == 0:
            out[name] = float(np.mean([h[name] for h in history]))
    if "loss_per_level" in history[0]:
        sums = np.sum([h["loss_per_level"] for h in history], axis=0)
        counts = np.sum([h["tokens_per_level"] for h in history], axis=0)
        n = len(sums)
        for i in range(n):
            if counts[i] > 0:
                out[f"loss_level/{i / n:.1f}-{(i + 1) / n:.1f}"] = float(sums[i] / counts[i])
    out["steps_per_sec"] = len(history) / max(elapsed, 1e-9)
    out["images_per_sec"] = out["steps_per_sec"] * global_batch_size
    out["input_wait_fraction"] = input_wait / max(elapsed, 1e-9)
    return out
