"""Experiment configs: they build, their arguments are typed, a missing dataset stops early."""

import pytest

from apd import data as data_lib
from apd import models
from apd.training import loop
from experiments import (
    cifar10,
    clipart,
    clipart_autoencoder,
    clipart_latent,
    common,
    fashion_mnist,
    imagenet64,
    imagenet256_autoencoder,
    imagenet256_latent,
    latent_vs_pixel,
    lsun_bedroom_autoencoder,
    lsun_bedroom_latent,
)

CONFIGS = [fashion_mnist, cifar10, imagenet64, clipart]


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("arg", [None, "smoke", "sampler=perlin", "sampler=synchronous,smoke"])
def test_configs_build_and_name_real_components(module, arg):
    config = module.get_config(arg)
    assert config.model.name in models.SIZES
    assert config.data.name in data_lib.NAMES
    assert config.data.global_batch_size > 0 and config.total_steps > 0
    config.lock()
    with pytest.raises(AttributeError, match="total_steps"):
        config.total_step = 3


def test_parse_arg_is_typed():
    arg = common.parse_arg("steps=10,smoke,sampler=perlin", steps=1, smoke=False, sampler="x")
    assert (arg.steps, arg.smoke, arg.sampler) == (10, True, "perlin")
    with pytest.raises(ValueError, match=r"'step'.*\['sampler', 'smoke', 'steps'\]"):
        common.parse_arg("step=10", steps=1, smoke=False, sampler="x")
    with pytest.raises(ValueError, match="'ten' is not a valid int"):
        common.parse_arg("steps=ten", steps=1)
    with pytest.raises(ValueError, match="not a boolean"):
        common.parse_arg("smoke=maybe", smoke=False)
    with pytest.raises(ValueError, match="unknown level sampler 'foo'"):
        fashion_mnist.get_config("sampler=foo")
    with pytest.raises(ValueError, match="unknown size '1b'"):
        imagenet64.get_config("size=1b")


def test_missing_dataset_stops_before_any_compilation(tmp_path):
    config = imagenet64.get_config("smoke")
    config.data.data_dir = str(tmp_path)
    with pytest.raises(data_lib.DatasetNotFoundError, match="tfds build imagenet2012"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists()


LATENT_CONFIGS = [clipart_latent, imagenet256_latent, lsun_bedroom_latent]
AUTOENCODER_CONFIGS = [clipart_autoencoder, imagenet256_autoencoder, lsun_bedroom_autoencoder]


@pytest.mark.parametrize("module", LATENT_CONFIGS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("arg", ["latents=/data/l", "latents=/data/l,smoke,autoencoder=/ae"])
def test_latent_configs_read_a_latent_dataset_and_skip_likelihood(module, arg):
    config = module.get_config(arg)
    assert config.data.name == "latents" and config.data.path == "/data/l"
    assert config.autoencoder.workdir == ("/ae" if "autoencoder" in arg else None)
    assert config.model.name in models.SIZES
    assert "likelihood" not in config.evaluate.evaluators
    assert "reconstruction" in config.evaluate.evaluators
    assert "generation" in config.evaluate.evaluators


@pytest.mark.parametrize("module", [imagenet256_latent, lsun_bedroom_latent])
def test_paper_latent_configs_need_their_latents(module):
    with pytest.raises(ValueError, match=r":latents=DIR .*apd.encode"):
        module.get_config(None)
    config = module.get_config("latents=/l")
    assert (config.model.name, config.mesh.fsdp, config.levels.name) == (
        "unet-620m",
        8,
        "asyncpatch",
    )
    assert config.model.class_conditional == (module is imagenet256_latent)


@pytest.mark.parametrize("module", AUTOENCODER_CONFIGS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("arg", [None, "smoke", "quantizer=fsq", "quantizer=fsq,smoke"])
def test_autoencoder_configs_build_their_task(module, arg):
    config = module.get_config(arg)
    assert config.task == "autoencoder"
    assert config.data.name in data_lib.NAMES
    kind = config.model.options.quantizer_config["kind"]
    assert kind == ("fsq" if arg and "fsq" in arg else "vq")
    if module is not clipart_autoencoder and not (arg and "smoke" in arg):
        assert config.model.name == "ae-f4-paper" and config.data.image_size == 256
        assert kind != "vq" or config.model.options.quantizer_config["num_codes"] == 8192


def test_a_missing_latent_dataset_stops_before_anything_is_written(tmp_path):
    config = clipart_latent.get_config(f"latents={tmp_path / 'none'},smoke")
    with pytest.raises(FileNotFoundError, match=r"apd\.encode"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_latent_vs_pixel_compares_at_equal_wall_clock_with_one_evaluation():
    pixel = latent_vs_pixel.get_config("space=pixel,steps=100")
    latent = latent_vs_pixel.get_config("space=latent,steps=100,latents=/data/l")
    assert (pixel.data.name, latent.data.name) == ("clipart", "latents")
    assert latent.total_steps == round(100 * latent_vs_pixel.SPEEDUP) != pixel.total_steps
    assert pixel.evaluate.to_dict() == latent.evaluate.to_dict()
    assert pixel.optimizer.to_dict() == latent.optimizer.to_dict()
    # The same level sampler; its patch grids are those of each token grid (64 or 16 wide).
    assert pixel.levels.name == latent.levels.name == "asyncpatch"
    assert pixel.levels.params.delta_max == latent.levels.params.delta_max
    assert pixel.data.global_batch_size == latent.data.global_batch_size
    with pytest.raises(ValueError, match="'voxel'"):
        latent_vs_pixel.get_config("space=voxel")
