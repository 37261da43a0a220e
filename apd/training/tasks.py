"""What each kind of trained model brings to the one training loop (`apd.training.loop`).

The loop owns everything that does not depend on the model: the mesh, the input pipeline, the
checkpoints (exact resume, preemption saves, no non-finite state saved), the metrics, progress and
ETA. A task owns the rest:

  check(config, image_shape, num_classes)       its config values, before anything is built
                                                (ValueError naming the bad value);
  build(config, mesh, image_shape, num_classes)  the `builder.Run`: model, sharded state layout,
                                                jitted step (`builder.assemble` does the shared
                                                part);
  visualiser(config, prepared)                  None, or `visualise(state, step, workdir)`, which
                                                the loop calls every `config.sample_every_steps`
                                                and at the last step (sample grids,
                                                reconstructions).

The step of every task returns at least the metrics in `loop.FINITE_METRICS` (loss, grad_norm,
param_norm, ema_norm), which the loop checks before it can save a step's state.

`config.task` names the task (default 'diffusion'); `register` adds one.
"""

import os
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections as mc
import numpy as np

from apd import checks, corruption, levels, losses, plans, runs
from apd.sampling import images as sample_images
from apd.training import autoencoder_task, builder
from apd.training import mesh as mesh_lib
from apd.training import step as step_lib

Visualise = Callable[[Any, int, str], None]


class Task(Protocol):
    def check(
        self, config: mc.ConfigDict, image_shape: tuple[int, ...], num_classes: int
    ) -> None: ...

    def build(
        self, config: mc.ConfigDict, mesh, image_shape: tuple[int, ...], num_classes: int
    ) -> builder.Run: ...

    def visualiser(self, config: mc.ConfigDict, prepared: Any) -> Visualise | None: ...


class Diffusion:
    """A diffusion backbone trained with a per-token level sampler (`apd.training.step`)."""

    def check(self, config, image_shape, num_classes) -> None:
        del num_classes
        levels.resolve_params(config.levels.name, image_shape[:-1], **config.levels.params)
        step_lib.schedule_from_config(config)
        checks.check_choice("prediction type", config.diffusion.prediction, corruption.PREDICTIONS)
        checks.check_choice("loss weighting", config.diffusion.weighting, losses.WEIGHTINGS)
        if config.get("sample_every_steps", 0):
            plans.synchronous(config.sample.steps, config.sample.num, image_shape[:-1])
        if config.data.name == runs.LATENT_DATA:
            # The latent dataset's autoencoder must be readable (and be the one
            # config.autoencoder.workdir names, when set) before anything is written.
            runs.load_codec(config)

    def build(self, config, mesh, image_shape, num_classes) -> builder.Run:
        return builder.build(config, mesh, image_shape, num_classes)

    def visualiser(self, config, prepared) -> Visualise | None:
        """Sample grids of the EMA parameters along the synchronous plan, with fixed noise and
        labels so the grids are comparable across steps: WORKDIR/samples/step_N.png (a latent
        run's samples decoded by its autoencoder)."""
        if not config.get("sample_every_steps", 0):
            return None
        num_classes, image_shape = prepared.num_classes, prepared.image_shape
        plan = plans.synchronous(config.sample.steps, config.sample.num, image_shape[:-1])
        labels = np.arange(config.sample.num, dtype=np.int32) % num_classes if num_classes else None
        sample_fn = sample_images.make_sample_fn(
            prepared.run.model.apply,
            schedule=step_lib.schedule_from_config(config),
            prediction=config.diffusion.prediction,
            channels=image_shape[-1],
            eta=config.sample.eta,
            num_classes=num_classes,
            out_sharding=mesh_lib.replicated(prepared.mesh),
        )
        key = jax.random.key(config.seed)
        codec = runs.load_codec(config)

        def visualise(state, step: int, workdir: str) -> None:
            images = jax.device_get(sample_fn(state.ema_params, plan, key, labels=labels))
            if codec is not None:
                images = np.asarray(codec.decode(images))
            if jax.process_index() == 0:
                sample_images.write_sample_grid(
                    os.path.join(workdir, "samples", f"step_{step:08d}.png"), images
                )

        return visualise


TASKS: dict[str, Task] = {"diffusion": Diffusion(), "autoencoder": autoencoder_task.Autoencoder()}


def register(name: str, task: Task) -> None:
    """Adds a task under `name` (what `config.task` selects)."""
    if name in TASKS and TASKS[name] is not task:
        raise ValueError(f"a task named {name!r} is already registered.")
    TASKS[name] = task


def get(config: mc.ConfigDict) -> Task:
    """The task `config.task` names ('diffusion' when the config has no `task`)."""
    name = config.get("task", "diffusion")
    checks.check_choice("config.task", name, tuple(TASKS))
    return TASKS[name]
