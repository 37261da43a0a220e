"""The `autoencoder` task (apd.training.autoencoder_task) through the one training loop: training,
exact resume, the adversarial term's schedule, reconstruction grids, config checks, the binary.

The runs read the small clip-art tree of tests/test_clipart.py (real PNGs in the Debian package's
layout, decoded into a per-module cache), so they need no installed package."""

import os
import shutil
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train import restore_state

from apd import data as data_lib
from apd.models import autoencoder as ae
from apd.training import autoencoder_task, loop, tasks
from apd.training import checkpoint as checkpoint_lib
from apd.training import mesh as mesh_lib
from experiments import clipart_autoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

AE_METRICS = (
    "loss",
    "grad_norm",
    "param_norm",
    "ema_norm",
    "reconstruction",
    "psnr",
    "consistency",
    "leakage",
    "known_tokens",
    "quantizer/usage",
    "quantizer/perplexity",
    "adversarial_loss",
    "discriminator/loss",
    "discriminator/r1",
)


def smoke_config(tree, arg="smoke", **overrides):
    config = clipart_autoencoder.get_config(arg)
    config.data.path = tree
    return helpers.set_values(config, **overrides)


def _leaves_equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_trains_resumes_exactly_and_starts_the_generator_term_late(clipart_tree, tmp_path):
    """4 smoke steps with the adversarial term from step 2 (`smoke,gan`): the AE metrics at every
    step, a generator term of exactly 0 for the first two steps while the discriminator trains
    from the first, the reconstruction grid; resuming from the step-2 checkpoint reproduces
    step 4 exactly (both networks, EMA, optimizer states, codebook statistics)."""
    config = smoke_config(clipart_tree, "smoke,gan", log_every_steps=1)
    assert config.adversarial.start_step == 2 and config.adversarial.weight > 0
    straight = str(tmp_path / "straight")
    result = loop.train_and_evaluate(config, straight)
    assert result["step"] == 4 and result["stopped_by"] is None

    records = [
        r
        for r in loop.metrics_lib.read_jsonl(os.path.join(straight, "metrics.jsonl"))
        if "loss" in r
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(AE_METRICS) <= set(r), sorted(set(AE_METRICS) - set(r))
        for name in AE_METRICS:
            assert np.isfinite(r[name]), (name, r[name])
        assert 0 < r["quantizer/usage"] <= 1 and r["quantizer/perplexity"] >= 1
        assert 0 <= r["known_tokens"] <= 1 and r["discriminator/loss"] > 0
    # The generator's adversarial term is off before start_step, on from it.
    assert [r["adversarial_loss"] for r in records[:2]] == [0.0, 0.0]
    assert all(r["adversarial_loss"] != 0.0 for r in records[2:])

    # The discriminator trains from the first step: after the two steps before start_step its
    # Adam moments are non-zero (its loss had gradients; the optimizer has no warmup, so its
    # parameters moved), and they keep moving after it.
    (_, s2), (_, s4) = restore_state(straight, 2), restore_state(straight, 4)
    assert config.adversarial.optimizer.warmup_steps == 0
    moments = [
        x for x in jax.tree.leaves(s2["opt_state"]["discriminator"]) if x.dtype == np.float32
    ]
    assert moments and any(np.any(x != 0) for x in moments)
    assert not _leaves_equal(s2["params"]["discriminator"], s4["params"]["discriminator"])
    assert set(s2["params"]) == {"autoencoder", "discriminator"}
    assert s2["quantizer_stats"]  # the VQ codebook's statistics travel with the state
    assert not _leaves_equal(s2["quantizer_stats"], s4["quantizer_stats"])

    # The reconstruction grid: one row per test image (at most sample.num), three panels each.
    test_images = len(data_lib.get_source("clipart", "test", path=clipart_tree))
    rows = min(config.sample.num, test_images)
    grid = Image.open(os.path.join(straight, "samples", "step_00000004.png"))
    assert grid.size == (3 * 64 + 2 + 2 * 2, rows * (64 + 2) + 2)

    # Resume from the step-2 checkpoint of the same run (as after a preemption there).
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, checkpoint_lib.CHECKPOINT_DIR, "4"))
    config.sample_every_steps = 0  # no grids: they change nothing in the state
    assert loop.train_and_evaluate(config, resumed)["step"] == 4
    (step_a, a), (step_b, b) = restore_state(straight), restore_state(resumed)
    assert step_a == step_b == 4
    assert _leaves_equal(a, b)

    # A config without the discriminator does not fit this checkpoint and is refused.
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="different model"):
        loop.prepare(smoke_config(clipart_tree), straight)


def test_masks_are_bank_masks_under_flips_and_transposes():
    config = clipart_autoencoder.get_config("smoke")
    config.masks.families = ("square", "half", "thin")  # no 'perlin': nothing to compile
    bank = autoencoder_task.mask_bank(config, (16, 16))
    assert bank.shape == (16, 16, 16) and bank.dtype == np.uint8
    expected = ae.sample_training_masks(0, 16, 16, families=("square", "half", "thin"))
    np.testing.assert_array_equal(bank, expected)
    draw = jax.jit(autoencoder_task.draw_masks, static_argnums=2)
    known = np.asarray(draw(jax.random.key(3), jnp.asarray(bank), 64))
    np.testing.assert_array_equal(known, np.asarray(draw(jax.random.key(3), bank, 64)))
    assert known.shape == (64, 16, 16) and set(np.unique(known)) <= {0.0, 1.0}
    variants = set()
    for m in bank:
        for t in (m, m.T):
            for v in (t, t[::-1], t[:, ::-1], t[::-1, ::-1]):
                variants.add(v.tobytes())
    assert all(k.astype(np.uint8).tobytes() in variants for k in known)
    # Some are flipped or transposed into masks the bank does not hold.
    assert any(k.astype(np.uint8).tobytes() not in {m.tobytes() for m in bank} for k in known)


@pytest.mark.parametrize("arg", [None, "quantizer=fsq,gan"])
def test_configs_build(arg):
    """Every config argument builds (abstractly: nothing compiled): the default is ae-f4-small
    with 16 x 16 x 3 latents, the quantiser the argument names, a discriminator only with
    `gan`."""
    config = clipart_autoencoder.get_config(arg)
    task = tasks.get(config)
    assert isinstance(task, autoencoder_task.Autoencoder)
    task.check(config, (64, 64, 3), 22)
    run = task.build(config, mesh_lib.make(-1, 1), (64, 64, 3), 22)
    model = run.model
    assert model.factor == 4 and model.latent_dim == 3
    kind = "fsq" if arg and "fsq" in arg else "vq"
    assert model.quantizer_config["kind"] == kind
    assert model.channels == (8 if arg and "smoke" in arg else 32)
    state = run.abstract_state
    gan = bool(arg) and "gan" in arg
    assert set(state.params) == ({"autoencoder", "discriminator"} if gan else {"autoencoder"})
    assert bool(state.quantizer_stats) == (kind == "vq")
    assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params["autoencoder"])
    assert run.description["model"]["task"] == "autoencoder"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("loss.reconstruction", "l3", r"config.loss.reconstruction.*'l3'"),
        ("loss.consistency_weight", -1.0, r"config.loss.consistency_weight .* >= 0; got -1.0"),
        ("adversarial.weight", -0.1, r"config.adversarial.weight .* >= 0; got -0.1"),
        ("adversarial.loss", "wasserstein", r"config.adversarial.loss.*'wasserstein'"),
        ("data.image_size", 62, r"image size \(62, 62\) must be divisible by .* factor 4"),
        ("masks.families", ("square", "stripes"), r"config.masks.families.*'stripes'"),
        ("masks.p_unmasked", 1.5, r"p_unmasked must be a probability in \[0, 1\]; got 1.5"),
        ("model.name", "ae-f4-huge", r"autoencoder size.*'ae-f4-huge'"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(
    clipart_tree, tmp_path, key, value, message
):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        loop.prepare(smoke_config(clipart_tree, **{key: value}), workdir)
    assert not os.path.exists(workdir)


def _run_binary(program, config, workdir):
    return subprocess.run(
        [sys.executable, "-m", program, f"--config={config}", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "program, config, message",
    [
        (
            "apd.train_autoencoder",
            "experiments/fashion_mnist.py:smoke",
            "apd.train_autoencoder: error: apd.train_autoencoder trains "
            "config.task='autoencoder', but this config's task is 'diffusion': train it with "
            "python -m apd.train.",
        ),
        (
            "apd.train",
            "experiments/clipart_autoencoder.py:smoke",
            "apd.train: error: apd.train trains config.task='diffusion', but this config's task "
            "is 'autoencoder': train it with python -m apd.train_autoencoder.",
        ),
    ],
)
def test_each_binary_refuses_the_other_tasks_config(tmp_path, program, config, message):
    workdir = str(tmp_path / "run")
    proc = _run_binary(program, config, workdir)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip() == message, proc.stderr[-2000:]
    assert not os.path.exists(workdir)
