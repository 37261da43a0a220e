"""Trains a model.

    python -m apd.train --config=experiments/fashion_mnist.py[:ARGS] --workdir=DIR \
        [--config.KEY=VALUE ...] [--verbose]

Relaunching with the same --workdir resumes from its newest intact checkpoint. Every check of
the config, the data and the workdir runs before anything is written or compiled; the final
config is written to DIR/config.json (atomically) once the run starts.
`--config.levels.name=NAME` switches the level sampler to NAME with its own default parameters,
and `--config.levels.params.P=V` sets one of them, in any order. SIGTERM (preemption) saves the
current step and exits with code 0; Ctrl-C saves it and exits with code 130, so a calling script
stops too (a second Ctrl-C aborts without saving). A user error (a bad config value, missing
data, a workdir of another model, a failed save) ends with one line `apd.train: error: ...` and
exit code 1; --verbose shows its traceback. For a local multi-process run add
--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I (see
launch/local_multiprocess.sh); on SLURM and Cloud TPU pods the processes find each other by
themselves. apd.train trains diffusion models (`config.task` 'diffusion', the default); a config
of another task is refused in one line naming its binary (`PROGRAMS`, e.g.
apd.train_autoencoder, which shares these flags and `main`).
"""

import functools
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from apd import cli, distributed, runs

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Experiment config file, e.g. experiments/fashion_mnist.py:smoke.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (explicit multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_INTERRUPTED = 130  # after Ctrl-C saved the current step (128 + SIGINT, the shell's code)

_LEVEL_OVERRIDES: list[tuple[str, str]] = []  # --config.levels.* (see cli.take_level_overrides)


PROGRAMS = {"diffusion": "apd.train", "autoencoder": "apd.train_autoencoder"}
"""The binary that trains each task (`config.task`); each refuses the others' configs. All share
this module's flags and `main`."""


def parse_flags(argv: Sequence[str], program: str = "apd.train") -> list[str]:
    """absl's flags, with the level-sampler overrides set aside for `cli.apply_level_overrides`."""
    try:
        rest, _LEVEL_OVERRIDES[:] = cli.take_level_overrides(argv)
    except ValueError as err:
        raise SystemExit(f"{program}: error: {cli.one_line(err)}") from None
    sys.argv = list(rest)  # the config flag reads its --config.KEY overrides from sys.argv
    return cli.parse_flags(rest, program)


def main(argv, task: str):
    """Trains the config if its `task` is `task` (the binary's, `PROGRAMS`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    config = _CONFIG.value
    found = config.get("task", "diffusion")
    if found != task:
        if found in PROGRAMS:
            hint = f"train it with python -m {PROGRAMS[found]}"
        else:
            hint = f"expected one of {sorted(PROGRAMS)}"
        raise ValueError(
            f"{PROGRAMS[task]} trains config.task={task!r}, but this config's task is "
            f"{found!r}: {hint}."
        )
    cli.apply_level_overrides(config, _LEVEL_OVERRIDES)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Imported after initialisation: importing TensorFlow-backed writers first is harmless,
    # but jax must not be used before jax.distributed.initialize.
    from apd.training import loop

    result = loop.train_and_evaluate(config, _WORKDIR.value)
    if result["stopped_by"] == "Ctrl-C":
        return EXIT_INTERRUPTED  # saved; a calling script stops too
    logging.info("Finished at step %d: %s", result["step"], result)
    return 0


if __name__ == "__main__":
    cli.run(functools.partial(main, task="diffusion"), "apd.train", flags_parser=parse_flags)
