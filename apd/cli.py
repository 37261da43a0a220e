"""What the apd binaries share on the command line: one-line user errors, and `--config.levels.*`
overrides resolved as one change after parsing.

    if __name__ == "__main__":
        cli.run(main, "apd.NAME")                              # flags in absl's global FLAGS
        cli.run(main, "apd.NAME", flags_parser=parse_flags)    # a binary's own flag parser

A user error ends the program with exactly one line, `apd.NAME: error: MESSAGE`, on stderr and
exit code 1: a bad flag or config value (flag parsing included), a missing or unwritable file,
a checkpoint that does not fit, a diverged run (`USER_ERRORS`). `--verbose` raises it with its
traceback instead. Any other exception is a bug and keeps its traceback. Ctrl-C ends with
`apd.NAME: interrupted` and exit code 130 (the training loop handles it itself: it saves the
current step, and apd.train exits with code 130 too). An int that `main` returns is the exit code.
"""

import ast
import logging as pylogging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

# TensorFlow is imported only by TFDS and the TensorBoard writer (no apd maths runs in it). Its
# oneDNN notice would be printed on stderr by every binary, before any one-line error; it must
# be switched off before anything imports TensorFlow, so the binaries import this module first.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags
from absl import logging as absl_logging

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)
"""Exceptions reported in one line: ValueError (bad values, IncompatibleCheckpointError, ...),
OSError (FileNotFoundError, FileExistsError, NotADirectoryError, a failed checkpoint save, ...)
and FloatingPointError (a training run that diverged)."""

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show a user error with its Python traceback instead of one line."
)

LEVELS_NAME = "levels.name"
LEVELS_PARAMS = "levels.params."


def one_line(err: BaseException) -> str:
    """An exception's message on one line (every run of whitespace, newlines included, becomes
    one space); the exception's type when it has no message."""
    return " ".join(str(err).split()) or type(err).__name__


def call(main: Callable[[list[str]], Any], argv: list[str], program: str, verbose: bool) -> int:
    """Runs `main(argv)`; returns the exit code: main's own if it returns an int, else 0; 1 after
    a user error, 130 after Ctrl-C.

    A user error (`USER_ERRORS`) is printed as `PROGRAM: error: MESSAGE` on one line of stderr;
    with `verbose` it is raised with its traceback instead.
    """
    try:
        code = main(argv)
    except USER_ERRORS as err:
        if verbose:
            raise
        print(f"{program}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"{program}: interrupted", file=sys.stderr, flush=True)
        return 130
    return code if isinstance(code, int) else 0


def parse_flags(argv: Sequence[str], program: str) -> list[str]:
    """Parses absl's global FLAGS; a bad flag ends the program with one line and exit code 1.

    Covers what absl reports as a traceback or over several lines: an unknown `--config.KEY`
    (ml_collections names the closest key), a value of the wrong type, a config file whose
    `get_config` rejects its `:ARGS`, a missing required flag.
    """
    try:
        return flags.FLAGS(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        sys.exit(f"{program}: error: {_flag_error(err)} (see --help)")


def take_config_overrides(
    argv: Sequence[str], program: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits `--config.KEY=VALUE` overrides off a command line, for a binary whose `--config`
    is a file path loaded after parsing (`apd.evaluate.load_config` applies the overrides).

    Returns:
      (the other arguments, [(KEY, raw VALUE)] in command-line order).
    An override without `=VALUE` ends the program with one line and exit code 1, like a bad flag.
    """
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                sys.exit(f"{program}: error: {arg} needs a value (--config.KEY=VALUE).")
            overrides.append((key, value))
        else:
            rest.append(arg)
    return rest, overrides


def _flag_error(err: BaseException) -> str:
    # An unknown config key arrives as AttributeError(KeyError("'key'\nDid you mean ...")).
    cause = err.args[0] if isinstance(err, AttributeError) and err.args else err
    if isinstance(cause, KeyError) and cause.args:
        key, _, hint = str(cause.args[0]).partition("\n")
        return one_line(ValueError(f"no such config key {key}" + (f" ({hint})" if hint else "")))
    # A config file's get_config that raises arrives with its traceback inside the message.
    head, traceback, tail = str(err).partition("Traceback (most recent call last)")
    if traceback:
        last = [line for line in tail.splitlines() if line.strip()][-1]
        return one_line(ValueError(f"{head.rstrip().rstrip(':')}: {last.strip()}"))
    return one_line(err)


def run(
    main: Callable[[list[str]], Any],
    program: str,
    flags_parser: Callable[[list[str]], Any] | None = None,
) -> None:
    """`absl.app.run(main)` with one-line user errors (see the module docstring).

    Args:
      main: the binary's `main(argv)`.
      program: its name in messages, e.g. 'apd.train'.
      flags_parser: the binary's own parser (`argv -> argv for main`); by default absl's global
        FLAGS are parsed by `parse_flags`.
    """
    parser = flags_parser or (lambda argv: parse_flags(argv, program))
    absl_logging.get_absl_handler().addFilter(quiet_backend_probe)
    app.run(lambda argv: call(main, argv, program, _VERBOSE.value), flags_parser=parser)


def quiet_backend_probe(record) -> bool:
    """An absl log filter: drops JAX's INFO notes on the accelerator backends it probes and does
    not find ("Unable to initialize backend 'tpu'"), logged by every binary on a machine without
    one; they would otherwise precede a one-line error."""
    return not (
        record.levelno < pylogging.WARNING
        and record.getMessage().startswith("Unable to initialize backend")
    )


def check_writable_dir(path: str, what: str) -> None:
    """Raises ValueError unless `path` is a directory or can be created as one: its nearest
    existing ancestor must be a writable directory."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"{what} {path!r} cannot be a directory: {existing} is a file; expected a path to a "
            "new or existing directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{what} {path!r} cannot be written: {existing} is not writable; expected a path to a "
            "directory this user may write."
        )


# ---------------------------------------------------------------------------------------------
# Level-sampler overrides
# ---------------------------------------------------------------------------------------------


def take_level_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Splits `--config.levels.name=NAME` and `--config.levels.params.P=V` off a command line.

    absl applies `--config.KEY=VALUE` overrides one by one to the locked config, so switching
    the sampler would keep the old sampler's parameters, and a parameter of the new one would be
    an unknown key. These overrides are set aside instead and applied together by
    `apply_level_overrides` once the config is loaded.

    Returns:
      (the other arguments, [(key, raw value)] with keys 'levels.name' or 'levels.params.P').
    Raises:
      ValueError: a `--config.levels.*` argument without a value or with another key.
    """
    rest, overrides = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest.append(arg)
            rest.extend(args)
            break
        if not arg.startswith("--config.levels."):
            rest.append(arg)
            continue
        key, sep, value = arg[len("--config.") :].partition("=")
        if not sep:
            value = next(args, None)
            if value is None:
                raise ValueError(f"{arg} needs a value ({arg}=VALUE).")
        overrides.append((key, value))
    split, other = split_level_overrides(overrides)
    if other:
        raise ValueError(
            f"--config.{other[0][0]}: no such config key; the level sampler is set with "
            "--config.levels.name=NAME and --config.levels.params.PARAM=VALUE."
        )
    return rest, split


def split_level_overrides(
    overrides: Sequence[tuple[str, str]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(level-sampler overrides, the others) of `[(config key, raw value)]`, order kept."""
    levels, other = [], []
    for key, value in overrides:
        is_param = key.startswith(LEVELS_PARAMS) and "." not in key[len(LEVELS_PARAMS) :]
        (levels if key == LEVELS_NAME or is_param else other).append((key, value))
    return levels, other


def apply_level_overrides(config: Any, overrides: Sequence[tuple[str, str]]) -> None:
    """Applies level-sampler overrides to a (locked) config as one change, in place.

    A new `levels.name` starts from that sampler's defaults on the dataset's token grid (the old
    sampler's parameters are dropped); with the same name, the parameters that differ from the
    sampler's defaults are kept and the others derived again (so `patch_probs` follows a new
    `patch_sizes`). `levels.params.P` overrides apply on top, whatever their order on the
    command line. The result is resolved by `apd.levels.resolve_params` (defaults filled in,
    values checked), as the config files write it.

    Args:
      config: the training config (reads `levels` and `data`).
      overrides: `[(key, raw value)]` from `take_level_overrides` or `split_level_overrides`;
        values are read as Python literals where they parse as one, else kept as strings.
    Raises:
      ValueError: an unknown sampler, a parameter the sampler does not have (naming the valid
        ones) or a bad value.
    """
    if not overrides:
        return
    import ml_collections as mc

    from apd import data as data_lib
    from apd import levels

    name = config.levels.name
    params: dict[str, Any] = {}
    for key, raw in overrides:
        if key == LEVELS_NAME:
            name = raw
        else:
            params[key[len(LEVELS_PARAMS) :]] = _literal(raw)
    data = config.data
    grid = data_lib.dataset_info(data.name, data.image_size, path=data.path)[0][:-1]
    kept = {}
    if name == config.levels.name:
        defaults = levels.resolve_params(name, grid)
        for key, value in config.levels.params.items():
            value = tuple(value) if isinstance(value, list) else value
            if value != defaults.get(key):
                kept[key] = value
    resolved = levels.resolve_params(name, grid, **(kept | params))
    with config.unlocked():
        config.levels.name = name
        config.levels.params = mc.ConfigDict(resolved)


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
