"""Training reliability: metrics reach the disk, no non-finite state is saved, a damaged newest
checkpoint is passed over, rejected launches change nothing and fail before any heavy work,
Ctrl-C saves, a failed save says so, and every user error is one line."""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import helpers
import jax
import pytest
from test_train import REPO, restore_state, smoke_config

from apd import cli, export
from apd.training import checkpoint as checkpoint_lib
from apd.training import loop
from apd.training import metrics as metrics_lib
from apd.training import state as state_lib


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.fixture(scope="module")
def trained(data_path, tmp_path_factory):
    """A smoke run of 2 steps: checkpoints at steps 1 (the first save) and 2."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(smoke_config(data_path, total_steps=2), workdir)
    assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1, 2]
    return workdir


def _ckpt_dir(workdir):
    return os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)


def _copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def _corrupt(workdir, step, kind):
    path = os.path.join(_ckpt_dir(workdir), str(step))
    if kind == "truncated_arrays":
        files = glob.glob(os.path.join(path, "state", "ocdbt.process_0", "d", "*"))
        assert files
        for name in files:
            os.truncate(name, os.path.getsize(name) // 2)
    elif kind == "no_metadata":
        os.remove(os.path.join(path, "state", "_METADATA"))
    elif kind == "no_manifest":
        os.remove(os.path.join(path, "state", "manifest.ocdbt"))
    elif kind == "empty_data_state":
        (data_file,) = glob.glob(os.path.join(path, "data", "*.json"))
        open(data_file, "w").close()
    elif kind == "empty_step_dir":
        shutil.rmtree(path)
        os.mkdir(path)
    else:
        raise AssertionError(kind)


CORRUPTIONS = [
    "truncated_arrays",
    "no_metadata",
    "no_manifest",
    "empty_data_state",
    "empty_step_dir",
]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_newest_checkpoint_is_passed_over(trained, data_path, tmp_path, caplog, kind):
    workdir = _copy(trained, tmp_path)
    _corrupt(workdir, 2, kind)

    # Sampling, evaluation and export read the newest step whose parameters restore.
    step, params, _ = checkpoint_lib.restore_params(workdir)
    assert step == (2 if kind == "empty_data_state" else 1)
    assert state_lib.is_finite(params)
    if kind != "empty_data_state":
        with pytest.raises(checkpoint_lib.UnreadableCheckpointError) as err:
            checkpoint_lib.restore_params(workdir, step=2)
        assert re.match(r"the checkpoint at step 2 in \S+ cannot be read \(.+\)", str(err.value))
        assert "\n" not in str(err.value)

    # Resuming: step 1 is restored, step 2 moved aside (logged with the reason), and the run's
    # own next save of step 2 meets no stale directory.
    caplog.set_level(logging.WARNING)
    prepared = loop.prepare(smoke_config(data_path, total_steps=4), workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, every_steps=2, keep_last=3, keep_every=0)
    try:
        step, state = checkpointer.restore_latest(
            prepared.run.abstract_state, prepared.train_iter, prepared.run.description
        )
        assert step == 1
        assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1]
        aside = os.path.join(workdir, checkpoint_lib.UNREADABLE_DIR)
        assert os.listdir(aside) == ["2"]
        assert any(
            "step 2" in r.getMessage() and "Cannot resume" in r.getMessage() for r in caplog.records
        )
        checkpointer.save(2, state, prepared.train_iter, prepared.run.description, force=True)
    finally:
        checkpointer.close()
    assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1, 2]
    assert checkpoint_lib.restore_params(workdir, step=2)[0] == 2


def test_no_readable_checkpoint_is_one_clear_error(trained, data_path, tmp_path):
    workdir = _copy(trained, tmp_path)
    _corrupt(workdir, 1, "no_manifest")
    _corrupt(workdir, 2, "empty_step_dir")
    with pytest.raises(checkpoint_lib.UnreadableCheckpointError) as err:
        checkpoint_lib.restore_params(workdir)
    assert re.fullmatch(
        r"no checkpoint in \S+ can be read \(step 2: .+; step 1: .+\)\.", str(err.value)
    )
    prepared = loop.prepare(smoke_config(data_path), workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, every_steps=2, keep_last=3, keep_every=0)
    try:
        with pytest.raises(checkpoint_lib.UnreadableCheckpointError) as err:
            checkpointer.restore_latest(
                prepared.run.abstract_state, prepared.train_iter, prepared.run.description
            )
    finally:
        checkpointer.close()
    message = str(err.value)
    assert "\n" not in message and "step 2: " in message and "step 1: " in message
    assert "Move" in message
    assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1, 2]  # nothing moved


def test_relaunch_resumes_from_the_newest_intact_checkpoint(trained, data_path, tmp_path):
    workdir = _copy(trained, tmp_path)
    _corrupt(workdir, 2, "truncated_arrays")
    result = loop.train_and_evaluate(smoke_config(data_path, total_steps=4), workdir)
    assert result["step"] == 4
    assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1, 2, 4]
    assert os.listdir(os.path.join(workdir, checkpoint_lib.UNREADABLE_DIR)) == ["2"]
    step, state = restore_state(workdir)
    assert step == 4 and state_lib.is_finite(state["params"])


# ---------------------------------------------------------------------------------------------
# Non-finite training states
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lr", "bad_step", "named"),
    [
        (float("inf"), 1, None),  # warmup 0 * inf = NaN: the first update is NaN
        (1e30, 2, 1),  # finite, but the parameters' norm overflows float32
    ],
)
def test_no_non_finite_state_is_ever_saved(data_path, tmp_path, lr, bad_step, named):
    workdir = str(tmp_path / "run")
    config = smoke_config(data_path, total_steps=4, **{"optimizer.lr": lr})
    with pytest.raises(FloatingPointError) as err:
        loop.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert message.startswith(f"non-finite training state at step {bad_step} ")
    steps = checkpoint_lib.steps_on_disk(_ckpt_dir(workdir))
    for step in steps:
        _, state = restore_state(workdir, step)
        assert state_lib.is_finite(state["params"]) and state_lib.is_finite(state["ema_params"])
    if named is None:
        assert steps == [] and "No checkpoint was written" in message
    else:
        assert steps == [named]
        assert f"The last checkpoint, step {named} in {_ckpt_dir(workdir)}" in message


# ---------------------------------------------------------------------------------------------
# Rejected launches: checked first, nothing written, one line each
# ---------------------------------------------------------------------------------------------


def test_rejected_relaunch_leaves_the_run_untouched(trained, data_path, tmp_path, capsys):
    workdir = _copy(trained, tmp_path)
    config_json = os.path.join(workdir, "config.json")
    with open(config_json, "rb") as f:
        before = f.read()
    files_before = sorted(os.listdir(workdir)), sorted(os.listdir(_ckpt_dir(workdir)))
    missing = str(tmp_path / "no_data")
    cases = [
        ({"data.path": missing}, rf"IDX directory '{missing}' does not exist"),
        ({"data.global_batch_size": 12}, r"global batch size 12 must be a positive multiple"),
        ({"levels.params.delta_max": -0.1}, r"asyncpatch delta_max must be .*; got -0.1\."),
        ({"model.name": "unet-small"}, r"step 2 .* was written by a different model"),
    ]
    for overrides, pattern in cases:
        config = smoke_config(data_path, total_steps=4, **overrides)
        code = cli.call(
            lambda argv, config=config: loop.train_and_evaluate(config, workdir),
            ["apd.train"],
            "apd.train",
            verbose=False,
        )
        err = capsys.readouterr().err
        assert code == 1, overrides
        assert len(err.splitlines()) == 1 and re.match(rf"apd\.train: error: .*{pattern}", err)
        with open(config_json, "rb") as f:
            assert f.read() == before, overrides
        assert (sorted(os.listdir(workdir)), sorted(os.listdir(_ckpt_dir(workdir)))) == (
            files_before
        )

    afile = tmp_path / "a_file"
    afile.write_text("")
    config = smoke_config(data_path)
    main = lambda argv: loop.train_and_evaluate(config, str(afile))  # noqa: E731
    assert cli.call(main, ["apd.train"], "apd.train", verbose=False) == 1
    assert capsys.readouterr().err == (
        f"apd.train: error: workdir '{afile}' cannot be a directory: {afile} is a file; expected "
        "a path to a new or existing directory.\n"
    )


def test_config_errors_come_before_restore_and_compilation(trained, data_path, tmp_path, caplog):
    workdir = _copy(trained, tmp_path)
    config = smoke_config(data_path, total_steps=4, **{"levels.params.delta_max": -0.1})
    with pytest.raises(ValueError, match="delta_max") as direct:
        loop.prepare(config, workdir)
    caplog.set_level(logging.INFO)
    with jax.log_compiles(True), pytest.raises(ValueError) as err:
        loop.train_and_evaluate(config, workdir)
    assert str(err.value) == str(direct.value)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Restored checkpoint" in m]
    assert not [m for m in messages if re.search(r"jit\((step|init)\)|tracing (step|init)", m)]


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("")
    afile = tmp_path / "a_file"
    afile.write_text("")
    cases = [
        (nonempty, f"export directory {nonempty} is not empty; choose a new --out."),
        (afile / "out", f"export directory '{afile / 'out'}' cannot be a directory: {afile} is"),
    ]
    for out, message in cases:
        main = lambda argv, out=out: export.export(trained, str(out))  # noqa: E731
        assert cli.call(main, ["apd.export"], "apd.export", verbose=False) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"apd.export: error: {message}")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "nonempty"]


# ---------------------------------------------------------------------------------------------
# The binaries (subprocesses)
# ---------------------------------------------------------------------------------------------


def _run(module, *args):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_binaries_report_user_errors_in_one_line(trained, data_path, tmp_path):
    workdir = _copy(trained, tmp_path)
    proc = _run(
        "apd.train",
        "--config=experiments/fashion_mnist.py:smoke",
        f"--config.data.path={data_path}",
        f"--workdir={workdir}",
        "--config.model.name=unet-small",
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert re.match(
        r"apd\.train: error: the checkpoint at step 2 .* different model: .*unet-tiny", proc.stderr
    )

    proc = _run("apd.export", f"--workdir={workdir}", f"--out={workdir}")
    assert proc.returncode == 1
    assert (
        proc.stderr
        == f"apd.export: error: export directory {workdir} is not empty; choose a new --out.\n"
    )


@pytest.mark.slow
def test_failed_save_is_one_clear_error(trained, data_path, tmp_path):
    """A write error inside TensorStore (here the file-size limit, EFBIG, as a full disk gives
    ENOSPC) ends the run with a line naming the step and the OS error; the previous checkpoint
    stays intact."""
    workdir = _copy(trained, tmp_path)

    # The shell ignores SIGXFSZ (an ignored signal stays ignored across exec), so a write past
    # the limit fails with EFBIG instead of killing the process, and limits files to 62 KiB.
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 62; exec "$@"', "bash"]
    proc = subprocess.run(
        [
            *limited,
            sys.executable,
            "-m",
            "apd.train",
            "--config=experiments/fashion_mnist.py:smoke",
            f"--config.data.path={data_path}",
            f"--workdir={workdir}",
            "--config.total_steps=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    expected = (
        f"apd.train: error: saving checkpoint 4 to {_ckpt_dir(workdir)} failed: File too large; "
        "the last complete checkpoint, step 2, is intact."
    )
    assert proc.stderr.splitlines()[-1] == expected
    assert "sys.meta_path" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert checkpoint_lib.steps_on_disk(_ckpt_dir(workdir)) == [1, 2]
    step, state = restore_state(workdir)
    assert step == 2 and state_lib.is_finite(state["params"])


def _spawn(data_path, workdir, log, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apd.train",
            "--config=experiments/fashion_mnist.py:smoke",
            f"--config.data.path={data_path}",
            f"--workdir={workdir}",
            "--config.total_steps=100000",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def _wait_for(predicate, proc, log_path, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            with open(log_path) as f:
                raise AssertionError(f"process exited early:\n{f.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_ctrl_c_saves_and_killed_run_keeps_its_metrics(data_path, tmp_path):
    workdir = str(tmp_path / "run")
    steps = lambda: checkpoint_lib.steps_on_disk(_ckpt_dir(workdir))  # noqa: E731

    # Ctrl-C: the current step is saved, the exit code is 130 (a calling script stops too). The
    # sampler is switched by override.
    log1 = str(tmp_path / "first.log")
    with open(log1, "w") as log:
        proc = _spawn(
            data_path,
            workdir,
            log,
            "--config.checkpoint.every_steps=1000",
            "--config.levels.name=perlin",
            "--config.levels.params.scale=4",
        )
        _wait_for(lambda: steps() == [1], proc, log1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    stopped = steps()[-1]
    with open(log1) as f:
        assert f"Stopped by Ctrl-C at step {stopped}; relaunch to resume." in f.read()
    with open(os.path.join(workdir, "config.json")) as f:
        levels = json.load(f)["levels"]
    assert levels == {"name": "perlin", "params": {"scale": 4, "threshold": 0.0, "octaves": 1}}

    # The relaunch resumes there; killed with SIGKILL, it leaves every step it logged on disk.
    log2 = str(tmp_path / "second.log")
    with open(log2, "w") as log:
        proc = _spawn(data_path, workdir, log)
        _wait_for(lambda: steps()[-1] >= stopped + 4, proc, log2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    with open(log2) as f:
        assert f"Restored checkpoint at step {stopped} " in f.read()
    saved = steps()[-1]
    logged = {
        r["step"]
        for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "loss" in r
    }
    assert {s for s in range(stopped + 1, saved + 1) if s % 2 == 0} <= logged
