"""The evaluators of `python -m apd.evaluate`: generation FID, the inpainting protocol, bits/dim.

Each evaluator is split into *units*, one per (setting, seed): `units(evaluate_config)` lists
them, `Evaluator.run(unit)` computes one and returns its JSON record (metrics plus everything
that produced them). The binary stores each record as soon as it is done, so an interrupted
evaluation resumes at the first missing unit.

Units:
  generation.seedS                    N samples along the synchronous plan; FID against the
                                      reference statistics of the split.
  inpainting.FAMILY.METHOD.seedS      the first N images of the split with masks of FAMILY
                                      drawn from seed S; METHOD is `apd` (the model's own
                                      inpainting plan), `apd_ig<g>` (with input guidance g) or
                                      `repaint` (the RePaint baseline on the same model, masks,
                                      labels and noise seed). FID of the completed images, PSNR
                                      and SSIM against the originals, LPIPS when its weights are
                                      given, and the largest error on known pixels (0: exact).
  likelihood.PATH.seedS               bits/dim of the first N images of the split along the
                                      synchronous, random-ray or raster path (`apd.elbo`), with
                                      the null label (an unconditional likelihood), from the
                                      clean end `likelihood.t_start` (where the 256-bin
                                      decoder takes over) to the noisy end.

Sampling and the ELBO run through `apd.run_sampler.Sampler` (chunks of `evaluate.batch`, rounded
up to a multiple of the local device count, split over the local devices; the parameters
replicated): the evaluation samples exactly as a notebook calling the same methods does.
"""

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from absl import logging

from apd import checks, elbo, paths, run_sampler, runs
from apd import data as data_lib
from apd.evaluation import frechet, image_metrics, integrity, masks, reference
from apd.sampling import images

Array = jax.Array

EVALUATORS = ("generation", "inpainting", "likelihood")
PATHS = ("synchronous", "random_ray", "raster")
LABEL_MODES = ("random", "data", "null")


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """One evaluation of one setting with one seed."""

    evaluator: str  # 'generation' | 'inpainting' | 'likelihood'
    seed: int
    family: str | None = None  # inpainting
    method: str | None = None  # inpainting: 'apd', 'apd_ig<g>' or 'repaint'
    input_guidance: float = 0.0  # inpainting with method apd_ig<g>
    path: str | None = None  # likelihood

    @property
    def name(self) -> str:
        """The unit's id (its result file is NAME.json)."""
        parts = [self.evaluator, self.family, self.method, self.path, f"seed{self.seed}"]
        return ".".join(p for p in parts if p is not None)

    @property
    def metric_prefix(self) -> str:
        """The metrics' name prefix, without the seed: e.g. 'inpainting/wide/apd'."""
        parts = [self.evaluator, self.family, self.method, self.path]
        return "/".join(p for p in parts if p is not None)


def method_name(input_guidance: float) -> str:
    return "apd" if input_guidance == 0 else f"apd_ig{input_guidance:g}"


def check_config(evaluate: mc.ConfigDict) -> None:
    """Raises ValueError naming the bad value, before anything is loaded or sampled."""
    for name in evaluate.evaluators:
        checks.check_choice("evaluator", name, EVALUATORS)
    seeds = tuple(evaluate.seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"evaluate.seeds must be non-negative ints; got {seeds!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"evaluate.seeds repeats a seed: {seeds!r}.")
    positive = {
        "evaluate.batch": evaluate.batch,
        "evaluate.steps": evaluate.steps,
        "evaluate.num_reference": evaluate.num_reference,
        "evaluate.generation.num_samples": evaluate.generation.num_samples,
        "evaluate.inpainting.num_images": evaluate.inpainting.num_images,
        "evaluate.inpainting.repaint_steps": evaluate.inpainting.repaint_steps,
        "evaluate.inpainting.repaint_jump": evaluate.inpainting.repaint_jump,
        "evaluate.inpainting.repaint_resample": evaluate.inpainting.repaint_resample,
        "evaluate.likelihood.num_images": evaluate.likelihood.num_images,
        "evaluate.likelihood.num_points": evaluate.likelihood.num_points,
        "evaluate.likelihood.raster_grid": evaluate.likelihood.raster_grid,
        "evaluate.report_images": evaluate.report_images,
    }
    for what, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an int >= 1; got {value!r}.")
    if not isinstance(evaluate.adm_samples, int) or evaluate.adm_samples < 0:
        raise ValueError(f"evaluate.adm_samples must be an int >= 0; got {evaluate.adm_samples!r}.")
    if not 0.0 <= float(evaluate.eta) <= 1.0:
        raise ValueError(f"evaluate.eta must lie in [0, 1]; got {evaluate.eta!r}.")
    checks.check_choice("evaluate.generation.labels", evaluate.generation.labels, LABEL_MODES)
    checks.check_choice("evaluate.inpainting.labels", evaluate.inpainting.labels, LABEL_MODES)
    for family in evaluate.inpainting.families:
        checks.check_choice("evaluate.inpainting.families", family, masks.FAMILIES)
    for scale in evaluate.inpainting.input_guidance:
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(
                f"evaluate.inpainting.input_guidance holds scales >= 0; got {scale!r}."
            )
    for path in evaluate.likelihood.paths:
        checks.check_choice("evaluate.likelihood.paths", path, PATHS)
    t_start = evaluate.likelihood.t_start
    if not 0.0 < float(t_start) < 0.5:
        raise ValueError(f"evaluate.likelihood.t_start must lie in (0, 0.5); got {t_start!r}.")


def units(evaluate: mc.ConfigDict) -> list[Unit]:
    """Every unit the config declares, in the order they run."""
    out: list[Unit] = []
    for seed in evaluate.seeds:
        if "generation" in evaluate.evaluators:
            out.append(Unit("generation", seed))
        if "inpainting" in evaluate.evaluators:
            for family in evaluate.inpainting.families:
                for scale in evaluate.inpainting.input_guidance:
                    out.append(
                        Unit(
                            "inpainting",
                            seed,
                            family=family,
                            method=method_name(scale),
                            input_guidance=float(scale),
                        )
                    )
                if evaluate.inpainting.repaint:
                    out.append(Unit("inpainting", seed, family=family, method="repaint"))
        if "likelihood" in evaluate.evaluators:
            for path in evaluate.likelihood.paths:
                out.append(Unit("likelihood", seed, path=path))
    return out


def unit_settings(unit: Unit, evaluate: mc.ConfigDict) -> dict[str, Any]:
    """What a unit's result depends on in the config: a stored result with other settings is
    recomputed rather than reused."""
    # The batch matters: each chunk of `batch` images draws its noise from fold_in(seed, chunk).
    common = {"split": evaluate.split, "seed": unit.seed, "batch": evaluate.batch}
    if unit.evaluator == "generation":
        return common | {
            "num_samples": evaluate.generation.num_samples,
            "labels": evaluate.generation.labels,
            "cfg_scale": float(evaluate.generation.cfg_scale),
            "steps": evaluate.steps,
            "eta": float(evaluate.eta),
        }
    if unit.evaluator == "inpainting":
        cfg = evaluate.inpainting
        out = common | {
            "family": unit.family,
            "method": unit.method,
            "num_images": cfg.num_images,
            "labels": cfg.labels,
        }
        if unit.method == "repaint":
            return out | {
                "steps": cfg.repaint_steps,
                "jump": cfg.repaint_jump,
                "resample": cfg.repaint_resample,
                "eta": 1.0,
            }
        return out | {
            "steps": evaluate.steps,
            "eta": float(evaluate.eta),
            "input_guidance": unit.input_guidance,
        }
    cfg = evaluate.likelihood
    out = common | {
        "path": unit.path,
        "num_images": cfg.num_images,
        "num_points": cfg.num_points,
        "t_start": float(cfg.t_start),
    }
    return out | ({"raster_grid": cfg.raster_grid} if unit.path == "raster" else {})


# ---------------------------------------------------------------------------------------------
# Feature networks for FID
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature network for FID with the reference statistics of the evaluation split."""

    name: str  # 'fmnist_featurenet' or 'inception_v3'
    sha256: str  # of the network's weights
    embed: Callable[[np.ndarray], np.ndarray]  # images float [-1, 1] [N, H, W, C] -> [N, D]
    dim: int
    reference: reference.Stats
    reference_record: dict[str, Any]  # dataset, split, count, the statistics' SHA-256

    def fid(self, images_float: np.ndarray, batch: int) -> float:
        chunks = (images_float[s : s + batch] for s in range(0, images_float.shape[0], batch))
        stats = reference.accumulate(self.embed, chunks, self.dim)
        return frechet.fid_from_stats(
            stats.mean, stats.covariance, self.reference.mean, self.reference.covariance
        )


def _reference_record(cache_dir: str, dataset: str, split: str, sha256: str) -> dict[str, Any]:
    _, record_path = reference.cache_paths(cache_dir, dataset, split, sha256)
    record = integrity.read_json(record_path)
    return {
        "dataset": dataset,
        "split": split,
        "count": record.get("count"),
        "stats_sha256": record.get("stats_sha256"),
        "cache": record_path,
    }


def fmnist_features(feature_dir: str, split: str, data_path: str) -> Features:
    """apd's Fashion-MNIST feature network in `feature_dir` (trained there on first use)."""
    from apd import features as features_binary  # the binary's train_or_load
    from apd.evaluation import features as featurenet

    if not featurenet.exists(feature_dir):
        logging.info(
            "No feature network in %s: training one on the Fashion-MNIST training split "
            "(about three minutes on two CPU cores; reused afterwards).",
            feature_dir,
        )
        features_binary.train_or_load(feature_dir, "fashion_mnist", data_path, 3000, 128, 1e-3, 0)
    params, record = featurenet.load(feature_dir)
    stats = featurenet.reference_statistics(feature_dir, split, data_path)
    return Features(
        name="fmnist_featurenet",
        sha256=record["params_sha256"],
        embed=lambda batch: featurenet.features(params, jnp.asarray(batch)),
        dim=featurenet.FEATURE_DIM,
        reference=stats,
        reference_record=_reference_record(
            os.path.join(feature_dir, featurenet.REFERENCE_DIR),
            "fashion_mnist",
            split,
            record["params_sha256"],
        ),
    )


def require_inception_weights(weights: str | None, dataset: str) -> None:
    """Raises FileNotFoundError saying what to supply when there is no weights file."""
    if not weights:
        raise FileNotFoundError(
            f"FID on {dataset} uses InceptionV3 features and needs its weights: pass "
            "--inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
            "the .npz `python -m apd.evaluation.inception convert` writes). Nothing is "
            "downloaded. Or leave generation and inpainting out of evaluate.evaluators."
        )


def inception_features(
    weights: str | None,
    cache_dir: str,
    data_cfg: mc.ConfigDict,
    split: str,
    num_reference: int,
    variables: Any = None,
) -> Features:
    """InceptionV3 (pool3) from a local weights file, with cached reference statistics.

    `variables`: the network's variables when the caller has already loaded them from `weights`
    (`inception.load_variables`); None loads them here."""
    from apd.evaluation import inception

    require_inception_weights(weights, data_cfg.name)
    if variables is None:
        variables = inception.load_variables(weights)
    sha256 = integrity.sha256_file(weights)
    fn = inception.feature_fn()
    embed = lambda batch: fn(variables, jnp.asarray(batch))  # noqa: E731
    ref_dir = os.path.join(cache_dir, "reference")

    def compute() -> reference.Stats:
        source = data_lib.get_source(
            data_cfg.name, split, data_dir=data_cfg.data_dir, path=data_cfg.path
        )
        count = min(num_reference, len(source))
        dataset = data_lib.make_eval_dataset(
            source,
            global_batch_size=min(100, count),
            num_examples=count,
            image_size=data_cfg.image_size,
            process_index=0,
            process_count=1,
        )

        def batches():
            for batch in dataset:
                yield batch["image"][batch["mask"]] if "mask" in batch else batch["image"]

        return reference.accumulate(embed, batches(), 2048)

    name = f"{data_cfg.name}_{data_cfg.image_size or 'native'}".replace("/", "_")
    stats = reference.load_or_compute(ref_dir, name, split, sha256, compute)
    return Features(
        name="inception_v3",
        sha256=sha256,
        embed=embed,
        dim=2048,
        reference=stats,
        reference_record=_reference_record(ref_dir, name, split, sha256),
    )


# ---------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------


class Evaluator:
    """Runs units on one loaded checkpoint."""

    def __init__(
        self,
        run: runs.Run,
        evaluate: mc.ConfigDict,
        features: Features | None,
        lpips_params: Any = None,
        lpips_sha256: str | None = None,
    ):
        self.run = run
        self.cfg = evaluate
        self.features = features
        self.lpips_params = lpips_params
        self.lpips_sha256 = lpips_sha256
        devices = jax.local_device_count()
        self.batch = math.ceil(evaluate.batch / devices) * devices
        self.sampler = run_sampler.Sampler(run, batch=self.batch)
        self._nelbo_fns: dict[str, Callable] = {}
        self._inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- inputs --------------------------------------------------------------------------------

    def inputs(self, num: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `num` images of the split (float32 [-1, 1]) and their labels."""
        if num not in self._inputs:
            self._inputs[num] = runs.first_images(self.run, self.cfg.split, num)
        return self._inputs[num]

    def labels(self, mode: str, num: int, seed: int, data_labels=None) -> np.ndarray | None:
        """Labels of a unit (`run_sampler.resolve_labels`; None for an unconditional model)."""
        return run_sampler.resolve_labels(mode, self.run.num_classes, num, seed, data_labels)

    # -- sampling ------------------------------------------------------------------------------

    def generate(self, num: int, labels: np.ndarray | None, seed: int) -> np.ndarray:
        """float32 [num, H, W, C]: the synchronous plan (classifier-free guidance if set)."""
        return self.sampler.generate(
            num,
            steps=self.cfg.steps,
            labels=labels,
            seed=seed,
            eta=float(self.cfg.eta),
            cfg_scale=float(self.cfg.generation.cfg_scale),
        ).images

    def inpaint(
        self,
        x: np.ndarray,
        known: np.ndarray,
        labels: np.ndarray | None,
        seed: int,
        input_guidance: float = 0.0,
        repaint: bool = False,
    ) -> np.ndarray:
        """float32 like x: the unknown pixels (known == 0) completed."""
        if repaint:
            cfg = self.cfg.inpainting
            return self.sampler.repaint(
                x,
                known,
                steps=cfg.repaint_steps,
                jump=cfg.repaint_jump,
                resample=cfg.repaint_resample,
                labels=labels,
                seed=seed,
                eta=1.0,
            ).images
        return self.sampler.inpaint(
            x,
            known,
            steps=self.cfg.steps,
            labels=labels,
            seed=seed,
            eta=float(self.cfg.eta),
            input_guidance=float(input_guidance),
        ).images

    # -- likelihood ----------------------------------------------------------------------------

    def _nelbo_fn(self, path_name: str) -> Callable:
        if path_name not in self._nelbo_fns:
            run, lik = self.run, self.cfg.likelihood
            shape = (self.batch, *run.image_shape[:-1])

            def nelbo(params, x, key, labels):
                def model_fn(z, levels):
                    return run.model.apply({"params": params}, z, levels, labels)

                denoise = elbo.x_pred_wrapper(model_fn, run.schedule, run.prediction)
                k_path, k_elbo = jax.random.split(key)
                t_start = float(lik.t_start)
                if path_name == "synchronous":
                    path = paths.synchronous(shape, t_start=t_start, schedule=run.schedule)
                elif path_name == "random_ray":
                    path = paths.random_ray(k_path, shape, t_start=t_start)
                else:
                    path = paths.raster(
                        shape, lik.raster_grid, t_start=t_start, schedule=run.schedule
                    )
                return elbo.negative_elbo(
                    denoise, x, path, k_elbo, num_points=lik.num_points, schedule=run.schedule
                )

            self._nelbo_fns[path_name] = jax.jit(nelbo)
        return self._nelbo_fns[path_name]

    # -- units ---------------------------------------------------------------------------------

    def run_unit(self, unit: Unit, out_dir: str) -> dict[str, Any]:
        """Computes one unit; writes its arrays (masks, first images) under out_dir."""
        t0 = time.perf_counter()
        if unit.evaluator == "generation":
            metrics, extra = self._generation(unit, out_dir)
        elif unit.evaluator == "inpainting":
            metrics, extra = self._inpainting(unit, out_dir)
        else:
            metrics, extra = self._likelihood(unit)
        return {
            "unit": unit.name,
            "metrics": metrics,
            "settings": unit_settings(unit, self.cfg),
            "seconds": time.perf_counter() - t0,
            **extra,
        }

    def _fid(self, samples: np.ndarray) -> float | None:
        return None if self.features is None else self.features.fid(samples, self.batch)

    def _generation(self, unit: Unit, out_dir: str):
        cfg = self.cfg.generation
        labels = self.labels(cfg.labels, cfg.num_samples, unit.seed)
        samples = self.generate(cfg.num_samples, labels, unit.seed)
        metrics = {"fid": self._fid(samples)}
        n = self.cfg.report_images**2
        grid = images.grid(samples[:n], self.cfg.report_images)
        images.write_png(os.path.join(out_dir, f"{unit.name}.png"), grid)
        extra = {"images": f"{unit.name}.png", "sampler": "ddim", "plan": "synchronous"}
        if self.cfg.adm_samples and unit.seed == self.cfg.seeds[0]:
            from apd.evaluation import adm

            count = min(self.cfg.adm_samples, samples.shape[0])
            if count < self.cfg.adm_samples:
                labels_more = self.labels(cfg.labels, self.cfg.adm_samples, unit.seed + 1_000_003)
                more = self.generate(self.cfg.adm_samples - count, labels_more, unit.seed + 1)
                samples = np.concatenate([samples, more])
            path = os.path.join(out_dir, f"adm_samples_{self.cfg.adm_samples}.npz")
            adm.export_npz(path, images.to_uint8(samples[: self.cfg.adm_samples]))
            extra["adm_npz"] = os.path.basename(path)
        return metrics, extra

    def _inpainting(self, unit: Unit, out_dir: str):
        cfg = self.cfg.inpainting
        x, data_labels = self.inputs(cfg.num_images)
        grid = self.run.image_shape[:-1]
        # Mask i depends only on (family, seed, i): the saved file is what this unit used,
        # rewritten when another image count (a recomputed unit) changed it.
        mask_file = os.path.join(out_dir, f"masks.{unit.family}.seed{unit.seed}.npz")
        known = masks.make_masks(unit.family, unit.seed, cfg.num_images, grid)
        saved = masks.load_masks(mask_file)[0] if os.path.exists(mask_file) else None
        if saved is None or saved.shape != known.shape or not np.array_equal(saved, known):
            masks.save_masks(mask_file, known, unit.family, unit.seed)
        labels = self.labels(cfg.labels, cfg.num_images, unit.seed, data_labels)
        y = self.inpaint(
            x,
            known,
            labels,
            unit.seed,
            input_guidance=unit.input_guidance,
            repaint=unit.method == "repaint",
        )
        is_known = known.astype(bool)[..., None] & np.ones_like(x, bool)
        known_error = float(np.max(np.abs(y - x)[is_known])) if is_known.any() else 0.0
        metrics = {
            "fid": self._fid(y),
            "psnr": float(np.mean(np.asarray(image_metrics.psnr(y, x)))),
            "ssim": float(np.mean(np.asarray(image_metrics.ssim(y, x)))),
            "lpips": self._lpips(y, x),
            "known_max_abs_error": known_error,
            "unknown_fraction": float(np.mean(masks.unknown_fraction(known))),
        }
        n = self.cfg.report_images
        panel = images.side_by_side(
            images.masked_input_image(x[:n], known[:n] == 1), images.to_uint8(y[:n]), x[:n]
        )
        images.write_png(os.path.join(out_dir, f"{unit.name}.png"), images.grid(panel, 1))
        extra = {
            "images": f"{unit.name}.png",
            "masks": os.path.basename(mask_file),
            "sampler": "repaint" if unit.method == "repaint" else "ddim",
            "plan": "repaint" if unit.method == "repaint" else "inpaint",
            "known_exact": known_error == 0.0,
        }
        return metrics, extra

    def _lpips(self, y: np.ndarray, x: np.ndarray) -> float | None:
        if self.lpips_params is None:
            return None
        from apd.evaluation import lpips

        if x.shape[-1] == 1:
            x, y = np.repeat(x, 3, -1), np.repeat(y, 3, -1)
        if min(x.shape[1:3]) < 32:  # AlexNet's strides need >= 32 px: upsample small images
            factor = math.ceil(32 / min(x.shape[1:3]))
            x = np.repeat(np.repeat(x, factor, 1), factor, 2)
            y = np.repeat(np.repeat(y, factor, 1), factor, 2)
        values = [
            np.asarray(lpips.distance(self.lpips_params, y[s : s + 64], x[s : s + 64]))
            for s in range(0, x.shape[0], 64)
        ]
        return float(np.mean(np.concatenate(values)))

    def _likelihood(self, unit: Unit):
        lik = self.cfg.likelihood
        x, _ = self.inputs(lik.num_images)
        labels = self.labels("null", lik.num_images, unit.seed)
        fn = self._nelbo_fn(unit.path)
        nelbo = self.sampler.map_chunks(
            lambda key, xs, lab: fn(self.sampler.params, xs, key, lab),
            lik.num_images,
            unit.seed,
            x,
            labels,
        )
        dims = int(np.prod(self.run.image_shape))
        bpd = nelbo / (dims * math.log(2.0))
        metrics = {
            "bits_per_dim": float(np.mean(bpd)),
            "bits_per_dim_se": float(np.std(bpd, ddof=1) / math.sqrt(len(bpd)))
            if len(bpd) > 1
            else None,
        }
        extra = {"labels": "null (unconditional likelihood)", "path": unit.path}
        return metrics, extra


# ---------------------------------------------------------------------------------------------
# Summaries over seeds
# ---------------------------------------------------------------------------------------------


def summarise(records: list[dict[str, Any]], unit_list: list[Unit]) -> dict[str, dict]:
    """{metric name: {mean, std, min, max, values, seeds}} over the seeds of each setting.

    std is the sample standard deviation over seeds (ddof 1; None for one seed)."""
    by_name = {r["unit"]: r for r in records}
    grouped: dict[str, list[tuple[int, float]]] = {}
    for unit in unit_list:
        record = by_name.get(unit.name)
        if record is None:
            continue
        for metric, value in record["metrics"].items():
            if value is None or metric.endswith("_se"):
                continue
            grouped.setdefault(f"{unit.metric_prefix}/{metric}", []).append(
                (unit.seed, float(value))
            )
    out = {}
    for name, pairs in grouped.items():
        values = np.asarray([v for _, v in pairs], np.float64)
        out[name] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "min": float(values.min()),
            "max": float(values.max()),
            "values": [float(v) for v in values],
            "seeds": [s for s, _ in pairs],
        }
    return out
