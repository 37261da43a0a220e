"""The one training loop serves any task (`apd.training.tasks`): a toy task that is not a diffusion
model trains, checkpoints, resumes exactly and visualises through `loop.train_and_evaluate`."""

import os

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train import restore_state, smoke_config

from apd.training import builder, loop, optim, tasks
from apd.training import state as state_lib


class _Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class ToyClassification:
    """Logistic regression on the images' labels: a model with no levels, noise or sampler."""

    def __init__(self):
        self.visualised: list[int] = []

    def check(self, config, image_shape, num_classes):
        if num_classes != 10:
            raise ValueError(f"the toy task needs 10 classes; got {num_classes}.")

    def build(self, config, mesh, image_shape, num_classes):
        model = _Classifier()
        tx = optim.make(config.optimizer, config.total_steps)

        def init_fn(key):
            params = model.init(key, jnp.zeros((1, *image_shape)))["params"]
            return state_lib.TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                ema_params=params,
                opt_state=tx.init(params),
                rng=jax.random.key_data(key),
            )

        def step_fn(state, batch):
            def loss_fn(params):
                logits = model.apply({"params": params}, batch["image"])
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits, batch["label"]
                ).mean()

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state_lib.update_ema(state.ema_params, params, 0.9)
            metrics = {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
                "param_norm": optax.tree.norm(params),
                "ema_norm": optax.tree.norm(ema),
            }
            new = state.replace(step=state.step + 1, params=params, ema_params=ema)
            return new.replace(opt_state=opt_state), metrics

        abstract = jax.eval_shape(init_fn, jax.random.key(0))
        description = builder.model_description({"name": "toy"}, abstract.params)
        return builder.assemble(config, mesh, model, init_fn, step_fn, abstract, description)

    def visualiser(self, config, prepared):
        def visualise(state, step, workdir):
            self.visualised.append(step)

        return visualise


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.fixture
def toy():
    task = ToyClassification()
    tasks.register("toy_classification", task)
    yield task
    del tasks.TASKS["toy_classification"]


def _config(data_path, total_steps):
    config = smoke_config(data_path, total_steps=total_steps, sample_every_steps=2)
    config.unlock()
    config.task = "toy_classification"
    return config


def test_a_non_diffusion_task_trains_and_resumes_exactly(toy, data_path, tmp_path):
    straight = str(tmp_path / "straight")
    result = loop.train_and_evaluate(_config(data_path, 6), straight)
    assert result["step"] == 6 and np.isfinite(result["loss"])
    assert toy.visualised == [2, 4, 6]
    resumed = str(tmp_path / "resumed")
    loop.train_and_evaluate(_config(data_path, 4), resumed)
    loop.train_and_evaluate(_config(data_path, 6), resumed)
    (_, a), (_, b) = restore_state(straight), restore_state(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # The toy model's checkpoint is not a diffusion model's: a diffusion config refuses it.
    with pytest.raises(ValueError, match="model"):
        loop.prepare(smoke_config(data_path), straight)
    assert os.path.exists(os.path.join(straight, "config.json"))


def test_unknown_task_is_refused(data_path, tmp_path):
    config = _config(data_path, 2)
    config.task = "diffusionn"
    with pytest.raises(ValueError, match=r"config.task.*'diffusion'"):
        loop.prepare(config, str(tmp_path / "run"))
