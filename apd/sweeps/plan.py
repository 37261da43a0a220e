"""A sweep's runs: the points of `get_hyper`, checked against the real config, their commands and
their state on disk.

`load(spec, root)` reads `experiments/NAME.py[:ARGS]`, expands its `get_hyper` and checks every
point before anything runs: each config argument through the file's own `get_config`, each
config path against the locked config (an unknown key names the closest valid one), each value
by applying the overrides as the binaries do (`apd.evaluate.load_config`: the field's type;
`levels.name` and `levels.params.*` through `apd.cli.apply_level_overrides`, which resolves the
sampler's parameters), then the evaluation block (`protocol.check_config`), which apd.evaluate
would otherwise check only after the training.

A run is trained by `python -m apd.train --config=SPEC --workdir=ROOT/NAME --config.KEY=VALUE ...`
and evaluated by `python -m apd.evaluate` with the same config and overrides on its final
checkpoint. It is finished when that checkpoint exists and its `results.json` holds every unit
the evaluation declares, computed with the current settings (`protocol.unit_settings`).

A config file that sets `EVALUATION = "NAME"` declares a second evaluation of runs that another
sweep trains (sampling settings swept without retraining): its results go to
ROOT/RUN/eval_NAME (apd.evaluate's --out) and its state, table and plots to ROOT/sweep.NAME.json,
table.NAME.md/json and plots.NAME/, so it shares --root with the training sweep: a run already
trained there is evaluated, not retrained (its stored model must match the config's, as on any
resume).

With `--archive=DIR` (e.g. a directory under version control, `benchmarks/results/NAME`), each
finished run's results.json is copied to DIR/RUN.json; a run whose copy there is complete for the
current settings counts as finished even when its workdir is gone, so a sweep spread over
machines or sessions never retrains what it has, and its table is rebuilt from the copies.
"""

import dataclasses
import importlib.util
import os
import re
from typing import Any

import ml_collections as mc

from apd import cli, evaluate
from apd.evaluation import integrity, protocol
from apd.sweeps import hyper

PENDING, PARTIAL, TRAINED, FINISHED = "pending", "partial", "trained", "finished"
"""Run states: nothing on disk; checkpoints before the final step; final checkpoint without a
complete evaluation; evaluated."""


@dataclasses.dataclass
class Run:
    """One point of a sweep."""

    index: int
    name: str
    point: dict[str, Any]  # the sweep's overrides, keys as declared (`:sampler`, `seed`, ...)
    config_spec: str  # experiments/NAME.py[:ARGS], the point's config arguments included
    workdir: str
    config: mc.ConfigDict = dataclasses.field(repr=False)  # the config with the overrides
    evaluation: str = ""  # the config file's EVALUATION ('' for the default evaluation)
    archive: str | None = None  # the sweep's --archive directory

    @property
    def archived_path(self) -> str | None:
        """ARCHIVE/NAME.json: a copy of the run's results.json kept apart from its workdir."""
        return None if self.archive is None else os.path.join(self.archive, f"{self.name}.json")

    @property
    def eval_dir(self) -> str:
        """Where apd.evaluate writes this sweep's evaluation of the run."""
        name = f"eval_{self.evaluation}" if self.evaluation else "eval"
        return os.path.join(self.workdir, name)

    @property
    def overrides(self) -> list[tuple[str, str]]:
        """(config path, value as on the command line), in the point's key order."""
        return [(k, hyper.cli_value(v)) for k, v in self.point.items() if not hyper.is_arg(k)]

    @property
    def group(self) -> dict[str, Any]:
        """The point without its training seed: runs that differ only in `seed` share it."""
        return {k: v for k, v in self.point.items() if k != "seed"}

    @property
    def total_steps(self) -> int:
        return int(self.config.total_steps)

    def override_args(self) -> list[str]:
        """`--config.KEY=VALUE` for each config path of the point."""
        return [f"--config.{k}={v}" for k, v in self.overrides]

    def train_args(self) -> list[str]:
        """Arguments of `python -m apd.train`."""
        return [f"--config={self.config_spec}", f"--workdir={self.workdir}", *self.override_args()]

    def evaluate_args(self) -> list[str]:
        """Arguments of `python -m apd.evaluate` (the final checkpoint)."""
        return [
            f"--config={self.config_spec}",
            f"--workdir={self.workdir}",
            f"--checkpoint={self.total_steps}",
            *([f"--out={self.eval_dir}"] if self.evaluation else []),
            *self.override_args(),
        ]

    def trained(self) -> bool:
        return self.total_steps in evaluate.checkpoint_steps(self.workdir)

    @property
    def results_path(self) -> str:
        """The final checkpoint's results.json in the run's workdir."""
        return os.path.join(evaluate.step_dir(self.eval_dir, self.total_steps), evaluate.RESULTS)

    def results(self) -> dict[str, Any] | None:
        """The final checkpoint's results.json when it is complete for the current settings:
        the workdir's, else the archived copy's (`--archive`)."""
        for path in (self.results_path, self.archived_path):
            if path is not None and os.path.exists(path):
                record = self._complete(integrity.read_json(path))
                if record is not None:
                    return record
        return None

    def archived(self) -> bool:
        """Whether the archive holds complete results and the workdir does not."""
        on_disk = os.path.exists(self.results_path) and self._complete(
            integrity.read_json(self.results_path)
        )
        return not on_disk and self.results() is not None

    def _complete(self, record: dict[str, Any]) -> dict[str, Any] | None:
        units = protocol.units(self.config.evaluate)
        if record.get("units_expected") != [u.name for u in units]:
            return None
        stored = {r.get("unit"): r.get("settings") for r in record.get("units", [])}
        for unit in units:
            if stored.get(unit.name) != protocol.unit_settings(unit, self.config.evaluate):
                return None
        return record

    def state(self) -> str:
        """FINISHED when complete results exist (in the workdir or the archive: a run whose
        workdir is gone is not retrained), else TRAINED, PARTIAL or PENDING from the workdir."""
        if self.results() is not None:
            return FINISHED
        if self.trained():
            return TRAINED
        return PARTIAL if evaluate.checkpoint_steps(self.workdir) else PENDING


@dataclasses.dataclass
class Sweep:
    spec: str  # --config as given
    path: str  # the config file
    root: str  # absolute
    runs: list[Run]
    evaluation: str = ""  # the config file's EVALUATION

    def output(self, name: str) -> str:
        """ROOT/NAME of the sweep's own files ('sweep.json', 'table.md', 'plots'), with the
        evaluation's name before the extension: sweep.NAME.json, plots.NAME."""
        if self.evaluation:
            stem, dot, ext = name.partition(".")
            name = f"{stem}.{self.evaluation}{dot}{ext}"
        return os.path.join(self.root, name)

    @property
    def keys(self) -> list[str]:
        """Every swept key, in order of first appearance."""
        out: list[str] = []
        for run in self.runs:
            out += [k for k in run.point if k not in out]
        return out

    def select(self, patterns: list[str] | None) -> list[Run]:
        """The runs named by `--only` (names or shell patterns); all when None."""
        if not patterns:
            return list(self.runs)
        import fnmatch

        names = [r.name for r in self.runs]
        chosen = set()
        for pattern in patterns:
            matched = fnmatch.filter(names, pattern)
            if not matched:
                raise ValueError(
                    f"--only={pattern!r} names no run of this sweep{hyper.closest(pattern, names)};"
                    f" the runs: {names}."
                )
            chosen.update(matched)
        return [r for r in self.runs if r.name in chosen]


def load_module(path: str):
    """The config file as a module (the binaries load it the same way)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location("apd_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str, root: str, archive: str | None = None) -> Sweep:
    """Expands and checks the sweep of `experiments/NAME.py[:ARGS]`; ValueError before any run
    names the bad key or value. `archive`: a directory of results.json copies (`--archive`)."""
    path, _, base_arg = spec.partition(":")
    module = load_module(path)
    for name in ("get_config", "get_hyper"):
        if not callable(getattr(module, name, None)):
            raise ValueError(
                f"{path} declares no {name}(): a sweep config defines get_config(arg) and "
                "get_hyper(hyper) (see apd.sweeps.hyper)."
            )
    evaluation = getattr(module, "EVALUATION", "")
    if not isinstance(evaluation, str) or not re.fullmatch(r"[A-Za-z0-9_]*", evaluation):
        raise ValueError(
            f"{path}: EVALUATION names an evaluation with letters, digits and '_'; got "
            f"{evaluation!r}."
        )
    points = hyper.expand(module.get_hyper, path)
    names = hyper.run_names(points)
    root = os.path.abspath(root)
    runs = []
    for index, (point, name) in enumerate(zip(points, names, strict=True)):
        arg = _merge_args(base_arg, point)
        config_spec = f"{path}:{arg}" if arg else path
        config = _check_point(module, path, arg, point, name)
        workdir = os.path.join(root, name)
        archive_dir = None if archive is None else os.path.abspath(archive)
        runs.append(Run(index, name, point, config_spec, workdir, config, evaluation, archive_dir))
    return Sweep(spec, path, root, runs, evaluation)


def _merge_args(base_arg: str, point: dict[str, Any]) -> str:
    """The config's `:ARGS` with the point's config arguments added."""
    given = {item.partition("=")[0].strip() for item in base_arg.split(",") if item.strip()}
    parts = [base_arg] if base_arg else []
    for key, value in point.items():
        if not hyper.is_arg(key):
            continue
        name = key.removeprefix(hyper.ARG_PREFIX)
        if name in given:
            raise ValueError(
                f"the sweep sets the config argument {name!r} ({key!r}), which --config's :ARGS "
                f"{base_arg!r} also set: drop it from --config."
            )
        parts.append(f"{name}={hyper.arg_value(key, value)}")
    return ",".join(parts)


def _leaves(config: mc.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, mc.ConfigDict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_point(module, path: str, arg: str, point: dict[str, Any], name: str) -> mc.ConfigDict:
    where = f"{path}:{arg}" if arg else path
    try:
        config = module.get_config(arg or None)
    except ValueError as err:
        raise ValueError(f"run {name}: {err}") from None
    leaves = _leaves(config)
    overrides = [(k, hyper.cli_value(v)) for k, v in point.items() if not hyper.is_arg(k)]
    # The level sampler's keys depend on the sampler a point selects: its parameters are
    # checked when the overrides are applied.
    level_keys = {k for k, _ in cli.split_level_overrides(overrides)[0]}
    for key, _ in overrides:
        if key in level_keys:
            continue
        if key not in leaves:
            groups = {p.rsplit(".", 1)[0] for p in leaves if "." in p}
            kind = "a group of keys, not a value" if key in groups else "not a key"
            raise ValueError(
                f"sweep key {key!r} is {kind} of the config {where}{hyper.closest(key, leaves)}."
            )
    try:
        config = evaluate.load_config(where, overrides)
    except ValueError as err:
        raise ValueError(f"run {name}: {err}") from None
    try:
        protocol.check_config(config.evaluate)
    except ValueError as err:
        raise ValueError(f"run {name} ({where} with {dict(overrides)}): {err}") from None
    return config
