"""The binaries' shared command line (`apd.cli`): one-line user errors, level-sampler overrides."""

import os

import pytest

from apd import cli, evaluate, levels
from experiments import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _locked(arg="smoke"):
    config = fashion_mnist.get_config(arg)
    config.lock()
    return config


def test_take_level_overrides_sets_aside_only_levels_flags():
    argv = [
        "prog",
        "--config=x.py",
        "--config.levels.params.scale=4",
        "--config.total_steps=3",
        "--config.levels.name",
        "perlin",
        "--",
        "--config.levels.name=kept",
    ]
    rest, overrides = cli.take_level_overrides(argv)
    assert rest == [
        "prog",
        "--config=x.py",
        "--config.total_steps=3",
        "--",
        "--config.levels.name=kept",
    ]
    assert overrides == [("levels.params.scale", "4"), ("levels.name", "perlin")]
    with pytest.raises(ValueError, match=r"--config.levels.name needs a value"):
        cli.take_level_overrides(["prog", "--config.levels.name"])
    with pytest.raises(ValueError, match=r"--config.levels.sampler: no such config key"):
        cli.take_level_overrides(["prog", "--config.levels.sampler=perlin"])


def test_switching_the_sampler_starts_from_its_defaults():
    grid = (28, 28)
    config = _locked()
    assert config.levels.name == "asyncpatch"
    cli.apply_level_overrides(config, [("levels.name", "perlin")])
    assert config.levels.name == "perlin"
    assert dict(config.levels.params) == levels.resolve_params("perlin", grid)
    assert config.is_locked and config.levels.params.is_locked

    # A parameter of the new sampler applies whatever its place on the command line.
    config = _locked()
    cli.apply_level_overrides(config, [("levels.params.scale", "4"), ("levels.name", "perlin")])
    assert dict(config.levels.params) == levels.resolve_params("perlin", grid, scale=4)

    # A parameter the new sampler lacks is an error naming the valid ones; the config is kept.
    config = _locked()
    with pytest.raises(ValueError, match=r"'delta_max'.*\['octaves', 'scale', 'threshold'\]"):
        cli.apply_level_overrides(
            config, [("levels.name", "perlin"), ("levels.params.delta_max", "0.3")]
        )
    assert config.levels.name == "asyncpatch"


def test_parameter_override_of_the_same_sampler_keeps_the_others():
    config = _locked()
    with config.unlocked():
        config.levels.params.t_min = 0.1
    cli.apply_level_overrides(
        config, [("levels.params.delta_max", "0.25"), ("levels.params.patch_sizes", "(1, 2)")]
    )
    params = config.levels.params
    assert (params.t_min, params.delta_max, params.patch_sizes) == (0.1, 0.25, (1, 2))
    assert params.patch_probs == (0.5, 0.5)
    with pytest.raises(ValueError, match=r"delta_max must be a finite number in \[0.0, 1.0\]"):
        cli.apply_level_overrides(config, [("levels.params.delta_max", "-0.1")])


def test_evaluate_config_loading_switches_the_sampler():
    spec = os.path.join(REPO, "experiments", "fashion_mnist.py") + ":smoke"
    config = evaluate.load_config(
        spec, [("levels.name", "perlin"), ("levels.params.octaves", "2"), ("total_steps", "7")]
    )
    assert config.total_steps == 7
    assert config.levels.name == "perlin"
    assert dict(config.levels.params) == levels.resolve_params("perlin", 28, octaves=2)


def test_call_reports_user_errors_in_one_line(capsys):
    def failing(error):
        def main(argv):
            del argv
            raise error

        return main

    message = "global batch size 12 must be\na positive multiple of 8."
    assert cli.call(failing(ValueError(message)), ["prog"], "apd.x", verbose=False) == 1
    err = capsys.readouterr().err
    assert err == "apd.x: error: global batch size 12 must be a positive multiple of 8.\n"
    error = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert cli.call(failing(error), ["prog"], "apd.x", verbose=False) == 1
    err = capsys.readouterr().err
    assert err == "apd.x: error: [Errno 2] No such file or directory: '/x/y'\n"

    assert cli.call(failing(FloatingPointError("nan at step 3")), ["p"], "apd.x", False) == 1
    assert capsys.readouterr().err == "apd.x: error: nan at step 3\n"
    assert cli.call(failing(KeyboardInterrupt()), ["p"], "apd.x", verbose=False) == 130
    assert capsys.readouterr().err == "apd.x: interrupted\n"
    assert cli.call(lambda argv: None, ["p"], "apd.x", verbose=False) == 0
    assert cli.call(lambda argv: 130, ["p"], "apd.x", verbose=False) == 130

    # --verbose keeps the traceback; other exceptions (bugs) always do.
    with pytest.raises(ValueError, match="global batch"):
        cli.call(failing(ValueError(message)), ["p"], "apd.x", verbose=True)
    with pytest.raises(KeyError):
        cli.call(failing(KeyError("bug")), ["p"], "apd.x", verbose=False)


def test_check_writable_dir(tmp_path):
    cli.check_writable_dir(str(tmp_path / "new" / "deeper"), "workdir")
    afile = tmp_path / "file"
    afile.write_text("x")
    for path in (afile, afile / "sub"):
        with pytest.raises(ValueError, match=rf"workdir '{path}' cannot be a directory: {afile}"):
            cli.check_writable_dir(str(path), "workdir")
