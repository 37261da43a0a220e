"""What a training run compiles, with no input pipeline, checkpointing or metrics attached.

`build(config, mesh, image_shape, num_classes)` gives the diffusion backbone's model, the sharded
TrainState layout (nothing allocated) and the jitted training step; `assemble` is the part every
trained model shares (sharding, jit with donation), which other tasks (`apd.training.tasks`) call
with their own model, init and step. It needs jax, flax, optax and ml_collections
only, so benchmarks and other programs can compile apd's real training step on machines that lack
the data and logging stack (grain, TFDS, clu); `apd.training.loop` wraps it with those.
"""

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from apd import models
from apd.training import mesh as mesh_lib
from apd.training import optim
from apd.training import state as state_lib
from apd.training import step as step_lib


def model_description(model_config: dict, abstract_params: Any) -> dict:
    """Name, options and a hash of the parameter tree's shapes, stored with every checkpoint."""
    shapes = {
        jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model": model_config,
        "num_params": int(sum(int(leaf.size) for leaf in jax.tree.leaves(abstract_params))),
        "param_shapes_sha256": digest,
    }


def build_model(config: mc.ConfigDict, num_classes: int):
    return models.build(
        config.model.name, num_classes=num_classes, **config.model.options.to_dict()
    )


def abstract_state(model, tx, image_shape, num_classes: int, seed: int):
    """The TrainState's shapes and dtypes (jax.eval_shape), nothing allocated."""

    def init(key):
        z = jnp.zeros((1, *image_shape), jnp.float32)
        levels = jnp.zeros((1, *image_shape[:-1]), jnp.float32)
        labels = jnp.zeros((1,), jnp.int32) if num_classes else None
        params = model.init({"params": key}, z, levels, labels)["params"]
        return state_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    return init, jax.eval_shape(init, jax.random.key(seed))


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Per-process numpy batches -> global arrays sharded over the mesh's batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run compiles: the model, its sharded state layout and the jitted step."""

    model: Any
    init: Callable[[], state_lib.TrainState]
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs carrying their shardings
    train_step: Callable
    batch_sharding: jax.sharding.NamedSharding
    description: dict


def assemble(
    config: mc.ConfigDict,
    mesh,
    model: Any,
    init_fn: Callable[[jax.Array], state_lib.TrainState],
    step_fn: Callable,
    abstract: state_lib.TrainState,
    description: dict,
) -> Run:
    """The part of a Run every trained model shares: the state sharded over the mesh
    (`models.param_shardings`: FSDP where the mesh has an fsdp axis), the step jitted with the
    state donated, batches sharded over the batch axes, init jitted into the sharded layout.

    Args:
      init_fn: key -> the initial TrainState (traced; nothing allocated here).
      step_fn: (state, batch) -> (state, metrics), not yet jitted.
      abstract: `jax.eval_shape(init_fn, key)`.
      description: the model description stored with every checkpoint (`model_description`).
    """
    shardings = models.param_shardings(abstract, mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
    init = jax.jit(init_fn, out_shardings=shardings)
    return Run(
        model=model,
        init=lambda: init(jax.random.key(config.seed)),
        abstract_state=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        ),
        train_step=train_step,
        batch_sharding=batch_sharding,
        description=description,
    )


def build(config: mc.ConfigDict, mesh, image_shape: tuple[int, ...], num_classes: int) -> Run:
    """The diffusion backbone's Run: model, sharded state layout (nothing allocated), jitted
    step (`apd.training.step`)."""
    model = build_model(config, num_classes)
    tx = optim.make(config.optimizer, config.total_steps)
    init_fn, abstract = abstract_state(model, tx, image_shape, num_classes, config.seed)
    step_fn = step_lib.make_train_step(
        model,
        tx,
        config,
        tuple(image_shape[:-1]),
        num_classes,
        batch_sharding=mesh_lib.batch_sharding(mesh),
    )
    description = model_description(
        config.model.to_dict() | {"num_classes": num_classes}, abstract.params
    )
    return assemble(config, mesh, model, init_fn, step_fn, abstract, description)
