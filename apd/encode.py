"""Encodes an image dataset into latents with a trained autoencoder: the data of a latent
diffusion run (method.md §6; the data source `latents`).

    python -m apd.encode --autoencoder=AE_WORKDIR --out=DIR [--config=experiments/NAME.py[:ARGS]]
        [--config.data.KEY=VALUE ...] [--splits=train,test] [--batch=64] [--shard_size=1024]
        [--step=N] [--verbose]

The dataset is the config's `data` block (name, path, data_dir, image_size, random_flip);
without --config, the autoencoder run's own (its config.json). Every image of each split (default:
all of the dataset's; 'train' is needed, its latents give the normalisation statistics) is
encoded with the autoencoder's EMA parameters (latest checkpoint, or --step) into ArrayRecord
shards of --shard_size images in DIR, with the train split's left-right flips where
config.data.random_flip is true; DIR/latents.json, written once every shard is done, describes
the dataset (`apd.data.latents`). A killed encode restarts where it stopped when run again with
the same flags: finished shards are kept, the others written again. With several JAX processes
(--coordinator_address, --num_processes, --process_id, or a cluster JAX detects) process i
writes shards i, i + n, ...; process 0 writes latents.json. The throughput (images/s: reading,
encoding and writing, compilation excluded) is printed at the end. A diffusion config then
reads DIR with `config.data.name = 'latents'`, `config.data.path = DIR`.

A user error (no autoencoder checkpoint, a diffusion workdir as --autoencoder, a DIR holding
another encode) ends with one line `apd.encode: error: ...` and exit code 1.
"""

import dataclasses
import shlex
from collections.abc import Sequence

import jax
from absl import app, flags, logging

from apd import cli, distributed, latents, runs

_FLAGS = flags.FlagValues()
_OVERRIDES: list[tuple[str, str]] = []  # --config.KEY=VALUE, in order
_ARGV: list[str] = []  # the command line, as parsed


@dataclasses.dataclass(frozen=True)
class Options:
    """What `run` encodes; the fields mirror the command-line flags (module docstring)."""

    autoencoder: str
    out: str
    config: str | None = None
    splits: str | None = None  # comma-separated; None: all of the dataset's
    batch: int = 64
    shard_size: int = 1024
    step: int | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _define_flags() -> None:
    d = Options(autoencoder="", out="")
    f = _FLAGS
    flags.DEFINE_string("autoencoder", None, "Autoencoder training workdir.", flag_values=f)
    flags.DEFINE_string("out", None, "Directory of the latent dataset.", flag_values=f)
    flags.DEFINE_string(
        "config",
        None,
        "Config whose `data` block names the dataset (default: the autoencoder's config.json).",
        flag_values=f,
    )
    flags.DEFINE_string("splits", None, "Splits, e.g. train,test (default: all).", flag_values=f)
    flags.DEFINE_integer("batch", d.batch, "Images per encoder call.", flag_values=f)
    flags.DEFINE_integer("shard_size", d.shard_size, "Images per shard.", flag_values=f)
    flags.DEFINE_integer(
        "step", None, "Autoencoder checkpoint step (default: latest).", flag_values=f
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (multi-process).", flag_values=f
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=f)
    flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=f)
    flags.mark_flags_as_required(["autoencoder", "out"], flag_values=f)


_define_flags()


def run(
    options: Options, overrides: Sequence[tuple[str, str]] = (), command: str | None = None
) -> latents.EncodeResult:
    """Encodes as `options` say (module docstring); returns this process's `EncodeResult`.

    Args:
      options: the flags.
      overrides: `--config.KEY=VALUE` pairs applied to --config.
      command: the command line, recorded in DIR/plan.json for the message of an unfinished
        encode.
    """
    if overrides and not options.config:
        raise ValueError("--config.KEY=VALUE overrides need --config.")
    splits = None
    if options.splits:
        splits = [s.strip() for s in options.splits.split(",") if s.strip()]
    distributed.initialize(options.coordinator_address, options.num_processes, options.process_id)
    codec = latents.Codec.from_workdir(options.autoencoder, options.step)
    if options.config:
        from apd.evaluate import load_config

        data = load_config(options.config, overrides).data
    else:
        data = codec.config.data
    barrier = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = multihost_utils.sync_global_devices
    return latents.encode_dataset(
        codec,
        data,
        options.out,
        splits=splits,
        batch=options.batch,
        shard_size=options.shard_size,
        command=command,
        barrier=barrier,
    )


def parse_flags(argv: Sequence[str]) -> list[str]:
    """Parses this binary's flags (then absl's); `--config.KEY=VALUE` overrides are set aside."""
    _ARGV[:] = argv
    rest, overrides = cli.take_config_overrides(argv, "apd.encode")
    _OVERRIDES[:] = overrides
    return runs.parse_binary_flags(_FLAGS, rest, "apd.encode", __doc__)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(runs.quiet_orbax)
    options = runs.options_from_flags(_FLAGS, Options)
    command = shlex.join(["python", "-m", "apd.encode", *_ARGV[1:]])
    result = run(options, _OVERRIDES, command)
    flips = f" and {result.flips} flips" if result.flips else ""
    line = (
        f"encoded {result.images} images{flips} in {result.seconds:.1f} s: "
        f"{result.images_per_second:.1f} images/s, compilation excluded ({result.shards_written} "
        f"shards written, {result.shards_kept} kept from an earlier run)"
    )
    if result.manifest is not None:
        line += f"; latents {result.manifest['latent_shape']} in {options.out}/latents.json"
    elif jax.process_index() == 0:
        raise ValueError(
            f"the encode in {options.out} is not complete: some shards are missing; rerun with "
            "the same flags."
        )
    print(line)


if __name__ == "__main__":
    cli.run(main, "apd.encode", flags_parser=parse_flags)
