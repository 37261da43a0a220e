"""Plan constructors, validation and the `show` command."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from apd import plans


def full(plan: plans.Plan) -> np.ndarray:
    return np.broadcast_to(np.asarray(plan.levels), (plan.steps + 1, *plan.shape))


def steps_taken(plan: plans.Plan) -> np.ndarray:
    """[B, *tokens]: the number of steps in which each token's level changes."""
    lv = full(plan)
    return np.sum(lv[1:] != lv[:-1], axis=0)


def test_synchronous():
    plan = plans.synchronous(10, 3, (4, 6))
    plans.validate(plan)
    assert plan.steps == 10 and plan.shape == (3, 4, 6)
    assert plan.levels.shape == (11, 1, 1, 1)  # broadcast, not stored per token
    np.testing.assert_allclose(full(plan)[:, 1, 2, 3], 1 - np.arange(11) / 10, atol=1e-7)
    assert full(plan)[0].min() == 1.0 and full(plan)[-1].max() == 0.0
    assert plan.update.all()
    np.testing.assert_array_equal(plan.at(4), np.full((3, 4, 6), 0.6, np.float32))


def test_inpaint():
    mask = np.zeros((2, 4, 4), np.float32)
    mask[0, :2] = 1
    mask[1, :, 3] = 1
    plan = plans.inpaint(mask, 8)
    plans.validate(plan)
    lv = full(plan)
    assert np.all(lv[:, mask == 1] == 0.0)  # known tokens clean throughout
    np.testing.assert_array_equal(plan.update, mask == 0)
    np.testing.assert_allclose(
        lv[:, mask == 0],
        np.broadcast_to((1 - np.arange(9) / 8)[:, None], (9, int((mask == 0).sum()))),
    )
    plans.validate(plans.inpaint(mask.astype(bool), 3))
    with pytest.raises(ValueError, match="only 0"):
        plans.inpaint(mask * 0.5, 8)


def test_edit():
    strength = np.array([[[0.0, 0.3], [0.7, 1.0]]], np.float32)
    plan = plans.edit(strength, 5)
    plans.validate(plan)
    lv = full(plan)
    np.testing.assert_array_equal(lv[0], strength)
    assert np.all(lv[-1] == 0.0)
    np.testing.assert_array_equal(plan.update, strength > 0)
    np.testing.assert_allclose(lv[2], strength * 0.6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"edit strength must lie in \[0, 1\]"):
        plans.edit(strength + 0.5, 5)


def test_autoregressive_raster_is_the_papers_schedule():
    """8 x 8 patches of a 64 x 64 grid, 16 steps each: 1024 steps; group r active on its window."""
    plan = plans.autoregressive(64, 2, 8, 16)
    plans.validate(plan)
    assert plan.steps == 1024 and plan.levels.shape == (1025, 1, 64, 64)
    lv = full(plan)[:, 0]
    for rank, (pi, pj) in [(0, (0, 0)), (1, (0, 1)), (9, (1, 1)), (63, (7, 7))]:
        token = lv[:, pi * 8 + 3, pj * 8 + 5]
        window = slice(rank * 16, rank * 16 + 17)
        assert np.all(token[: rank * 16 + 1] == 1.0)  # pure noise before its window
        np.testing.assert_allclose(token[window], 1 - np.arange(17) / 16, atol=1e-6)
        assert np.all(token[rank * 16 + 16 :] == 0.0)  # clean after it
    # Exactly one group moves at each step; every token takes 16 steps.
    assert np.all(steps_taken(plan) == 16)
    moving = (lv[1:] != lv[:-1]).reshape(1024, 8, 8, 8, 8).any(axis=(2, 4))
    assert np.all(moving.sum(axis=(1, 2)) == 1)


def test_autoregressive_overlap_and_orders():
    plan = plans.autoregressive((6, 4), 3, 2, 10, overlap=4)  # 4 groups, stride 6
    plans.validate(plan)
    assert plan.steps == 3 * 6 + 10
    lv = full(plan)[:, 0]
    # Group 1 (top-right patch) starts 6 steps after group 0 and overlaps it for 4 steps.
    np.testing.assert_allclose(lv[6:17, 0, 3], 1 - np.arange(11) / 10, atol=1e-6)
    assert np.all(lv[:7, 0, 3] == 1.0)
    both = (lv[1:, 0, 0] != lv[:-1, 0, 0]) & (lv[1:, 0, 3] != lv[:-1, 0, 3])
    assert both.sum() == 4

    plan = plans.autoregressive(8, 5, 2, 3, order="random", key=jax.random.key(0))
    plans.validate(plan)
    assert plan.levels.shape == (13, 5, 8, 8)
    # Each sample visits its 4 patches once each, in its own order.
    finish = np.argmax(full(plan) == 0.0, axis=0)[:, ::4, ::4].reshape(5, 4)
    assert all(sorted(row) == [3, 6, 9, 12] for row in finish.tolist())
    assert len({tuple(row) for row in finish.tolist()}) > 1

    order = jnp.array([3, 2, 1, 0])
    plan = plans.autoregressive(4, 1, 2, 2, order=order)
    assert full(plan)[2, 0, 3, 3] == 0.0 and full(plan)[2, 0, 0, 0] == 1.0
    with pytest.raises(ValueError, match="not a permutation"):
        plans.autoregressive(4, 1, 2, 2, order=jnp.array([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        plans.autoregressive(4, 1, 2, 2, order="random")
    with pytest.raises(ValueError, match="overlap"):
        plans.autoregressive(4, 1, 2, 2, overlap=2)


@pytest.mark.parametrize("align", ["end", "start"])
def test_adaptive(align):
    difficulty = jnp.array([[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.1, 0.2]]])
    start = jnp.array([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [1.0, 1.0]]])
    plan = plans.adaptive(lambda s: difficulty, (4, 12), start, align=align)
    plans.validate(plan)
    n = np.round(4 + 8 * np.asarray(difficulty))
    assert plan.steps == 12  # max n_i: the network calls
    np.testing.assert_array_equal(steps_taken(plan), np.where(start > 0, n, 0))
    np.testing.assert_array_equal(plan.update, start > 0)
    lv = full(plan)
    np.testing.assert_array_equal(lv[0], start)
    assert np.all(lv[-1] == 0.0)
    if align == "end":
        # Every updated token of an image still moving at the image's last step (its largest
        # n_i: 12 for the first image, 6 for the second).
        for b, last in enumerate([12, 6]):
            assert np.all(lv[last - 1, b][start[b] > 0] > 0) and np.all(lv[last, b] == 0)
    else:
        assert np.all(lv[4][np.asarray(n) == 4] == 0)  # easy tokens already clean
    # An easy batch (absolute difficulty < 1 everywhere) needs fewer calls.
    easy = plans.adaptive(lambda s: 0.5 * difficulty, (4, 12), jnp.ones((2, 2, 2)))
    assert easy.steps == 8
    with pytest.raises(ValueError, match="difficulty"):
        plans.adaptive(lambda s: difficulty + 1, (4, 12), start)
    with pytest.raises(ValueError, match="n_max"):
        plans.adaptive(lambda s: difficulty, (4, 2), start)


def test_difficulty_from_log_error():
    log_error = jnp.array([[[-3.0, -1.0], [0.0, 5.0]]])
    update = jnp.array([[[True, True], [True, False]]])
    d = plans.difficulty_from_log_error(log_error, update)
    np.testing.assert_allclose(d, [[[0.0, 2 / 3], [1.0, 0.0]]], rtol=1e-6)
    d = plans.difficulty_from_log_error(log_error, update, low=-2.0, high=2.0)
    np.testing.assert_allclose(d, [[[0.0, 0.25], [0.5, 0.0]]])


def test_from_array_and_validate():
    levels = np.array([[[1.0, 0.0]], [[0.5, 0.0]], [[0.0, 0.0]]], np.float32)  # [3, 1, 2]
    plan = plans.from_array(levels)
    np.testing.assert_array_equal(plan.update, [[True, False]])

    def bad(lv, update=None, match=""):
        with pytest.raises(ValueError, match=match):
            plans.from_array(np.asarray(lv, np.float32), update)

    bad([[[1.0, 0.0]], [[1.2, 0.0]], [[0.0, 0.0]]], match=r"\[0, 1\].*1\.2.*step 1, token \(0, 0\)")
    bad([[[1.0, 0.0]], [[np.nan, 0.0]], [[0.0, 0.0]]], match="finite")
    bad([[[1.0, 0.0]], [[0.4, 0.0]], [[0.5, 0.0]]], match="non-increasing.*step 2, token")
    bad(
        [[[1.0, 0.0]], [[0.5, 0.0]], [[0.1, 0.0]]], match="end at level 0.*step 2, token \\(0, 0\\)"
    )
    bad(
        [[[1.0, 0.5]], [[0.5, 0.5]], [[0.0, 0.0]]],
        [[True, False]],
        match="constant.*token \\(0, 1\\)",
    )
    bad([[[1.0, 0.0]], [[0.0, 0.0]]], [[True, False, True]], match="do not fit")
    bad([[[1.0, 0.0]]], match="S >= 1")
    with pytest.raises(ValueError, match="boolean"):
        plans.validate(plans.Plan(jnp.asarray(levels), jnp.ones((1, 2), jnp.float32)))
    with pytest.raises(ValueError, match="grid"):
        plans.synchronous(4, 1, 0)
    with pytest.raises(ValueError, match="steps"):
        plans.synchronous(0, 1, 4)


def test_plan_is_a_pytree_under_jit():
    traces = []

    @jax.jit
    def mean_levels(p):
        traces.append(p.steps)
        return jnp.stack([p.at(k).mean() for k in range(p.steps + 1)])

    plan = plans.inpaint(np.eye(4, dtype=np.float32)[None], 6)
    np.testing.assert_allclose(mean_levels(plan), full(plan).mean(axis=(1, 2, 3)), rtol=1e-6)
    # Compact: update, scale, start and ramp are traced leaves; S and the kind are static.
    assert len(jax.tree_util.tree_leaves(plan)) == 4
    other = plans.inpaint(1.0 - np.eye(4, dtype=np.float32)[None], 6)  # new mask, same shapes
    np.testing.assert_allclose(mean_levels(other), full(other).mean(axis=(1, 2, 3)), rtol=1e-6)
    assert traces == [6]
    materialised = plans.from_array(plan.levels, plan.update)
    assert len(jax.tree_util.tree_leaves(materialised)) == 2
    np.testing.assert_array_equal(mean_levels(materialised), mean_levels(plan))


@pytest.mark.parametrize(
    "make",
    [
        lambda: plans.synchronous(7, 2, (3, 5)),
        lambda: plans.inpaint(np.tri(4, dtype=np.float32)[None].repeat(2, 0), 5),
        lambda: plans.edit(np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4), 6),
        lambda: plans.autoregressive((4, 6), 2, 2, 5, overlap=3),
        lambda: plans.autoregressive(4, 3, 2, 3, order="random", key=jax.random.key(1)),
    ],
    ids=["synchronous", "inpaint", "edit", "autoregressive", "autoregressive-random"],
)
def test_compact_plans_store_no_field_and_match_it_step_by_step(make):
    plan = make()
    plans.validate(plan)
    assert plan.compact and plan.stored is None
    stored = sum(leaf.size for leaf in jax.tree_util.tree_leaves(plan))
    assert stored <= 3 * int(np.prod(plan.shape)) + plan.steps + 1  # no [S + 1, ...] array
    field = full(plan)
    at = jax.jit(lambda p, k: p.at(k))
    for k in range(plan.steps + 1):
        assert np.array_equal(np.asarray(plan.at(k)), field[k])
        assert np.array_equal(np.asarray(at(plan, k)), field[k])
    plans.validate(plans.from_array(plan.levels, plan.update))


def test_validate_checks_compact_plans_without_a_field():
    good = plans.inpaint(np.tri(4, dtype=np.float32)[None], 5)  # known: the lower triangle

    def bad(match, **changes):
        with pytest.raises(ValueError, match=match):
            plans.validate(dataclasses.replace(good, **changes))

    bad(r"non-increasing; ramp\[2\] = 0\.75 after 0\.5", ramp=jnp.array([1, 0.5, 0.75, 0, 0, 0]))
    bad(r"ramp.*\[0, 1\]", ramp=jnp.array([1.5, 0.5, 0.0]))
    bad(r"scale .*got 1\.5 at token \(0, 0, 1\)", scale=good.scale.at[0, 0, 1].set(1.5))
    bad(
        r"end at level 0; level 0\.25 at step 5, token \(0, 0, 1\)",
        ramp=jnp.linspace(1.0, 0.25, 6),
    )
    bad(r"constant level.*step 5, token \(0, 0, 0\)", scale=good.scale.at[0, 0, 0].set(0.5))
    bad(r"end at level 0.*step 5", start=good.start + 1)  # the ramp would finish after step S
    bad("scale of shape", scale=jnp.ones((2, 4, 4)))
    bad("start must be integer", start=good.start.astype(jnp.float32))
    bad("num_steps", num_steps=0)


@pytest.mark.parametrize(
    "args",
    [
        ["--plan=synchronous"],
        ["--plan=inpaint"],
        ["--plan=edit"],
        ["--plan=autoregressive", "--patches=2", "--overlap=2", "--order=random"],
        ["--plan=adaptive", "--align=start"],
    ],
)
def test_show_writes_a_strip(tmp_path, args):
    out = tmp_path / "plan.png"
    plans.main(["show", *args, "--grid=16", "--steps=8", "--columns=5", f"--out={out}"])
    image = Image.open(out)
    assert image.size[0] > 3 * image.size[1]  # a horizontal strip, one column per shown step
    pixels = np.asarray(image.convert("L"), np.float32)
    assert pixels.std() > 10  # not blank
