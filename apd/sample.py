"""Samples from a trained run along a plan (method.md §7) and writes images, arrays and a record.

    python -m apd.sample --workdir=DIR --plan=synchronous --num=64 --out=DIR2
    python -m apd.sample --export=EXPORT_DIR --plan=inpaint --mask=square --out=DIR2
    python -m apd.sample --workdir=DIR --plan=edit --strength=linear --out=DIR2
    python -m apd.sample --workdir=DIR --plan=autoregressive --patches=4 --steps_per_group=16 ...
    python -m apd.sample --workdir=DIR --plan=adaptive --steps=250 --min_steps=100 --out=DIR2
    python -m apd.sample --workdir=DIR --plan=repaint --mask=half --jump=10 --resample=10 ...

The run's EMA parameters are used (the latest checkpoint, or --step; an export holds one step).

Plans:
  synchronous     every pixel 1 -> 0 in --steps steps.
  inpaint         known pixels (--mask, default half) kept exactly, the others 1 -> 0 in
                  --steps steps.
  edit            pixel i from its --strength (noised image) to 0 in --steps steps; strength 0
                  keeps the pixel.
  autoregressive  K x K patches (--patches) generated one after another in --order, each over
                  --steps_per_group steps, consecutive windows sharing --overlap steps (--steps
                  is not used: the plan has (K^2 - 1)(steps_per_group - overlap) +
                  steps_per_group steps).
  adaptive        uncertainty-guided: needs a trained head (python -m apd.train_uncertainty).
                  The head predicts each pixel's log squared error e at an image's first step
                  (the noise, and the known pixels with --mask: adaptive inpainting) and every
                  --reestimate_every steps after (0: never), from the features of that step's
                  own network call; d = clip((e - low) / (high - low), 0, 1) with the head's
                  calibrated range (head.json `calibration`, or --difficulty_low/high), and a
                  pixel with level t left takes round((min_steps + (steps - min_steps) d) t)
                  more steps, moving linearly to 0 (--align). An image is done when all its
                  pixels are; its slot in the pool of --batch slots then takes the next image
                  (`run_sampler.AdaptivePool`). The output states each image's network calls,
                  their mean, and the forward passes of the run (pool steps x batch) next to
                  the synchronous plan's.
  repaint         the RePaint baseline (--jump, --resample; eta 1) on --mask (default half).

Masks (1 = known; the families of `apd.evaluation.masks`, drawn per image from --seed; the first
six are the evaluation's, so --mask=wide --seed=S gives the masks of evaluation seed S): extrema
(only a box of half the height and width known), square (a box of half the height and width to
generate), thin and wide (LaMa's free-form strokes), half (the left, right, top or bottom half
known), perlin (Perlin regions), top (the top half known), patches (each cell of a 4 x 4 grid to
generate with probability 1/2); or FILE.npy ([H, W] or [N, H, W], 0/1).
Strength maps: linear (0 at the left edge, kept, rising to 1 at the right edge) or FILE.npy
([H, W] or [N, H, W] in [0, 1]). Input images are the first --num images of the dataset's
--split.

Labels (class-conditional models): auto (the images' labels for plans with inputs, else
random), random, data, null (unconditional), or class ids '3' / '0,1,2' (repeated cyclically).

Sampling goes through `apd.run_sampler.Sampler` (chunks of --batch, the last one padded; chunk
i draws from fold_in(key(--seed), i); adaptive: a pool of --batch slots, image i drawing from
its own key), so the same call from a notebook gives the same arrays.

Output in --out: samples.png (the grid; inputs with masks, strength or step-count maps beside
the samples where the plan has them), samples.npz (samples uint8 [N, H, W, C] and
samples_float float32 in [-1, 1]; labels, inputs, inputs_float, masks (1 = known), strength,
steps_per_pixel, log_error and network_calls (per image) where relevant) and sample_info.json
(checkpoint step, plan and its options, steps, eta, guidance, labels, network calls from
`sample_cost` (adaptive: the pool's, and the `adaptive` block), seed).
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from apd import checks, cli, plans, run_sampler, runs, sampling
from apd.evaluation import masks as masks_lib
from apd.sampling import images

PLANS = ("synchronous", "inpaint", "edit", "autoregressive", "adaptive", "repaint")
MASKS = masks_lib.ALL_FAMILIES
_WITH_INPUTS = ("inpaint", "edit", "repaint")


@dataclasses.dataclass(frozen=True)
class Options:
    """What `run` samples; the fields mirror the command-line flags (see the module docstring)."""

    plan: str
    out: str
    workdir: str | None = None
    export: str | None = None
    step: int | None = None
    num: int = 64
    batch: int = 64
    steps: int = 250
    eta: float | None = None  # None: 0.25 (RePaint: 1)
    cfg_scale: float = 0.0
    input_guidance: float = 0.0
    labels: str = "auto"
    seed: int = 0
    split: str = "test"
    mask: str | None = None  # None: 'half' for inpaint and repaint; no mask for adaptive
    strength: str = "linear"
    patches: int = 4
    steps_per_group: int = 16
    order: str = "raster"
    overlap: int = 0
    min_steps: int | None = None  # None: 2 * steps // 5
    align: str = "start"
    reestimate_every: int = 10
    difficulty_low: float | None = None
    difficulty_high: float | None = None
    jump: int = 10
    resample: int = 10


_FLAGS = flags.FlagValues()


def _define_flags() -> None:
    d = Options(plan="", out="")
    f = _FLAGS
    flags.DEFINE_string("workdir", None, "Training workdir.", flag_values=f)
    flags.DEFINE_string(
        "export", None, "An apd.export directory instead of --workdir.", flag_values=f
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=f)
    flags.DEFINE_string("plan", None, f"One of {', '.join(PLANS)}.", flag_values=f)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=f)
    flags.DEFINE_integer("num", d.num, "Number of samples.", flag_values=f)
    flags.DEFINE_integer("batch", d.batch, "Samples per network call (chunk size).", flag_values=f)
    flags.DEFINE_integer("steps", d.steps, "Sampling steps (adaptive: the most).", flag_values=f)
    flags.DEFINE_float("eta", None, "DDIM eta (default 0.25; repaint 1).", flag_values=f)
    flags.DEFINE_float("cfg_scale", d.cfg_scale, "Classifier-free guidance scale.", flag_values=f)
    flags.DEFINE_float("input_guidance", d.input_guidance, "Input guidance scale.", flag_values=f)
    flags.DEFINE_string("labels", d.labels, "auto|random|data|null|ids like 0,1,2.", flag_values=f)
    flags.DEFINE_integer("seed", d.seed, "Seed of noise, labels, masks, orders.", flag_values=f)
    flags.DEFINE_string("split", d.split, "Dataset split of input images.", flag_values=f)
    flags.DEFINE_string(
        "mask",
        None,
        f"{'|'.join(MASKS)} (drawn from --seed) or FILE.npy (1 = known); default half.",
        flag_values=f,
    )
    flags.DEFINE_string("strength", d.strength, "Edit strength: linear|FILE.npy.", flag_values=f)
    flags.DEFINE_integer("patches", d.patches, "Autoregressive: patches per side.", flag_values=f)
    flags.DEFINE_integer("steps_per_group", d.steps_per_group, "Autoregressive.", flag_values=f)
    flags.DEFINE_string("order", d.order, "Autoregressive: raster|random.", flag_values=f)
    flags.DEFINE_integer("overlap", d.overlap, "Autoregressive window overlap.", flag_values=f)
    flags.DEFINE_integer(
        "min_steps", None, "Adaptive: fewest steps (default 2 steps/5).", flag_values=f
    )
    flags.DEFINE_string(
        "align", d.align, "Adaptive: start|end (see apd.run_sampler.AdaptiveRule).", flag_values=f
    )
    flags.DEFINE_integer(
        "reestimate_every",
        d.reestimate_every,
        "Adaptive: steps between difficulty estimates (0: only at the first step).",
        flag_values=f,
    )
    flags.DEFINE_float(
        "difficulty_low", None, "Adaptive: log error of difficulty 0.", flag_values=f
    )
    flags.DEFINE_float(
        "difficulty_high", None, "Adaptive: log error of difficulty 1.", flag_values=f
    )
    flags.DEFINE_integer("jump", d.jump, "RePaint jump length j.", flag_values=f)
    flags.DEFINE_integer("resample", d.resample, "RePaint resampling r.", flag_values=f)
    flags.mark_flags_as_required(["plan", "out"], flag_values=f)
    flags.mark_flags_as_mutual_exclusive(["workdir", "export"], required=True, flag_values=f)


_define_flags()


# ---------------------------------------------------------------------------------------------
# Inputs: options, images, labels, masks, strength maps
# ---------------------------------------------------------------------------------------------


def check_options(options: Options) -> None:
    """Raises ValueError for a bad option before anything is loaded."""
    checks.check_choice("plan", options.plan, PLANS)
    if not options.out:
        raise ValueError("--out (the output directory) is required.")
    for what in ("num", "batch", "steps", "patches", "steps_per_group", "jump", "resample"):
        value = getattr(options, what)
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{what} must be an integer >= 1; got {value!r}.")
    if options.mask is not None and not options.mask.endswith(".npy"):
        checks.check_choice("mask", options.mask, MASKS)
    if options.strength != "linear" and not options.strength.endswith(".npy"):
        raise ValueError(f"--strength must be 'linear' or a FILE.npy; got {options.strength!r}.")
    checks.check_choice("autoregressive order", options.order, plans.ORDERS)
    checks.check_choice("adaptive align", options.align, plans.ALIGNS)
    if (options.difficulty_low is None) != (options.difficulty_high is None):
        raise ValueError(
            "--difficulty_low and --difficulty_high go together (an absolute log-error range); "
            f"got {options.difficulty_low!r} and {options.difficulty_high!r}."
        )
    if not (isinstance(options.reestimate_every, int) and options.reestimate_every >= 0):
        raise ValueError(
            f"--reestimate_every must be an integer >= 0; got {options.reestimate_every!r}."
        )
    if options.min_steps is not None and not 1 <= options.min_steps <= options.steps:
        raise ValueError(
            f"--min_steps must lie in [1, --steps={options.steps}]; got {options.min_steps!r}."
        )
    if options.plan == "repaint" and (options.cfg_scale or options.input_guidance):
        raise ValueError(
            "the repaint baseline takes no guidance; got --cfg_scale="
            f"{options.cfg_scale!r}, --input_guidance={options.input_guidance!r}."
        )
    if options.labels not in run_sampler.LABEL_MODES:
        run_sampler.parse_label_ids(options.labels, "--labels")


def _from_file(path: str, what: str, num: int, grid: tuple[int, int]) -> np.ndarray:
    """[H, W], [1, H, W] or [num, H, W] from a .npy file -> float32 [num, H, W]."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--{what} file {path} does not exist.")
    arr = np.load(path).astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != grid or arr.shape[0] not in (1, num):
        raise ValueError(
            f"--{what} file {path} holds shape {arr.shape}; expected [H, W] = {grid}, "
            f"[1, H, W] or [N, H, W] with N = --num = {num}."
        )
    return np.broadcast_to(arr, (num, *grid)).copy()


def make_masks(spec: str, num: int, grid: tuple[int, int], seed: int) -> np.ndarray:
    """Inpainting masks uint8 [num, H, W], 1 = known: a family of `apd.evaluation.masks` drawn
    from `seed`, or a FILE.npy."""
    if spec.endswith(".npy"):
        masks = _from_file(spec, "mask", num, grid)
        checks.check_mask(masks, masks.shape, f"--mask file {spec}", zero="generate", one="known")
        return masks.astype(np.uint8)
    checks.check_choice("mask", spec, MASKS)
    return masks_lib.make_masks(spec, seed, num, grid)


def make_strength(spec: str, num: int, grid: tuple[int, int]) -> np.ndarray:
    """Edit strength maps float32 [num, H, W] in [0, 1]."""
    if spec.endswith(".npy"):
        strength = _from_file(spec, "strength", num, grid)
        checks.check_levels(strength, f"--strength file {spec}")
        return strength
    ramp = np.linspace(0.0, 1.0, grid[1], dtype=np.float32)
    return np.broadcast_to(ramp[None, None, :], (num, *grid)).copy()


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def min_steps(options: Options) -> int:
    """The adaptive plan's fewest steps per pixel: --min_steps, default 2 * steps // 5."""
    if options.min_steps is None:
        return run_sampler.default_min_steps(options.steps)
    return options.min_steps


def sample_plan(
    sampler: run_sampler.Sampler,
    options: Options,
    eta: float,
    inputs: np.ndarray | None,
    masks: np.ndarray | None,
    strength: np.ndarray | None,
    labels: np.ndarray | None,
) -> run_sampler.Samples:
    """The library call that --plan and the other options stand for."""
    o = options
    common = dict(labels=labels, seed=o.seed, eta=eta)
    guided = dict(common, cfg_scale=o.cfg_scale, input_guidance=o.input_guidance)
    if o.plan == "synchronous":
        return sampler.generate(o.num, steps=o.steps, **guided)
    if o.plan == "inpaint":
        return sampler.inpaint(inputs, masks, steps=o.steps, **guided)
    if o.plan == "edit":
        return sampler.edit(inputs, strength, steps=o.steps, **guided)
    if o.plan == "autoregressive":
        return sampler.autoregressive(
            o.num,
            patches=o.patches,
            steps_per_group=o.steps_per_group,
            order=o.order,
            overlap=o.overlap,
            **guided,
        )
    if o.plan == "adaptive":
        return sampler.adaptive(
            o.num,
            steps=o.steps,
            min_steps=min_steps(o),
            images=inputs,
            known=masks,
            align=o.align,
            reestimate_every=o.reestimate_every,
            difficulty_low=o.difficulty_low,
            difficulty_high=o.difficulty_high,
            **guided,
        )
    return sampler.repaint(inputs, masks, steps=o.steps, jump=o.jump, resample=o.resample, **common)


def run(options: Options) -> dict:
    """Samples as `options` says, writes the three output files; returns sample_info.json."""
    t_start = time.perf_counter()
    check_options(options)
    loaded = runs.load(options.workdir, export_dir=options.export, step=options.step)
    eta = options.eta if options.eta is not None else 1.0 if options.plan == "repaint" else 0.25
    sampler = run_sampler.Sampler(loaded, batch=min(options.batch, options.num))
    difficulty = None
    if options.plan == "adaptive":  # fails here, before any input is read, without a head
        head = sampler.uncertainty_head()  # or without its calibration and no range given
        difficulty = run_sampler.difficulty_range(
            head, options.difficulty_low, options.difficulty_high
        )

    # Per-sample inputs: images, masks, strength maps, labels.
    num, grid = options.num, sampler.image_grid
    mask_spec = options.mask
    if mask_spec is None and options.plan in ("inpaint", "repaint"):
        mask_spec = "half"
    masks = None if mask_spec is None else make_masks(mask_spec, num, grid, options.seed)
    strength = make_strength(options.strength, num, grid) if options.plan == "edit" else None
    inputs = data_labels = None
    if options.plan in _WITH_INPUTS or masks is not None:
        inputs, data_labels = runs.first_images(loaded, options.split, num)
    labels = run_sampler.resolve_labels(
        options.labels, loaded.num_classes, num, options.seed, data_labels, name="--labels"
    )

    result = sample_plan(sampler, options, eta, inputs, masks, strength, labels)

    # Output: samples.npz, samples.png, sample_info.json.
    arrays: dict[str, np.ndarray] = {
        "samples": images.to_uint8(result.images),
        "samples_float": result.images.astype(np.float32),
    }
    if labels is not None:
        arrays["labels"] = labels
    if inputs is not None:
        arrays["inputs"] = images.to_uint8(inputs)
        arrays["inputs_float"] = inputs
    if masks is not None:
        arrays["masks"] = masks
    if strength is not None:
        arrays["strength"] = strength
    arrays.update(result.extras)
    os.makedirs(options.out, exist_ok=True)
    np.savez_compressed(os.path.join(options.out, "samples.npz"), **arrays)
    _write_png(os.path.join(options.out, "samples.png"), options, arrays)

    seconds = time.perf_counter() - t_start
    info = _info(options, loaded, eta, list(result.costs), arrays, seconds, difficulty)
    with open(os.path.join(options.out, "sample_info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


def _write_png(path: str, options: Options, arrays: dict[str, np.ndarray]) -> None:
    """The samples, with their inputs and maps beside them where the plan has them."""
    panels = []
    if "masks" in arrays:
        panels.append(images.masked_input_image(arrays["inputs"], arrays["masks"] == 1))
    elif "inputs" in arrays:
        panels.append(arrays["inputs"])
    if "strength" in arrays:
        panels.append(images.level_map_image(arrays["strength"]))
    if "steps_per_pixel" in arrays:
        panels.append(images.level_map_image(arrays["steps_per_pixel"] / options.steps))
    tiles = images.side_by_side(*panels, arrays["samples"]) if panels else arrays["samples"]
    columns = max(1, round(math.sqrt(len(tiles) / (len(panels) + 1))))
    images.write_png(path, images.grid(tiles, columns))


def _info(
    options: Options,
    loaded: runs.Run,
    eta: float,
    costs: list[sampling.Cost],
    arrays: dict[str, np.ndarray],
    seconds: float,
    difficulty: tuple[float, float] | None,
) -> dict[str, Any]:
    plan_options = {
        "inpaint": ("mask",),
        "edit": ("strength",),
        "autoregressive": ("patches", "steps_per_group", "order", "overlap"),
        "adaptive": (
            "mask",
            "min_steps",
            "align",
            "reestimate_every",
            "difficulty_low",
            "difficulty_high",
        ),
        "repaint": ("mask", "jump", "resample"),
    }.get(options.plan, ())
    plan = {name: getattr(options, name) for name in plan_options}
    if options.plan in ("inpaint", "repaint") and plan["mask"] is None:
        plan["mask"] = "half"
    if options.plan == "adaptive":
        plan["min_steps"] = min_steps(options)
    calls = [c.network_calls for c in costs]
    info = {
        "source": {
            "workdir" if options.workdir is not None else "export": loaded.directory,
            "checkpoint_step": loaded.step,
            "params": "ema_params",
            "model": loaded.description["model"],
            "schedule": loaded.config.diffusion.schedule,
            "shift": loaded.config.diffusion.shift,
            "prediction": loaded.prediction,
        },
        "plan": options.plan,
        "plan_options": plan,
        "steps": max(calls),  # network calls per chunk: the plan's steps (RePaint: steps down)
        "requested_steps": options.steps,
        "eta": eta,
        "cfg_scale": options.cfg_scale,
        "input_guidance": options.input_guidance,
        "labels": options.labels,
        "num": options.num,
        "batch": min(options.batch, options.num),
        "seed": options.seed,
        "split": options.split if "inputs" in arrays else None,
        "network_calls": {
            "per_chunk": calls,
            "total": sum(calls),
            "evaluations_total": sum(c.evaluations for c in costs),
            "samples_per_call": costs[0].batch_per_call,
        },
        "seconds": seconds,
    }
    if options.plan == "adaptive":
        info["adaptive"] = _adaptive_info(options, costs, arrays, difficulty)
    return info


def _adaptive_info(
    options: Options,
    costs: list[sampling.Cost],
    arrays: dict[str, np.ndarray],
    difficulty: tuple[float, float],
) -> dict[str, Any]:
    """The adaptive run's cost per image and in all, next to the synchronous plan's.

    A forward pass is one image through the network once (one guidance branch): the pool makes
    pool steps x batch x branches of them, idle slots at the end included; the synchronous plan
    with --steps steps makes chunks x steps x batch x branches (its last chunk padded).
    """
    (pool,) = costs
    calls = arrays["network_calls"]
    steps = arrays["steps_per_pixel"]
    generated = steps[steps > 0]
    batch = min(options.batch, options.num)
    sync = sampling.sample_cost(
        plans.synchronous(options.steps, batch, (1,)),
        cfg_scale=options.cfg_scale,
        input_guidance=options.input_guidance,
    )
    chunks = math.ceil(options.num / batch)
    return {
        "difficulty_range": list(difficulty),
        "mean_calls_per_image": float(calls.mean()),
        "min_calls_per_image": int(calls.min()),
        "max_calls_per_image": int(calls.max()),
        "pool_steps": pool.network_calls,
        "forward_passes": pool.network_calls * pool.batch_per_call,
        "image_forward_passes": int(calls.sum()) * (pool.batch_per_call // batch),
        "mean_steps_per_pixel": float(generated.mean()) if generated.size else 0.0,
        "synchronous_calls_per_image": options.steps,
        "synchronous_forward_passes": chunks * sync.network_calls * sync.batch_per_call,
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses this binary's flags; see `runs.parse_binary_flags`."""
    return runs.parse_binary_flags(_FLAGS, argv, "apd.sample", __doc__)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    options = runs.options_from_flags(_FLAGS, Options)
    info = run(options)
    calls = info["network_calls"]
    line = (
        f"{info['num']} samples ({info['plan']}, checkpoint step "
        f"{info['source']['checkpoint_step']}) in {options.out}: {calls['total']} network "
        f"calls ({info['steps']} per chunk of {info['batch']})"
    )
    if "adaptive" in info:
        a = info["adaptive"]
        line = (
            f"{info['num']} samples (adaptive, checkpoint step "
            f"{info['source']['checkpoint_step']}) in {options.out}: "
            f"{a['mean_calls_per_image']:.1f} network calls per image on average (min "
            f"{a['min_calls_per_image']}, max {a['max_calls_per_image']}; the synchronous plan: "
            f"{a['synchronous_calls_per_image']}); {a['forward_passes']} forward passes in all "
            f"({a['pool_steps']} pool steps x {calls['samples_per_call']}; the synchronous plan: "
            f"{a['synchronous_forward_passes']}); mean {a['mean_steps_per_pixel']:.1f} steps per "
            "generated pixel"
        )
    print(line)


if __name__ == "__main__":
    cli.run(main, "apd.sample", flags_parser=parse_flags)
