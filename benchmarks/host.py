"""The start shared by the benchmark scripts that time XLA host (CPU) devices, imported before
jax: the `--devices` and `--out` flags, and `use_host_devices`, which sets `XLA_FLAGS` for that
many devices (and single-threaded Eigen per device, so that devices do not fight for the cores)
and puts the repository on `sys.path` so that `apd` and `experiments` import."""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parser(doc: str, out: str, devices: int = 2) -> argparse.ArgumentParser:
    """An argument parser with `--devices` and `--out` (default benchmarks/`out`)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--devices", type=int, default=devices, help="host devices (XLA CPU devices)")
    p.add_argument("--out", default=os.path.join(HERE, out), help="the results JSON")
    return p


def use_host_devices(devices: int) -> None:
    """Before jax is imported: `devices` XLA host devices, and the repository importable."""
    if devices < 1:
        raise ValueError(f"--devices must be >= 1; got {devices}.")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={devices}"
        + (" --xla_cpu_multi_thread_eigen=false" if devices > 1 else "")
    ).strip()
    sys.path.insert(0, os.path.dirname(HERE))
