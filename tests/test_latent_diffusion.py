"""Latent diffusion end to end on a smoke config: the clip-art latents of tests/test_latents.py's
autoencoder, a latent U-Net trained through the one loop (`experiments/clipart_latent.py:smoke`),
then `runs.load` and the Sampler's pixel side (generation decoded; inpainting, RePaint and edits
with known pixels exact), the reconstruction evaluator and its leakage, and the evaluators that do
not apply to latents refused."""

import os

import numpy as np
import pytest
from test_latents import BATCH, SHARD_SIZE, ae_workdir, codec, data_block, encoded  # noqa: F401

from apd import latents, run_sampler, runs
from apd.evaluation import masks, protocol
from apd.training import loop
from experiments import clipart_latent


@pytest.fixture(scope="module")
def latent_run(encoded, ae_workdir, tmp_path_factory):  # noqa: F811
    """A 4-step latent U-Net on the encoded clip art (the config naming its autoencoder)."""
    out, _ = encoded
    config = clipart_latent.get_config(f"latents={out},autoencoder={ae_workdir},smoke")
    config.levels.name = "synchronous"
    config.levels.params = {}
    workdir = str(tmp_path_factory.mktemp("latent_run"))
    result = loop.train_and_evaluate(config, workdir)
    assert result["step"] == 4
    return workdir


def test_a_latent_run_loads_with_its_codec_and_image_data(latent_run, encoded, clipart_tree):  # noqa: F811
    run = runs.load(latent_run)
    assert run.latent and isinstance(run.codec, latents.Codec)
    assert run.token_shape == (16, 16, 3) and run.image_shape == (64, 64, 3)
    data = runs.image_data(run.config)
    assert (data.name, data.path) == ("clipart", os.path.abspath(clipart_tree))
    x, labels = runs.first_images(run, "test", 3)
    assert x.shape == (3, 64, 64, 3) and labels.shape == (3,)


def test_sampling_a_latent_run_returns_images_with_known_pixels_exact(latent_run):
    run = runs.load(latent_run)
    sampler = run_sampler.Sampler(run, batch=8)
    assert sampler.grid == (16, 16) and sampler.image_grid == (64, 64)
    out = sampler.generate(3, steps=3, seed=0)
    assert out.images.shape == (3, 64, 64, 3)
    assert np.all(np.abs(out.images) <= 1)

    x, labels = runs.first_images(run, "test", 5)
    for family in ("square", "thin", "half"):
        known = masks.make_masks(family, 0, 5, (64, 64))
        for result in (
            sampler.inpaint(x, known, steps=3, labels=labels, seed=1),
            sampler.repaint(x, known, steps=3, jump=1, resample=2, labels=labels, seed=1),
        ):
            y = result.images
            assert y.shape == x.shape
            keep = np.broadcast_to(known[..., None] == 1, x.shape)
            np.testing.assert_array_equal(y[keep], x[keep])
            # A token is known only when all its pixels are: a hole's pixels were generated.
            assert not np.array_equal(y[~keep], x[~keep])

    strength = np.zeros((5, 64, 64), np.float32)
    strength[:, :, 32:] = 0.6
    edited = sampler.edit(x, strength, steps=3, labels=labels, seed=2).images
    kept = np.broadcast_to(strength[..., None] == 0, x.shape)
    np.testing.assert_array_equal(edited[kept], x[kept])

    with pytest.raises(ValueError, match=r"masks must be \[N, H, W\] with \(H, W\) = \(64, 64\)"):
        sampler.inpaint(x, np.ones((5, 16, 16), np.uint8), steps=3)


def test_token_levels_take_the_highest_level_of_their_pixels(latent_run):
    sampler = run_sampler.Sampler(runs.load(latent_run), batch=8)
    rng = np.random.default_rng(0)
    levels = rng.uniform(size=(2, 64, 64)).astype(np.float32)
    levels[:, :4, :4] = 0  # token (0, 0): every pixel kept
    levels[:, 4, 4] = 0.0  # token (1, 1): one kept pixel does not keep the token
    tokens = sampler._token_levels(levels)
    assert tokens.shape == (2, 16, 16)
    assert np.all(tokens[:, 0, 0] == 0) and np.all(tokens[:, 1, 1] > 0)
    np.testing.assert_array_equal(tokens, levels.reshape(2, 16, 4, 16, 4).max(axis=(2, 4)))


def test_the_reconstruction_evaluator_scores_the_autoencoder(latent_run):
    run = runs.load(latent_run)
    config = run.config.evaluate
    config.inpainting.num_images = 6
    config.inpainting.families = ("square", "half")
    evaluator = protocol.Evaluator(run, config, features=None)
    unit = protocol.Unit("reconstruction", 0)
    assert unit in protocol.units(config)
    record = evaluator.run_unit(unit, str(run.directory))
    m = record["metrics"]
    assert np.isfinite(m["psnr"]) and 0 < m["ssim"] <= 1 and m["fid"] is None
    for family in ("square", "half"):
        assert np.isfinite(m[f"leakage/{family}"]) and m[f"leakage/{family}"] >= 0
    assert m["leakage"] == pytest.approx(np.mean([m["leakage/square"], m["leakage/half"]]))
    assert 0 < m["code_usage"] <= 1 and 1 <= m["code_perplexity"] <= run.codec.num_codes
    # The metrics are those of decode(encode(x)), the autoencoder with no mask.
    from apd.evaluation import image_metrics

    x, _ = evaluator.inputs(6)
    y = np.asarray(run.codec.decode(run.codec.encode(x)))
    assert m["psnr"] == pytest.approx(float(np.mean(image_metrics.psnr(y, x))), rel=1e-5)
    y_raw = np.asarray(run.codec.decode(run.codec.encode(x), quantize=False))
    assert m["psnr_unquantized"] == pytest.approx(
        float(np.mean(image_metrics.psnr(y_raw, x))), rel=1e-5
    )


def test_evaluators_that_do_not_fit_the_run_are_refused_before_sampling(latent_run, tmp_path):
    from apd import evaluate

    options = {
        "cache_dir": str(tmp_path / "cache"),
        "feature_dir": None,
        "inception_weights": None,
        "lpips_weights": None,
    }
    config = runs.read_config(latent_run)
    config.evaluate.evaluators = ("likelihood", "reconstruction")
    with pytest.raises(ValueError, match=r"\['likelihood'\] do not apply to a latent run"):
        evaluate.Evaluation(latent_run, config, str(tmp_path / "eval"), options)
    assert not (tmp_path / "eval").exists()


def test_an_export_of_a_latent_run_samples_without_its_autoencoder_or_latents(latent_run, tmp_path):
    """apd.export bundles the codec: with the latent dataset and the autoencoder workdir out of
    reach (their paths in the export's config.json pointing nowhere), the export loads and samples
    what the workdir does."""
    import json

    from apd import export

    out = str(tmp_path / "export")
    export.export(latent_run, out)
    assert os.path.isfile(os.path.join(out, latents.EXPORT_DIR, latents.CODEC_JSON))
    config_path = os.path.join(out, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["data"]["path"] = str(tmp_path / "no-latents")
    config["autoencoder"]["workdir"] = str(tmp_path / "no-autoencoder")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)

    exported = runs.load(export_dir=out)
    original = runs.load(latent_run)
    assert exported.latent and exported.codec.identity == original.codec.identity
    assert (exported.image_shape, exported.token_shape) == (original.image_shape, (16, 16, 3))
    np.testing.assert_array_equal(
        exported.codec.normalization.scale, original.codec.normalization.scale
    )
    a = run_sampler.Sampler(exported, batch=8).generate(2, steps=2, seed=3).images
    b = run_sampler.Sampler(original, batch=8).generate(2, steps=2, seed=3).images
    np.testing.assert_allclose(a, b, atol=1e-5)

    # A corrupted export is refused by its recorded hash.
    record_path = os.path.join(out, latents.EXPORT_DIR, latents.CODEC_JSON)
    with open(record_path, encoding="utf-8") as f:
        record = json.load(f)
    record["identity"]["params_sha256"] = "0" * 64
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(record, f)
    with pytest.raises(ValueError, match="the export is corrupt"):
        runs.load(export_dir=out)
