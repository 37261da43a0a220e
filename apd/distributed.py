"""Multi-controller start-up with JAX's own runtime (`jax.distributed`).

Three ways a run becomes multi-process:
  * flags: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (local launcher);
  * a cluster JAX detects itself (SLURM with several tasks, Cloud TPU pod slices, Open MPI):
    `jax.distributed.initialize()` with no arguments;
  * neither: a single process, nothing to initialise.
"""

import os

import jax
from absl import logging


def cluster_detected() -> bool:
    """True inside a multi-task SLURM job, a multi-host TPU slice or an Open MPI job."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the processes of a run; a no-op for a single-process run.

    Args:
      coordinator_address: 'host:port' of process 0, for explicit (local) multi-process runs.
      num_processes: total number of processes (with coordinator_address).
      process_id: this process's index in [0, num_processes) (with coordinator_address).
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id go together; got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} must be in [0, {num_processes}).")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif cluster_detected():
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "Process %d of %d; %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
