"""The sampling binary and its library (`apd.run_sampler`, with the README's example), the
uncertainty head's training binary, run loading and sample grids.

One smoke training run (module fixture) gives a checkpoint; the binaries run in-process on it
with tiny --num and --steps, and once as a subprocess.
"""

import json
import os
import re
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from apd import export, plans, run_sampler, runs, sample, sampling, train_uncertainty
from apd.evaluation import masks
from apd.sampling import images
from apd.training import loop
from experiments import fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (28, 28)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A smoke-trained workdir (fake Fashion-MNIST, unet-tiny, class-conditional), 2 steps: one
    checkpoint save instead of the smoke config's two."""
    config = fashion_mnist.get_config("smoke")
    config.total_steps = 2
    config.data.path = helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))
    directory = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(config, directory)
    return directory


@pytest.fixture(scope="module")
def run(workdir):
    return runs.load(workdir)


def sample_main(workdir, out, *args):
    """`python -m apd.sample` in-process (flag parsing included); returns (info, arrays)."""
    argv = ["apd.sample", f"--workdir={workdir}", f"--out={out}", *args]
    sample.main(sample.parse_flags(argv))
    with open(os.path.join(out, "sample_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    with np.load(os.path.join(out, "samples.npz")) as arrays:
        return info, dict(arrays)


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------


def test_load_workdir_and_export_agree(workdir, run, tmp_path):
    """The export directory gives the same step, model and parameters as the workdir."""
    assert run.step == 2 and run.num_classes == 10 and run.prediction == "v"
    assert run.image_shape == (28, 28, 1) and run.config.model.name == "unet-tiny"
    export.export(workdir, str(tmp_path / "export"))
    exported = runs.load(export_dir=str(tmp_path / "export"))
    assert exported.step == run.step and exported.description["model"] == run.description["model"]
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), exported.params, run.params)
    assert all(jax.tree.leaves(same))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        runs.load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        runs.load(str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of workdir"):
        runs.load()


# ---------------------------------------------------------------------------------------------
# apd.sample: the plans
# ---------------------------------------------------------------------------------------------


def check_outputs(out, info, arrays, num, chunks=2):
    """The common contract of the three files (`chunks` costs: 2 chunks, or 1 adaptive pool)."""
    assert arrays["samples"].shape == (num, *GRID, 1) and arrays["samples"].dtype == np.uint8
    assert arrays["samples_float"].dtype == np.float32
    assert np.isfinite(arrays["samples_float"]).all()
    np.testing.assert_array_equal(arrays["samples"], images.to_uint8(arrays["samples_float"]))
    assert arrays["labels"].shape == (num,) and arrays["labels"].max() < 10
    with Image.open(os.path.join(out, "samples.png")) as png:
        assert png.mode == "L" and min(png.size) >= 28
    calls = info["network_calls"]
    assert info["source"]["checkpoint_step"] == 2 and info["num"] == num
    assert calls["total"] == sum(calls["per_chunk"]) and len(calls["per_chunk"]) == chunks
    assert info["steps"] == max(calls["per_chunk"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan, args, steps_per_chunk",
    [
        ("synchronous", ["--labels=3"], 3),
        ("inpaint", ["--mask=square"], 3),
        ("edit", [], 3),
        # K = 2 patches per side, 2 steps per group, overlap 1: (4 - 1) * 1 + 2 steps.
        ("autoregressive", ["--patches=2", "--steps_per_group=2", "--overlap=1"], 5),
        # RePaint over 3 levels with j = 1, r = 2: 3 steps down and 2 jumps back (2 more down).
        ("repaint", ["--mask=half", "--jump=1", "--resample=2"], 5),
    ],
)
def test_sample_plans(workdir, tmp_path, plan, args, steps_per_chunk):
    """Each plan writes the PNG/npz/json; 5 samples in chunks of 3 (the last one padded)."""
    out = str(tmp_path / plan)
    info, arrays = sample_main(
        workdir, out, f"--plan={plan}", "--num=5", "--batch=3", "--steps=3", *args
    )
    check_outputs(out, info, arrays, 5)
    assert info["plan"] == plan and info["network_calls"]["per_chunk"] == [steps_per_chunk] * 2
    if plan == "synchronous":
        np.testing.assert_array_equal(arrays["labels"], 3)
        assert "inputs" not in arrays
    if plan in ("inpaint", "repaint"):
        known = arrays["masks"] == 1
        assert 0 < known.mean() < 1
        # Known pixels come back bit for bit, as floats and as uint8; the rest is generated.
        np.testing.assert_array_equal(arrays["samples_float"][known], arrays["inputs_float"][known])
        np.testing.assert_array_equal(arrays["samples"][known], arrays["inputs"][known])
        assert not np.array_equal(arrays["samples"][~known], arrays["inputs"][~known])
        np.testing.assert_array_equal(arrays["inputs"], images.to_uint8(arrays["inputs_float"]))
    if plan == "edit":
        strength = arrays["strength"]
        np.testing.assert_allclose(strength[:, :, 0], 0.0)
        np.testing.assert_allclose(strength[:, :, -1], 1.0)
        kept = strength == 0  # the left column: kept exactly
        np.testing.assert_array_equal(arrays["samples_float"][kept], arrays["inputs_float"][kept])
        assert not np.array_equal(arrays["samples"][~kept], arrays["inputs"][~kept])
    if plan == "repaint":
        assert info["eta"] == 1.0
        assert (
            info["network_calls"]["per_chunk"][0] == sampling.repaint_cost(3, 3, 1, 2).network_calls
        )


def test_library_call_and_binary_give_identical_arrays(workdir, run, tmp_path):
    """The binary is flags -> `run_sampler.Sampler` -> files: the same call from Python with the
    same seed gives the same arrays, and the same network calls per chunk."""
    info, arrays = sample_main(
        workdir,
        str(tmp_path / "inpaint"),
        "--plan=inpaint",
        "--mask=wide",
        "--num=5",
        "--batch=3",
        "--steps=3",
        "--seed=4",
        "--input_guidance=1.5",
    )
    sampler = run_sampler.Sampler(run, batch=3)
    x, y = runs.first_images(run, "test", 5)
    known = masks.make_masks("wide", 4, 5, GRID)
    out = sampler.inpaint(x, known, steps=3, labels=y, seed=4, input_guidance=1.5)
    np.testing.assert_array_equal(arrays["masks"], known)
    np.testing.assert_array_equal(arrays["samples_float"], out.images)
    assert [c.network_calls for c in out.costs] == info["network_calls"]["per_chunk"] == [3, 3]
    assert out.network_calls == info["network_calls"]["total"]
    # Chunk i depends only on (seed, i): the first chunk of 3 images is that of 5.
    first = sampler.inpaint(x[:3], known[:3], steps=3, labels=y[:3], seed=4, input_guidance=1.5)
    np.testing.assert_array_equal(first.images, out.images[:3])


def readme_library_example() -> str:
    """The Python block of the README's "## Library use" section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## Library use\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Library use section has one Python block"
    return blocks[0]


def test_readme_library_use_runs(workdir, capsys):
    """The README's "Library use" example, as written, on this module's trained run."""
    code = readme_library_example()
    assert code.count('"runs/fmnist"') == 1
    namespace: dict = {}
    exec(compile(code.replace('"runs/fmnist"', repr(workdir)), "README.md", "exec"), namespace)
    assert namespace["samples"].images.shape == (16, *GRID, 1)
    assert np.isfinite(namespace["samples"].images).all()
    out, x, known = namespace["out"], namespace["x"], namespace["known"] == 1
    np.testing.assert_array_equal(out.images[known], x[known])  # known pixels kept exactly
    assert out.network_calls == 50 and np.isfinite(namespace["psnr"])
    assert re.search(r"^PSNR -?\d+\.\d\d dB, 50 network calls$", capsys.readouterr().out, re.M)


def test_sampler_refuses_bad_inputs(run):
    sampler = run_sampler.Sampler(run, batch=2)
    x = np.zeros((3, *GRID, 1), np.float32)
    known = masks.make_masks("half", 0, 3, GRID)
    with pytest.raises(ValueError, match=r"images must be float \[N, H, W, C\]"):
        sampler.inpaint(x[..., 0], known)
    with pytest.raises(ValueError, match=r"masks must be \[N, H, W\] with \(H, W\) = \(28, 28\)"):
        sampler.inpaint(x, known[:, :20])
    with pytest.raises(ValueError, match=r"masks must hold only 0 \(generate\) and 1 \(known\)"):
        sampler.inpaint(x, known * 2)
    with pytest.raises(ValueError, match=r"needs 3 rows .* got shape \(2, 28, 28\)"):
        sampler.inpaint(x, known, labels=np.zeros((2, *GRID), np.int32))
    with pytest.raises(ValueError, match="the number of images must be an int >= 1"):
        sampler.generate(0)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        run_sampler.Sampler(run, batch=0)


@pytest.mark.slow
def test_uncertainty_head_then_adaptive(workdir, run, tmp_path):
    """No head: a clear error naming the trainer. Then train a few steps, resume, and sample."""
    with pytest.raises(runs.MissingUncertaintyHeadError, match=r"python -m apd\.train_uncertainty"):
        sample.run(sample.Options(plan="adaptive", out=str(tmp_path / "a"), workdir=workdir))

    options = train_uncertainty.Options(
        workdir=workdir, steps=3, batch=8, eval_examples=8, log_every=1
    )
    info = train_uncertainty.train(options)
    head_dir = runs.uncertainty_dir(run)
    assert sorted(os.listdir(head_dir)) == ["head.json", "opt_state", "params"]
    assert info["steps_done"] == 3 and info["backbone"]["step"] == run.step
    assert info["head"]["patch"] == 1 and info["levels"]["name"] == "asyncpatch"
    assert np.isfinite(info["final_loss"]) and info["eval"]["examples"] == 8
    assert info["eval"]["loss"] > 0 and info["eval"]["target_variance"] > 0
    assert -1 <= info["eval"]["spearman"] <= 1
    calibration = info["calibration"]
    assert calibration["low"] < calibration["high"] and calibration["pixels"] == 8 * 28 * 28
    # A relaunch with the same settings restores the head (and its optimizer) and has no work.
    assert train_uncertainty.train(options) == info
    # A head from before calibrations were recorded is calibrated without training.
    head_json = os.path.join(head_dir, runs.UNCERTAINTY_JSON)
    with open(head_json, encoding="utf-8") as f:
        old = json.load(f)
    del old["calibration"]
    with open(head_json, "w", encoding="utf-8") as f:
        json.dump(old, f)
    with pytest.raises(ValueError, match="no calibration"):
        run_sampler.Sampler(run, batch=2).adaptive(2, steps=4)
    assert train_uncertainty.train(options)["calibration"] == calibration

    out = str(tmp_path / "adaptive")
    info, arrays = sample_main(
        workdir,
        out,
        "--plan=adaptive",
        "--num=4",
        "--batch=2",
        "--steps=6",
        "--min_steps=2",
        "--mask=half",
    )
    check_outputs(out, info, arrays, 4, chunks=1)
    steps, known = arrays["steps_per_pixel"], arrays["masks"] == 1
    calls = arrays["network_calls"]
    # Known pixels take no step and stay exact; every image takes at most --steps calls, and
    # each of its generated pixels moves in at most that many of them.
    assert (steps[known] == 0).all() and (steps[~known] >= 1).all()
    assert calls.shape == (4,) and calls.min() >= 1 and calls.max() <= 6
    assert (steps <= calls[:, None, None]).all()
    np.testing.assert_array_equal(arrays["samples_float"][known], arrays["inputs_float"][known])
    adaptive = info["adaptive"]
    assert adaptive["difficulty_range"] == [calibration["low"], calibration["high"]]
    assert adaptive["mean_calls_per_image"] == pytest.approx(calls.mean())
    pool_steps = info["network_calls"]["total"]
    assert adaptive["pool_steps"] == pool_steps and adaptive["forward_passes"] == 2 * pool_steps
    assert calls.sum() == adaptive["image_forward_passes"] <= adaptive["forward_passes"]
    assert adaptive["synchronous_forward_passes"] == 2 * 6 * 2  # 2 chunks x 6 steps x 2
    assert 1 <= adaptive["mean_steps_per_pixel"] <= 6
    assert arrays["log_error"].shape == (4, *GRID)


def test_log_squared_error_closed_form():
    x = np.zeros((1, 2, 2, 2), np.float32)
    x_hat = np.array([[[[1, 1], [0, 2]], [[0, 0], [3, 1]]]], np.float32)
    expected = np.log(np.array([[[1.0, 2.0], [0.0, 5.0]]]) + train_uncertainty.LOG_EPS)
    np.testing.assert_allclose(train_uncertainty.log_squared_error(x_hat, x), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# apd.sample: bad input
# ---------------------------------------------------------------------------------------------


def test_bad_options_fail_before_loading(tmp_path):
    missing = str(tmp_path / "nothing")  # never read: each option fails first
    for options, message in [
        (dict(plan="bogus"), "unknown plan 'bogus'; expected one of"),
        (dict(plan="inpaint", mask="circle"), "unknown mask 'circle'"),
        (dict(plan="edit", strength="radial"), "--strength must be 'linear' or a FILE.npy"),
        (dict(plan="synchronous", labels="cats"), "--labels must be one of"),
        (dict(plan="adaptive", difficulty_low=-3.0), "go together"),
        (dict(plan="repaint", cfg_scale=2.0), "repaint baseline takes no guidance"),
        (dict(plan="synchronous", num=0), "--num must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            sample.run(sample.Options(out=str(tmp_path / "out"), workdir=missing, **options))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        sample.run(sample.Options(plan="synchronous", out=str(tmp_path / "o"), workdir=missing))


def test_resolve_labels():
    data = np.arange(5, dtype=np.int32)
    resolve = run_sampler.resolve_labels
    np.testing.assert_array_equal(resolve("0,1", 10, 5, 0), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(resolve("auto", 10, 5, 0, data), data)
    np.testing.assert_array_equal(resolve("null", 10, 5, 0), 10)
    drawn = resolve("random", 10, 1000, 0)
    assert set(np.unique(drawn)) == set(range(10))
    np.testing.assert_array_equal(resolve("auto", 10, 1000, 0), drawn)  # no data: random
    assert resolve("auto", 0, 5, 0) is None and resolve("random", 0, 5, 0) is None
    with pytest.raises(ValueError, match="unconditional"):
        resolve("3", 0, 5, 0)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\]"):
        resolve("11", 10, 5, 0)
    with pytest.raises(ValueError, match="needs input images"):
        resolve("data", 10, 5, 0)
    with pytest.raises(ValueError, match="--labels must be one of"):
        resolve("cats", 10, 5, 0, name="--labels")


def test_sample_masks_are_the_mask_modules_families(tmp_path):
    """--mask=FAMILY draws exactly `apd.evaluation.masks` with --seed; FILE.npy is read as is."""
    assert sample.MASKS == masks.ALL_FAMILIES
    for family in masks.ALL_FAMILIES:
        np.testing.assert_array_equal(
            sample.make_masks(family, 6, GRID, 3), masks.make_masks(family, 3, 6, GRID)
        )
    left = np.zeros(GRID, np.uint8)
    left[:, :14] = 1
    np.save(tmp_path / "left.npy", left)
    np.testing.assert_array_equal(
        sample.make_masks(str(tmp_path / "left.npy"), 3, GRID, 0)[2], left
    )
    np.save(tmp_path / "bad.npy", left * 2)
    with pytest.raises(ValueError, match=r"only 0 \(generate\) and 1 \(known\)"):
        sample.make_masks(str(tmp_path / "bad.npy"), 3, GRID, 0)


def test_cli_subprocess_error():
    """`python -m apd.sample` with an unknown plan exits 1 with one clear line."""
    proc = subprocess.run(
        [sys.executable, "-m", "apd.sample", "--workdir=/nonexistent", "--plan=bogus", "--out=x"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "apd.sample: error: unknown plan 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# apd.sampling.images: the loop's sample_fn and grids
# ---------------------------------------------------------------------------------------------


def test_make_sample_fn_takes_params(run, tmp_path):
    """The loop's factory: parameters are an argument (one compilation for old and new ones).

    With all-zero parameters the network predicts v = 0, so x_hat = z / (alpha + sigma) = z and
    eps_hat = z for rectified flow; a deterministic DDIM step then maps z to (alpha_s + sigma_s)
    z = z, and the samples are the start noise itself.
    """
    plan = plans.synchronous(2, 4, GRID)
    labels = jnp.arange(4, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.key(1), (4, *GRID, 1))
    sample_fn = images.make_sample_fn(
        run.model.apply,
        schedule=run.schedule,
        prediction=run.prediction,
        channels=1,
        eta=0.0,
        num_classes=run.num_classes,
    )
    zeros = jax.tree.map(jnp.zeros_like, run.params)
    np.testing.assert_allclose(
        sample_fn(zeros, plan, jax.random.key(0), noise=noise, labels=labels), noise, atol=1e-5
    )
    x = sample_fn(run.params, plan, jax.random.key(0), noise=noise, labels=labels)
    assert x.shape == (4, *GRID, 1) and np.isfinite(x).all()
    assert np.abs(np.asarray(x - noise)).max() > 1e-2
    assert sample_fn._cache_size() == 1
    path = str(tmp_path / "grid" / "step.png")
    images.write_sample_grid(path, x)
    with Image.open(path) as png:
        assert png.size == (2 * 30 + 2, 2 * 30 + 2)  # 2 x 2 images of 28 with 2-pixel padding


def test_grid_and_uint8():
    pixels = np.arange(256, dtype=np.uint8)
    floats = pixels.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    np.testing.assert_array_equal(images.to_uint8(floats), pixels)  # the pipeline's inverse
    np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, 3.0])), [0, 255])
    tiles = np.stack([np.full((2, 3, 1), v, np.uint8) for v in (10, 20, 30)])
    out = images.grid(tiles, columns=2, pad=1, pad_value=0)
    assert out.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
    assert out[1, 1, 0] == 10 and out[1, 5, 0] == 20 and out[4, 1, 0] == 30 and out[4, 5, 0] == 0
    pair = images.side_by_side(tiles, np.zeros((3, 2, 3, 3), np.uint8))
    assert pair.shape == (3, 2, 7, 3) and (pair[0, :, :3] == 10).all()
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        images.grid(np.zeros((2, 2, 2), np.uint8))
