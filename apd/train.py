"""Trains a model.

    python -m apd.train --config=experiments/fashion_mnist.py[:ARGS] --workdir=DIR \
        [--config.KEY=VALUE ...]

Relaunching with the same --workdir resumes from its latest checkpoint. The final config is
written to DIR/config.json. For a local multi-process run add --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I (see launch/local_multiprocess.sh); on SLURM and Cloud TPU pods
the processes find each other by themselves.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from apd import distributed, runs

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # Imported after initialisation: importing TensorFlow-backed writers first is harmless,
    # but jax must not be used before jax.distributed.initialize.
    from apd.training import loop

    result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("Finished at step %d: %s", result["step"], result)


if __name__ == "__main__":
    app.run(main)
