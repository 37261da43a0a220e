"""The training system: sharding equivalence, exact resume, preemption, multi-process, CLI."""

import os
import signal
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from apd.training import builder, loop
from apd.training import checkpoint as checkpoint_lib
from apd.training import mesh as mesh_lib
from experiments import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def smoke_config(data_path, **overrides):
    config = fashion_mnist.get_config("smoke")
    config.data.path = data_path
    return helpers.set_values(config, **overrides)


def restore_state(workdir, step=None):
    """The raw TrainState pytree of a workdir's checkpoint (numpy leaves)."""
    path = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
    manager = ocp.CheckpointManager(path, item_names=("state",))
    step = manager.latest_step() if step is None else step
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, state.state


def run_cli(*args, env=None, timeout=300, check=True):
    env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "apd.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"apd.train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _batch(config, n):
    rng = np.random.default_rng(1)
    return {
        "image": rng.uniform(-1, 1, (n, 28, 28, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


def test_sharded_step_matches_single_device(data_path):
    """data x fsdp = 4 x 2 gives the same loss and update as one device; FSDP really shards."""
    # unet-small at base 64: kernels of 3x3x128x128, large enough for the FSDP rules to shard.
    config = smoke_config(data_path, **{"model.name": "unet-small"})
    config.model.options = {"base": 64}
    batch = _batch(config, 8)
    results = {}
    for name, (data, fsdp, devices) in {
        "one": (1, 1, jax.devices()[:1]),
        "mesh": (4, 2, jax.devices()),
    }.items():
        mesh = mesh_lib.make(data, fsdp, devices)
        run = builder.build(config, mesh, (28, 28, 1), 10)
        state = run.init()
        if name == "mesh":
            # Every kernel big enough to shard holds exactly 1/fsdp of itself per device, and those
            # kernels are most of the model.
            leaves = jax.tree.leaves(state.params)
            sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
            for x in sharded:
                assert x.addressable_shards[0].data.nbytes * 2 == x.nbytes
            total = sum(x.nbytes for x in leaves)
            assert sum(x.nbytes for x in sharded) > 0.7 * total
            per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
            assert per_device / total < 0.65, per_device / total
        global_batch = builder.global_batch(batch, run.batch_sharding)
        state, metrics = run.train_step(state, global_batch)
        results[name] = jax.device_get((state.params, metrics["loss"]))
    np.testing.assert_allclose(results["one"][1], results["mesh"][1], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(results["one"][0]), jax.tree.leaves(results["mesh"][0]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_bit_exact(data_path, tmp_path):
    """N steps, stop, relaunch, N more == 2N uninterrupted (params, EMA, optimizer, data order)."""
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    loop.train_and_evaluate(smoke_config(data_path, total_steps=6), straight)
    loop.train_and_evaluate(smoke_config(data_path, total_steps=3), resumed)
    assert restore_state(resumed)[0] == 3
    loop.train_and_evaluate(smoke_config(data_path, total_steps=6), resumed)
    step_a, a = restore_state(straight)
    step_b, b = restore_state(resumed)
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bad_inputs_fail_before_work(data_path, tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match=r"global batch size 12 .* 8"):
        loop.train_and_evaluate(smoke_config(data_path, **{"data.global_batch_size": 12}), workdir)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        loop.train_and_evaluate(smoke_config(data_path, **{"data.path": str(tmp_path)}), workdir)
    assert not os.path.exists(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR, "2"))

    loop.train_and_evaluate(smoke_config(data_path, total_steps=2), workdir)
    ckpt_dir = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
    before = sorted(os.listdir(ckpt_dir))
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="different model"):
        loop.train_and_evaluate(
            smoke_config(data_path, total_steps=4, **{"model.name": "unet-small"}), workdir
        )
    assert sorted(os.listdir(ckpt_dir)) == before


@pytest.mark.slow
def test_cli_end_to_end_and_config_errors(data_path, tmp_path):
    workdir = str(tmp_path / "cli")
    base = ["--config=experiments/fashion_mnist.py:smoke", f"--config.data.path={data_path}"]
    run_cli(*base, f"--workdir={workdir}")
    assert os.path.exists(os.path.join(workdir, "config.json"))
    records = [r for r in loop.metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert any("loss" in r for r in records)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert restore_state(workdir)[0] == 4

    # Flag errors: exit code 1 and one line naming the bad value.
    for args, message in [
        (
            [*base, "--config.total_step=3"],
            """no such config key 'total_step' (Did you mean "total_steps" instead of""",
        ),
        ([*base, "--config.total_steps=abc"], "flag --config.total_steps=abc: invalid literal"),
        (
            ["--config=experiments/fashion_mnist.py:smok"],
            "flag --config=experiments/fashion_mnist.py:smok: Error whilst parsing config file: "
            "ValueError: unknown config argument 'smok'",
        ),
    ]:
        bad = run_cli(*args, f"--workdir={workdir}", check=False)
        assert bad.returncode == 1
        assert bad.stderr.startswith(f"apd.train: error: {message}"), bad.stderr
        assert len(bad.stderr.splitlines()) == 1, bad.stderr


def _wait_for(predicate, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def _steps(workdir):
    path = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def _spawn(data_path, workdir, *extra):
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
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigterm_saves_current_step_and_sigkill_resumes(data_path, tmp_path):
    workdir = str(tmp_path / "preempt")
    proc = _spawn(data_path, workdir, "--config.checkpoint.every_steps=1000")
    _wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")), 240, proc)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = _steps(workdir)
    assert steps and steps[-1] % 1000 != 0
    assert f"Stopped by preemption at step {steps[-1]}" in err

    # Now kill -9 while asynchronous saves are in flight (one every step), then relaunch.
    proc = _spawn(data_path, workdir, "--config.checkpoint.every_steps=1")
    _wait_for(lambda: len(_steps(workdir)) >= 2 and _steps(workdir)[-1] > steps[-1] + 2, 240, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = _steps(workdir)[-1]
    total = last + 3
    run_cli(
        "--config=experiments/fashion_mnist.py:smoke",
        f"--config.data.path={data_path}",
        f"--workdir={workdir}",
        f"--config.total_steps={total}",
    )
    assert _steps(workdir)[-1] == total


@pytest.mark.slow
def test_two_processes_match_one(data_path, tmp_path):
    single = str(tmp_path / "single")
    multi = str(tmp_path / "multi")
    args = [
        "--config=experiments/fashion_mnist.py:smoke",
        f"--config.data.path={data_path}",
        "--config.total_steps=4",
        "--config.log_every_steps=1",
    ]
    run_cli(*args, f"--workdir={single}")
    subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", "4", "--", *args, f"--workdir={multi}"],
        cwd=REPO,
        check=True,
        # Two processes compile and train on the machine's 2 cores: 70-120 s idle, past 300 s
        # while a suite and a training share them.
        timeout=900,
        env=dict(os.environ, PYTHON=sys.executable),
    )

    def losses(workdir):
        records = loop.metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        return [r["loss"] for r in records if "loss" in r]

    np.testing.assert_allclose(losses(single), losses(multi), rtol=1e-5)
    assert len(losses(single)) == 4
    # The multi-process checkpoint restores here, on one process with another device count.
    step, params, _ = checkpoint_lib.restore_params(multi, which="params")
    _, params_single, _ = checkpoint_lib.restore_params(single, which="params")
    assert step == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_single), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_builder_needs_no_data_or_logging_stack():
    """`builder.build` compiles the real step on bare CUDA images (benchmarks/gpu_check.sh):
    importing it must not pull in grain, TFDS, TensorFlow, clu or Orbax."""
    heavy = ["grain", "tensorflow", "tensorflow_datasets", "clu", "orbax"]
    code = (
        "import sys; import apd.training.builder, experiments.fashion_mnist; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
