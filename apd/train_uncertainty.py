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
step and parameter hash, the head's attributes, the final training loss, a held-out evaluation
on the test split (loss, target variance, R^2 = 1 - loss / variance, Pearson and Spearman
correlation of predicted and actual log error over pixels) and the head's calibration:

    calibration.low, calibration.high   the 5% and 95% quantiles of the PREDICTED log error over
                                        the held-out pixels (levels from the same level sampler)
    calibration.by_level                the same quantiles per level bucket [k/10, (k+1)/10)

The adaptive sampler's rule (`run_sampler.Sampler.adaptive`) maps a predicted log error e to
the absolute difficulty clip((e - low) / (high - low), 0, 1): the same scale for every image and
every state, so an image whose pixels are all predicted easy takes fewer network calls
(`--difficulty_low/high` of `apd.sample` override the range). A relaunch with the same backbone
and settings resumes up to --steps in all (a finished head without a calibration, from before it
was recorded, is evaluated and calibrated without further training); a head trained against
another backbone step or with other settings is replaced (or pass --restart). The directory is
replaced only once the new head is written. A user error ends with one line
`apd.train_uncertainty: error: ...` and exit code 1 (--verbose: traceback).
"""

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
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
CALIBRATION_QUANTILES = (0.05, 0.95)  # of the predicted log error: difficulty 0 and 1
LEVEL_BUCKETS = 10  # equal-width level buckets of the per-level calibration table


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
) -> Callable[..., tuple[Array, tuple[Array, Array, Array]]]:
    """`loss_fn(head_params, backbone_params, batch, key) -> (loss, (pred, target, levels))`.

    batch: {'image': [B, H, W, C] float32 in [-1, 1], 'label': [B] int32}. Level maps [B, H, W]
    come from the level sampler, noise and label dropout from `key`; pred and target are the
    predicted and actual log squared errors [B, H, W] float32, loss their mean squared gap, and
    levels the level maps [B, H, W] they were taken at.
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
        return jnp.mean(jnp.square(pred - target)), (pred, target, level_map)

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
    loss_fn = make_loss_fn(run, head, sampler, sampler_params)
    if start >= options.steps:
        if "calibration" in existing:
            logging.info(
                "The head in %s has %d >= %d steps: nothing to do.", directory, start, options.steps
            )
            return existing
        logging.info(
            "The head in %s has %d steps but no calibration: evaluating it.", directory, start
        )
        recent = [existing["final_loss"]]
    else:
        head_params, opt_state, recent = _fit(
            run, loss_fn, tx, head_params, opt_state, options, start, key_train
        )

    # ----------------------------------------------------------------------------------------
    # Held-out evaluation and calibration, and the atomic write of the new head.
    # ----------------------------------------------------------------------------------------
    evaluation, calibration = evaluate(
        loss_fn, head_params, run.params, _eval_batches(run, options), key_eval
    )
    info = settings | {
        "steps_done": max(start, options.steps),
        "final_loss": float(np.mean(recent)),
        "target": f"log(mean_c (x_hat - x)^2 + {LOG_EPS})",
        "eval": evaluation,
        "calibration": calibration,
    }
    save(directory, head_params, opt_state, info)
    logging.info("Wrote the uncertainty head to %s: %s", directory, evaluation)
    return info


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """The jitted `step(head_params, opt_state, backbone_params, batch, key)` ->
    (head_params, opt_state, loss): one optimizer step of the head on `loss_fn`."""

    @jax.jit
    def train_step(head_params, opt_state, backbone_params, batch, key):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            head_params, backbone_params, batch, key
        )
        updates, opt_state = tx.update(grads, opt_state, head_params)
        return optax.apply_updates(head_params, updates), opt_state, loss

    return train_step


def _fit(
    run: runs.Run,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    head_params: Any,
    opt_state: Any,
    options: Options,
    start: int,
    key: Array,
) -> tuple[Any, Any, list[float]]:
    """Steps start..options.steps on the training split; returns the parameters, the optimizer
    state and the losses of the last logging interval."""
    train_step = make_train_step(loss_fn, tx)
    device = jax.local_devices()[0]  # every array committed here: one compilation per program
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
            head_params, opt_state, run.params, batch, jax.random.fold_in(key, step)
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
    return head_params, opt_state, recent


def _init_head(
    run: runs.Run, head: models.UncertaintyHead, feature_shape: tuple[int, ...], key: Array
) -> Any:
    """The head's initial parameters, from the backbone's feature shape (the backbone not run)."""
    features = jnp.zeros(feature_shape, jnp.float32)
    level_map = jnp.ones((1, *run.image_shape[:-1]), jnp.float32)
    return jax.jit(head.init)(key, features, level_map)["params"]


def _eval_batches(run: runs.Run, options: Options) -> Iterable[dict[str, np.ndarray]]:
    """The first --eval_examples test images in batches of --batch (padding rows masked out)."""
    source = data_lib.get_source(
        run.config.data.name, "test", data_dir=run.config.data.data_dir, path=run.config.data.path
    )
    return data_lib.make_eval_dataset(
        source,
        global_batch_size=options.batch,
        num_examples=options.eval_examples,
        image_size=run.config.data.image_size,
        process_index=0,
        process_count=1,
    )


def evaluate(
    loss_fn: Callable,
    head_params: Any,
    backbone_params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    key: Array,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The head on held-out batches: (evaluation, calibration).

    Batch i draws its level maps and noise from fold_in(key, i) (fixed, so a re-evaluation gives
    the same numbers); rows with batch['mask'] False (padding) are left out.

    Args:
      loss_fn: from `make_loss_fn`.
      batches: dicts {'image': [B, H, W, C] float32, 'label': [B] int32, 'mask': [B] bool}.
    Returns:
      evaluation: loss (mean squared gap of predicted and actual log error), target mean and
        variance, R^2 = 1 - loss / variance, Pearson and Spearman correlation of predicted and
        actual log error over all held-out pixels, the number of examples.
      calibration: `calibrate` of the predicted log error.
    """

    @jax.jit
    def predict(head_params, backbone_params, batch, key):
        return loss_fn(head_params, backbone_params, batch, key)[1]

    device = jax.local_devices()[0]
    preds, targets, levels = [], [], []
    examples = 0
    for i, batch in enumerate(batches):
        keep = np.asarray(batch["mask"], bool)
        batch = jax.device_put({k: batch[k] for k in ("image", "label")}, device)
        out = jax.device_get(
            predict(head_params, backbone_params, batch, jax.random.fold_in(key, i))
        )
        for arrays, value in zip((preds, targets, levels), out, strict=True):
            arrays.append(np.asarray(value, np.float64)[keep].ravel())
        examples += int(keep.sum())
    if not examples:
        raise ValueError("the uncertainty head's evaluation got no held-out examples.")
    pred, target, level = (np.concatenate(a) for a in (preds, targets, levels))
    loss = float(np.mean(np.square(pred - target)))
    variance = float(np.var(target))
    evaluation = {
        "loss": loss,
        "target_mean": float(np.mean(target)),
        "target_variance": variance,
        "r2": 1.0 - loss / variance if variance > 0 else 0.0,
        "pearson": _pearson(pred, target),
        "spearman": _pearson(_ranks(pred), _ranks(target)),
        "examples": examples,
    }
    return evaluation, calibrate(pred, level)


def calibrate(log_error: np.ndarray, levels: np.ndarray) -> dict[str, Any]:
    """The range of predicted log errors that the adaptive sampler maps to difficulty [0, 1].

    Args:
      log_error: [P] predicted log squared errors of held-out pixels.
      levels: [P] the levels they were predicted at.
    Returns:
      {'quantiles': CALIBRATION_QUANTILES, 'low', 'high': those quantiles of log_error over all
      pixels, 'pixels': P, 'by_level': one entry {'levels': [a, b], 'low', 'high', 'pixels'} per
      non-empty level bucket [a, b) of width 1 / LEVEL_BUCKETS (the last one closed)}.
    """
    q = list(CALIBRATION_QUANTILES)
    low, high = np.quantile(log_error, q)
    bucket = np.minimum((levels * LEVEL_BUCKETS).astype(np.int64), LEVEL_BUCKETS - 1)
    by_level = []
    for k in range(LEVEL_BUCKETS):
        values = log_error[bucket == k]
        if values.size:
            lo, hi = np.quantile(values, q)
            by_level.append(
                {
                    "levels": [k / LEVEL_BUCKETS, (k + 1) / LEVEL_BUCKETS],
                    "low": float(lo),
                    "high": float(hi),
                    "pixels": int(values.size),
                }
            )
    return {
        "quantiles": q,
        "low": float(low),
        "high": float(high),
        "pixels": int(log_error.size),
        "by_level": by_level,
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks (ties broken by position: the values are continuous)."""
    ranks = np.empty(values.size, np.float64)
    ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else 0.0


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
    evaluation, calibration = info["eval"], info["calibration"]
    print(
        f"uncertainty head: {info['steps_done']} steps against backbone step "
        f"{info['backbone']['step']}; held-out loss {evaluation['loss']:.4f}, "
        f"R^2 {evaluation['r2']:.3f}, Spearman {evaluation['spearman']:.3f}; predicted log "
        f"error range (difficulty 0..1) {calibration['low']:.3f}..{calibration['high']:.3f}"
    )


if __name__ == "__main__":
    cli.run(main, "apd.train_uncertainty", flags_parser=parse_flags)
