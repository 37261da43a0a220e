"""Experiment configs: they build, their arguments are typed, a missing dataset stops early."""

import pytest

from apd import data as data_lib
from apd import models
from apd.training import loop
from experiments import cifar10, clipart, common, fashion_mnist, imagenet64

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
