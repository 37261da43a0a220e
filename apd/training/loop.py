"""`train_and_evaluate(config, workdir)`: the whole training run, resumable from its workdir."""

import os
import signal
import time
from typing import Any

import jax
import ml_collections as mc
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions

from apd import data as data_lib
from apd import plans
from apd.sampling import images as sample_images
from apd.training import builder
from apd.training import checkpoint as checkpoint_lib
from apd.training import mesh as mesh_lib
from apd.training import metrics as metrics_lib
from apd.training import step as step_lib


class _Preemption:
    """SIGTERM sets a flag; the loop saves the current step and exits cleanly.

    With several processes, jax.distributed's preemption notifier owns SIGTERM and Orbax's
    `reached_preemption` agrees on a common step across processes.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def reached(self, checkpointer: checkpoint_lib.Checkpointer, step: int) -> bool:
        if jax.process_count() > 1:
            return checkpointer.manager.reached_preemption(step)
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def write_config(config: mc.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def train_and_evaluate(config: mc.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns final metrics."""
    # ----------------------------------------------------------------------------------------
    # Setup: workdir, config, mesh. Every check that can fail runs before any compilation.
    # ----------------------------------------------------------------------------------------
    os.makedirs(workdir, exist_ok=True)
    write_config(config, workdir)
    mesh = mesh_lib.make(config.mesh.data, config.mesh.fsdp)
    mesh_lib.check_batch_size(config.data.global_batch_size, mesh, jax.process_count())
    image_shape, num_classes = data_lib.dataset_info(config.data.name, config.data.image_size)
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

    # ----------------------------------------------------------------------------------------
    # Model, state shardings and the jitted step.
    # ----------------------------------------------------------------------------------------
    run = builder.build(config, mesh, image_shape, num_classes)

    sample_every = config.get("sample_every_steps", 0)
    if sample_every:
        # Fixed noise and labels, so the grids are comparable across steps.
        sample_plan = plans.synchronous(config.sample.steps, config.sample.num, image_shape[:-1])
        sample_labels = (
            np.arange(config.sample.num, dtype=np.int32) % num_classes if num_classes else None
        )
        sample_fn = sample_images.make_sample_fn(
            run.model.apply,
            schedule=step_lib.schedule_from_config(config),
            prediction=config.diffusion.prediction,
            channels=image_shape[-1],
            eta=config.sample.eta,
            num_classes=num_classes,
            out_sharding=mesh_lib.replicated(mesh),
        )
        sample_key = jax.random.key(config.seed)

    checkpointer = checkpoint_lib.Checkpointer(
        workdir,
        every_steps=config.checkpoint.every_steps,
        keep_last=config.checkpoint.keep_last,
        keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save,
    )
    start = checkpointer.latest_step()
    if start is None:
        state = run.init()
        start = 0
    else:
        state = checkpointer.restore(start, run.abstract_state, train_iter, run.description)

    writer = metrics_lib.create_writer(workdir)
    if start == 0:
        parameter_overview.log_parameter_overview(state.params)
        writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})

    # ----------------------------------------------------------------------------------------
    # The loop. Metrics are read one step late so the host never waits on the device.
    # ----------------------------------------------------------------------------------------
    total = config.total_steps
    progress = periodic_actions.ReportProgress(
        num_train_steps=total, writer=writer, every_secs=config.get("progress_every_secs", 30.0)
    )
    preemption = _Preemption()
    history: list[dict[str, np.ndarray]] = []
    pending = None  # (step, device metrics) of the last dispatched step
    input_wait = 0.0
    t_log = time.perf_counter()
    last: dict[str, Any] = {}

    def drain(pending):
        step_done, device_metrics = pending
        host = jax.device_get(device_metrics)
        if not np.isfinite(host["loss"]) or not np.isfinite(host["grad_norm"]):
            raise FloatingPointError(
                f"non-finite training loss at step {step_done}: loss={host['loss']}, "
                f"grad_norm={host['grad_norm']}. The last checkpoint "
                f"(step {checkpointer.latest_step()}) is intact."
            )
        history.append(host)

    step = start
    try:
        while step < total:
            t0 = time.perf_counter()
            batch = builder.global_batch(next(train_iter), run.batch_sharding)
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

            stop = preemption.reached(checkpointer, step)
            if stop or step == total or checkpointer.manager.should_save(step):
                if pending is not None:
                    drain(pending)
                    pending = None
                checkpointer.save(
                    step, state, train_iter, run.description, force=stop or step == total
                )
            if sample_every and (step % sample_every == 0 or step == total):
                images = jax.device_get(
                    sample_fn(state.ema_params, sample_plan, sample_key, labels=sample_labels)
                )
                if jax.process_index() == 0:
                    sample_images.write_sample_grid(
                        os.path.join(workdir, "samples", f"step_{step:08d}.png"), images
                    )
            if stop:
                logging.warning("Stopped by preemption at step %d; relaunch to resume.", step)
                break
    finally:
        preemption.restore()
        checkpointer.close()
        writer.flush()
    return last | {"step": step}


def summarise(history, elapsed, input_wait, global_batch_size) -> dict[str, float]:
    """Means of the logged interval's metrics, loss per level bucket, throughput."""
    out: dict[str, float] = {}
    if not history:
        return out
    for name in ("loss", "grad_norm", "param_norm"):
        out[name] = float(np.mean([h[name] for h in history]))
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
