"""Test settings: 8 fake CPU devices and strict rank promotion, however pytest is invoked; the
fixtures that several test modules share."""

import os
import tempfile

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A persistent XLA compilation cache shared by the test processes and the binaries they start:
# many tests compile the same smoke models (a resume recompiles its run's step), and a hit skips
# XLA's compilation. Entries are keyed on the HLO, jax/XLA versions and flags, so a hit is always
# the program that compiling would give; set JAX_COMPILATION_CACHE_DIR='' to turn it off.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"apd-tests-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax

jax.config.update("jax_numpy_rank_promotion", os.environ["JAX_NUMPY_RANK_PROMOTION"])


@pytest.fixture(scope="module")
def clipart_tree(tmp_path_factory):
    """The small clip-art tree of tests/test_clipart.py, one per test module, with APD_CACHE
    pointing at a fresh cache for that module."""
    from test_clipart import write_tree

    root = write_tree(tmp_path_factory.mktemp("clipart"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APD_CACHE", str(tmp_path_factory.mktemp("apd-cache")))
        yield root
