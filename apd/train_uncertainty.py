"""Trains the uncertainty head on a frozen backbone (uncertainty-guided sampling, method.md §7).

    python -m apd.train_uncertainty --workdir=DIR [--steps=300] [--batch=32]
    python -m apd.train_uncertainty --export=EXPORT_DIR ...

The head (`apd.models.UncertaintyHead`) learns the backbone's own per-pixel error. On each batch
of training images, level maps are drawn from the run's training level sampler (`--levels`
names another), the images are corrupted, and the frozen EMA backbone predicts with
`return_features=True`. The target of pixel i is

    log(mean over channels of (x_hat_i - x_i)^2 + 1e-6),

with x_hat the backbone's x-prediction; the head reads the features and the level map and is
fitted by mean squared error on that target. Only the head's parameters train.

Output: DIR/uncertainty/ (see `apd.runs`): params/, opt_state/ and head.json with the backbone
step and parameter hash, the head's attributes, the final training loss and a held-out
evaluation on the test split (loss, target variance, R^2 = 1 - loss / variance). A relaunch
with the same backbone and settings resumes up to --steps in all; a head trained against another
backbone step or with other settings is replaced (or pass --restart). The directory is replaced
only once the new head is written. A user error ends with one line
`apd.train_uncertainty: error: ...` and exit code 1 (--verbose: traceback).
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging

from apd import cli, corruption, levels, models, runs
from apd import data as data_lib

Array = jax.Array

LOG_EPS = 1e-6  # added to the squared error before the log


@dataclasses.dataclass(frozen=True)
class Options:
    """What `train` does; the fields mirror the command-line flags."""

    workdir: str | None = None
    export: str | None = None
    step: int | None = None
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    hidden: int = 64
    depth: int = 2
    levels: str = "config"
    seed: int = 0
    eval_examples: int = 256
    log_every: int = 50
    restart: bool = False


_FLAGS = flags.FlagValues()


def _define_flags() -> None:
    d = Options()
    f = _FLAGS
    flags.DEFINE_string("workdir", None, "Training workdir of the backbone.", flag_values=f)
    flags.DEFINE_string(
        "export", None, "An apd.export directory instead of --workdir.", flag_values=f
    )
    flags.DEFINE_integer("step", None, "Backbone checkpoint step (default: latest).", flag_values=f)
    flags.DEFINE_integer("steps", d.steps, "Head training steps in all (resumable).", flag_values=f)
    flags.DEFINE_integer("batch", d.batch, "Batch size.", flag_values=f)
    flags.DEFINE_float("lr", d.lr, "Adam learning rate.", flag_values=f)
    flags.DEFINE_integer("hidden", d.hidden, "Width of the head.", flag_values=f)
    flags.DEFINE_integer("depth", d.depth, "Residual conv layers of the head.", flag_values=f)
    flags.DEFINE_string("levels", d.levels, "Level sampler: config|NAME.", flag_values=f)
    flags.DEFINE_integer("seed", d.seed, "Seed of data order, levels, noise.", flag_values=f)
    flags.DEFINE_integer("eval_examples", d.eval_examples, "Held-out images.", flag_values=f)
    flags.DEFINE_integer("log_every", d.log_every, "Steps between loss logs.", flag_values=f)
    flags.DEFINE_bool("restart", d.restart, "Discard an existing head.", flag_values=f)
    flags.mark_flags_as_mutual_exclusive(["workdir", "export"], required=True, flag_values=f)


_define_flags()


def log_squared_error(x_hat: Array, x: Array, eps: float = LOG_EPS) -> Array:
    """The head's target: log(mean over channels of (x_hat - x)^2 + eps).

    Args:
      x_hat, x: [B, H, W, C] float32.
    Returns:
      [B, H, W] float32.
    """
    return jnp.log(jnp.mean(jnp.square(x_hat - x), axis=-1) + eps)


def make_loss_fn(
    run: runs.Run, head: models.UncertaintyHead, sampler: str, sampler_params: dict
) -> Callable[..., tuple[Array, tuple[Array, Array]]]:
    """`loss_fn(head_params, backbone_params, batch, key) -> (loss, (pred, target))`.

    batch: {'image': [B, H, W, C] float32 in [-1, 1], 'label': [B] int32}. Level maps [B, H, W]
    come from the level sampler, noise and label dropout from `key`; pred and target are the
    predicted and actual log squared errors [B, H, W] float32, loss their mean squared gap.
    """
    grid = run.image_shape[:-1]
    sampler_params = dict(sampler_params)

    def loss_fn(head_params, backbone_params, batch, key):
        x = batch["image"]
        k_levels, k_noise, k_labels = jax.random.split(key, 3)
        level_map = levels.sample(sampler, k_levels, x.shape[0], grid, **sampler_params)
        z = corruption.corrupt(x, jax.random.normal(k_noise, x.shape), level_map, run.schedule)
        labels = None
        if run.num_classes:
            drop = jax.random.bernoulli(k_labels, run.config.diffusion.label_dropout, (x.shape[0],))
            labels = jnp.where(drop, run.num_classes, batch["label"])
        out, features = run.model.apply(
            {"params": backbone_params}, z, level_map, labels, return_features=True
        )
        x_hat, _ = corruption.to_x_eps(out, z, level_map, run.schedule, run.prediction)
        target = jax.lax.stop_gradient(log_squared_error(x_hat, x))
        pred = head.apply({"params": head_params}, features, level_map)
        return jnp.mean(jnp.square(pred - target)), (pred, target)

    return loss_fn


def _feature_shape(run: runs.Run) -> tuple[int, ...]:
    """The backbone's feature shape [1, h, w, F] for one image (jax.eval_shape, no compute)."""
    H, W, C = run.image_shape
    _, features = jax.eval_shape(
        lambda p: run.model.apply(
            {"params": p},
            jnp.zeros((1, H, W, C)),
            jnp.zeros((1, H, W)),
            None,
            return_features=True,
        ),
        run.params,
    )
    h, w = features.shape[1:3]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"backbone features of shape {features.shape} do not tile {(H, W)}.")
    return tuple(features.shape)


def _sampler(run: runs.Run, name: str) -> tuple[str, dict]:
    grid = run.image_shape[:-1]
    if name == "config":
        name = run.config.levels.name
        return name, levels.resolve_params(name, grid, **run.config.levels.params.to_dict())
    return name, levels.resolve_params(name, grid)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def train(options: Options) -> dict:
    """Trains (or resumes) the head and writes DIR/uncertainty; returns its head.json contents."""
    # ----------------------------------------------------------------------------------------
    # The frozen backbone, the head and what an existing head was trained with.
    # ----------------------------------------------------------------------------------------
    for what, value in (("steps", options.steps), ("batch", options.batch)):
        if value < 1:
            raise ValueError(f"--{what} must be >= 1; got {value!r}.")
    if options.eval_examples < 1:
        raise ValueError(f"--eval_examples must be >= 1; got {options.eval_examples!r}.")
    run = runs.load(options.workdir, export_dir=options.export, step=options.step)
    sampler, sampler_params = _sampler(run, options.levels)
    feature_shape = _feature_shape(run)
    patch = run.image_shape[0] // feature_shape[1]  # pixels per feature cell and axis
    head_config = {"hidden": options.hidden, "depth": options.depth, "patch": patch}
    head = models.UncertaintyHead(**head_config)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(options.lr))
    directory = runs.uncertainty_dir(run)
    settings = {
        "head": head_config,
        "backbone": {
            "step": run.step,
            "param_shapes_sha256": run.description["param_shapes_sha256"],
            "model": run.description["model"],
        },
        "levels": {"name": sampler, "params": _jsonable(sampler_params)},
        "batch": options.batch,
        "lr": options.lr,
        "seed": options.seed,
    }

    key_init, key_train, key_eval = jax.random.split(jax.random.key(options.seed), 3)
    device = jax.local_devices()[0]  # every array committed here: one compilation per program
    head_params = _init_head(run, head, feature_shape, key_init)
    head_params, opt_state = jax.device_put((head_params, tx.init(head_params)), device)
    start = 0
    existing = runs.read_uncertainty_info(directory)
    if existing is not None and not options.restart:
        if {k: existing.get(k) for k in settings} == json.loads(json.dumps(settings)):
            head_params = runs.restore_tree(os.path.join(directory, "params"), head_params)
            opt_state = runs.restore_tree(os.path.join(directory, "opt_state"), opt_state)
            start = int(existing["steps_done"])
            logging.info("Resuming the uncertainty head in %s at step %d.", directory, start)
        else:
            logging.warning(
                "The uncertainty head in %s was trained with other settings (backbone step %s); "
                "training a new one, which replaces it when done.",
                directory,
                existing.get("backbone", {}).get("step"),
            )
    if start >= options.steps:
        logging.info(
            "The head in %s has %d >= %d steps: nothing to do.", directory, start, options.steps
        )
        return existing

    # ----------------------------------------------------------------------------------------
    # Training.
    # ----------------------------------------------------------------------------------------
    loss_fn = make_loss_fn(run, head, sampler, sampler_params)

    @jax.jit
    def train_step(head_params, opt_state, backbone_params, batch, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            head_params, backbone_params, batch, key
        )
        updates, opt_state = tx.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, loss

    source = data_lib.get_source(
        run.config.data.name, "train", data_dir=run.config.data.data_dir, path=run.config.data.path
    )
    batches = data_lib.make_dataset(
        source,
        global_batch_size=options.batch,
        seed=options.seed + start,
        image_size=run.config.data.image_size,
        process_index=0,
        process_count=1,
    )
    losses: list[Array] = []
    recent: list[float] = []
    t0 = time.perf_counter()
    for step in range(start, options.steps):
        batch = jax.device_put(next(batches), device)
        head_params, opt_state, loss = train_step(
            head_params, opt_state, run.params, batch, jax.random.fold_in(key_train, step)
        )
        losses.append(loss)
        if (step + 1) % options.log_every == 0 or step + 1 == options.steps:
            recent = [float(v) for v in jax.device_get(losses)]
            if not np.all(np.isfinite(recent)):
                raise FloatingPointError(f"non-finite uncertainty-head loss by step {step + 1}.")
            logging.info(
                "uncertainty head step %d/%d: loss %.4f (%.1f steps/s)",
                step + 1,
                options.steps,
                np.mean(recent),
                len(recent) / (time.perf_counter() - t0),
            )
            losses, t0 = [], time.perf_counter()

    # ----------------------------------------------------------------------------------------
    # Held-out evaluation and the atomic write of the new head.
    # ----------------------------------------------------------------------------------------
    evaluation = evaluate(run, loss_fn, head_params, options, key_eval)
    info = settings | {
        "steps_done": options.steps,
        "final_loss": float(np.mean(recent)),
        "target": f"log(mean_c (x_hat - x)^2 + {LOG_EPS})",
        "eval": evaluation,
    }
    save(directory, head_params, opt_state, info)
    logging.info("Wrote the uncertainty head to %s: %s", directory, evaluation)
    return info


def _init_head(
    run: runs.Run, head: models.UncertaintyHead, feature_shape: tuple[int, ...], key: Array
) -> Any:
    """The head's initial parameters, from the backbone's feature shape (the backbone not run)."""
    features = jnp.zeros(feature_shape, jnp.float32)
    level_map = jnp.ones((1, *run.image_shape[:-1]), jnp.float32)
    return jax.jit(head.init)(key, features, level_map)["params"]


def evaluate(
    run: runs.Run, loss_fn: Callable, head_params: Any, options: Options, key: Array
) -> dict[str, float]:
    """Loss, target variance and R^2 of the head on the first test images (fixed level maps)."""
    source = data_lib.get_source(
        run.config.data.name, "test", data_dir=run.config.data.data_dir, path=run.config.data.path
    )
    dataset = data_lib.make_eval_dataset(
        source,
        global_batch_size=options.batch,
        num_examples=options.eval_examples,
        image_size=run.config.data.image_size,
        process_index=0,
        process_count=1,
    )

    @jax.jit
    def sums(head_params, backbone_params, batch, key):
        _, (pred, target) = loss_fn(head_params, backbone_params, batch, key)
        mask = batch["mask"].astype(jnp.float32)[:, None, None]
        return (
            jnp.sum(mask * jnp.square(pred - target)),
            jnp.sum(mask * target),
            jnp.sum(mask * jnp.square(target)),
            jnp.sum(mask) * target.shape[1] * target.shape[2],
        )

    device = jax.local_devices()[0]
    totals = np.zeros(4)
    for i, batch in enumerate(dataset):
        batch = jax.device_put({k: batch[k] for k in ("image", "label", "mask")}, device)
        key_i = jax.random.fold_in(key, i)
        totals += np.asarray(jax.device_get(sums(head_params, run.params, batch, key_i)))
    sq_err, total, total_sq, count = totals
    loss = sq_err / count
    variance = total_sq / count - (total / count) ** 2
    return {
        "loss": float(loss),
        "target_mean": float(total / count),
        "target_variance": float(variance),
        "r2": float(1.0 - loss / variance) if variance > 0 else 0.0,
        "examples": int(min(options.eval_examples, len(source))),
    }


def save(directory: str, head_params: Any, opt_state: Any, info: dict) -> None:
    """Writes params/, opt_state/ and head.json to a fresh directory, then swaps it in."""
    directory = os.path.abspath(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    for path in (tmp, old):
        if os.path.exists(path):
            shutil.rmtree(path)
    os.makedirs(tmp)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(tmp, "params"), head_params)
        checkpointer.save(os.path.join(tmp, "opt_state"), opt_state)
    with open(os.path.join(tmp, runs.UNCERTAINTY_JSON), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    if os.path.exists(old):
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses this binary's flags; see `runs.parse_binary_flags`."""
    return runs.parse_binary_flags(_FLAGS, argv, "apd.train_uncertainty", __doc__)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    info = train(runs.options_from_flags(_FLAGS, Options))
    print(
        f"uncertainty head: {info['steps_done']} steps against backbone step "
        f"{info['backbone']['step']}; held-out loss {info['eval']['loss']:.4f}, "
        f"R^2 {info['eval']['r2']:.3f}"
    )


if __name__ == "__main__":
    cli.run(main, "apd.train_uncertainty", flags_parser=parse_flags)
