"""The clip-art dataset (apd.data.clipart): selection, split, decoding, cache, registration,
pipelines and a smoke training run. Most tests read a small tree of real PNG files written in the
Debian package's layout; those marked `needs_package` read the installed package itself."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from apd import data, models
from apd.data import clipart, transforms
from apd.training import checkpoint as checkpoint_lib
from apd.training import loop
from experiments import clipart as clipart_config

needs_package = pytest.mark.skipif(
    not os.path.isdir(clipart.DEFAULT_PATH), reason="Debian package openclipart-png missing"
)

# The tree's special files, beside FILLER random drawings; (relative path, selected).
FLAG = "geography/flag.png"  # RGB 90 x 60, opaque: white bands above and below after padding.
CAT = "animals/cat.png"  # RGBA 120 x 80, transparent but for a 60 x 30 red box (cropped to it).
GHOST = "office/ghost.png"  # RGBA 50 x 50, black at alpha 128 everywhere: grey 127/128 on white.
APPLE = "food/fruit/apple_15.png"  # palette image with a transparent index; in "test".
FACE = "people/face.png"  # grey + alpha (LA), 60 x 60 (the icon themes' size).
SKIPPED = (
    "shapes/stars/star_05pt02step.png",  # a generated star polygon (EXCLUDED)
    "people/tiny.png",  # 20 x 20, under MIN_SIDE
    "people/long.png",  # 500 x 100, more than MAX_ASPECT
    "signs_and_symbols/link.png",  # a symbolic link to CAT
    "animals/notes.txt",  # not a PNG name
)
FILLER = [f"{c}/drawing_{i:02d}.png" for i, c in enumerate(["plants", "tools", "food"] * 12)]


def _save(root, relpath: str, image: Image.Image) -> None:
    path = os.path.join(root, *relpath.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)


def write_tree(root: str) -> str:
    """A small clip-art tree: the special files above and FILLER random RGBA drawings."""
    root = str(root)
    _save(root, FLAG, Image.new("RGB", (90, 60), (40, 120, 200)))
    cat = Image.new("RGBA", (120, 80), (0, 0, 0, 0))
    cat.paste((220, 20, 20, 255), (30, 25, 90, 55))
    _save(root, CAT, cat)
    _save(root, GHOST, Image.new("RGBA", (50, 50), (0, 0, 0, 128)))
    apple = Image.new("P", (70, 70), 0)
    apple.putpalette([0, 0, 0, 30, 160, 30] + [0] * 762)
    apple.paste(1, (10, 10, 60, 60))
    apple.info["transparency"] = 0
    _save(root, APPLE, apple)
    _save(root, FACE, Image.new("LA", (60, 60), (90, 200)))
    _save(root, SKIPPED[0], Image.new("RGBA", (100, 100), (0, 0, 0, 255)))
    _save(root, SKIPPED[1], Image.new("RGBA", (20, 20), (0, 0, 0, 255)))
    _save(root, SKIPPED[2], Image.new("RGBA", (500, 100), (0, 0, 0, 255)))
    link = os.path.join(root, *SKIPPED[3].split("/"))
    os.makedirs(os.path.dirname(link))
    os.symlink(os.path.join("..", "animals", "cat.png"), link)
    with open(os.path.join(root, *SKIPPED[4].split("/")), "w") as f:
        f.write("not an image")
    rng = np.random.default_rng(0)
    for relpath in FILLER:
        width, height = rng.integers(48, 100, 2)
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        _save(root, relpath, Image.fromarray(pixels, "RGBA"))
    return root


SELECTED = sorted([FLAG, CAT, GHOST, APPLE, FACE, *FILLER])


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("clipart"))


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache directory, also the default one (APD_CACHE) for code that takes no path."""
    monkeypatch.setenv("APD_CACHE", str(tmp_path / "apd-cache"))
    return clipart.default_cache_dir()


def test_selection_labels_and_split(tree, cache_dir):
    files = clipart.list_files(tree)
    assert [relpath for relpath, _, _ in files] == SELECTED
    for relpath, size, mtime_ns in files:
        stat = os.stat(os.path.join(tree, relpath))
        assert (size, mtime_ns) == (stat.st_size, stat.st_mtime_ns)

    relpaths, images, labels = clipart.load_all(tree)
    assert relpaths == SELECTED
    assert images.dtype == np.uint8 and images.shape == (len(SELECTED), 64, 64, 3)
    assert labels.dtype == np.int32
    assert [clipart.CATEGORIES[label] for label in labels] == [r.split("/")[0] for r in SELECTED]

    # The split is a function of the relative path alone, disjoint and exhaustive, in path order.
    expected = {s: [r for r in SELECTED if clipart.split_of(r) == s] for s in clipart.SPLITS}
    assert len(expected["test"]) >= 1 and len(expected["train"]) >= 1
    for split in clipart.SPLITS:
        split_images, split_labels = clipart.load(split, tree)
        rows = [SELECTED.index(r) for r in expected[split]]
        np.testing.assert_array_equal(split_images, images[rows])
        np.testing.assert_array_equal(split_labels, labels[rows])
    # Pinned: the rule (SHA-256 of the '/'-separated path, first tenth -> test) must not drift.
    assert [clipart.split_of(r) for r in (FLAG, CAT, GHOST, APPLE, FACE)] == [
        "train",
        "train",
        "train",
        "test",
        "train",
    ]
    assert len(expected["test"]) == 7  # APPLE and 6 of FILLER
    assert clipart.split_of("signs_and_symbols/flags/america/aruba.png") == "test"
    share = np.mean([clipart.split_of(f"x/{i}.png") == "test" for i in range(20000)])
    assert 0.09 < share < 0.11


def test_decode_crops_composites_and_pads_on_white(tree):
    flag = clipart.decode(os.path.join(tree, FLAG))
    assert flag.dtype == np.uint8 and flag.shape == (64, 64, 3)
    # 90 x 60 padded to 90 x 90: the flag spans rows 10.7 to 53.3 of 64 (the Lanczos filter rings
    # up to three rows on either side of an edge).
    assert (flag[:8] == 255).all() and (flag[56:] == 255).all()
    assert (flag[13:51] == (40, 120, 200)).all()

    # Cropped to the opaque 60 x 30 box, which then spans the full width, rows 16 to 48.
    cat = clipart.decode(os.path.join(tree, CAT))
    assert (cat[20:44] == (220, 20, 20)).all()
    assert (cat[:13] == 255).all() and (cat[51:] == 255).all()

    # Black at alpha 128 on white: 255 * (1 - 128/255) = 127.
    ghost = clipart.decode(os.path.join(tree, GHOST))
    assert np.abs(ghost.astype(int) - 127).max() <= 1

    # Palette transparency is honoured: the green square is cropped to and fills the image.
    apple = clipart.decode(os.path.join(tree, APPLE))
    assert (apple == (30, 160, 30)).all()

    # Grey + alpha: 90 at alpha 200 on white = 90 * 200/255 + 255 * 55/255 = 125.6.
    face = clipart.decode(os.path.join(tree, FACE))
    assert np.abs(face.astype(int) - 126).max() <= 1


def test_cache_round_trip_and_invalidation(tmp_path, cache_dir):
    root = write_tree(tmp_path / "tree")
    relpaths, images, labels = clipart.load_all(root)
    files = clipart.list_files(root)
    path = clipart.cache_path(cache_dir, root, files)
    assert os.listdir(cache_dir) == [os.path.basename(path)]  # no temporary file left
    fresh = np.stack([clipart.decode(os.path.join(root, r)) for r in relpaths])
    np.testing.assert_array_equal(images, fresh)

    # A second load reads the cache: an entry altered in the file comes back altered.
    with np.load(path) as cached:
        stored = dict(cached)
    assert str(stored["key"]) and (stored["images"] == fresh).all()
    np.savez(path, **{**stored, "images": 255 - stored["images"]})
    np.testing.assert_array_equal(clipart.load_all(root)[1], 255 - fresh)

    # An unreadable cache file is decoded afresh and replaced.
    with open(path, "wb") as f:
        f.write(b"not an npz")
    np.testing.assert_array_equal(clipart.load_all(root)[1], fresh)
    np.testing.assert_array_equal(clipart.load_all(root)[2], labels)

    # A changed file list (a new file; a file of another size) is a new cache entry.
    _save(root, "animals/new.png", Image.new("RGB", (64, 64), (0, 0, 0)))
    relpaths2, images2, _ = clipart.load_all(root)
    assert relpaths2 == sorted([*relpaths, "animals/new.png"])
    assert (images2[relpaths2.index("animals/new.png")] == 0).all()
    _save(root, FLAG, Image.new("RGB", (120, 60), (200, 10, 10)))
    relpaths3, images3, _ = clipart.load_all(root)
    assert (images3[relpaths3.index(FLAG)][32] == (200, 10, 10)).all()
    # A file rewritten in place with the same byte size: its modification time tells.
    flag = os.path.join(root, FLAG)
    size, mtime_ns = os.stat(flag).st_size, os.stat(flag).st_mtime_ns
    _save(root, FLAG, Image.new("RGB", (120, 60), (10, 200, 10)))
    os.utime(flag, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    assert os.stat(flag).st_size == size
    relpaths4, images4, _ = clipart.load_all(root)
    assert (images4[relpaths4.index(FLAG)][32] == (10, 200, 10)).all()
    assert len(os.listdir(cache_dir)) == 4


def test_missing_or_bad_files_give_clear_errors(tmp_path, cache_dir):
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install openclipart-png"):
        clipart.load("train", absent)
    with pytest.raises(data.DatasetNotFoundError, match=r"is not a directory.*openclipart-png"):
        data.get_source("clipart", "train", path=absent)
    empty = tmp_path / "empty"
    (empty / "animals").mkdir(parents=True)
    with pytest.raises(data.DatasetNotFoundError, match=r"no usable clip-art PNG.*openclipart-png"):
        data.get_source("clipart", "test", path=str(empty))
    with pytest.raises(ValueError, match="unknown clip-art split 'validation'"):
        clipart.load("validation", absent)
    with pytest.raises(ValueError, match="unknown split of clipart 'validation'"):
        data.get_source("clipart", "validation")

    root = write_tree(tmp_path / "tree")
    _save(root, "loose.png", Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match=r"loose\.png' is not in a category folder"):
        clipart.list_files(root)
    os.remove(os.path.join(root, "loose.png"))
    with open(os.path.join(root, "animals", "fake.png"), "w") as f:
        f.write("this is text, not a PNG file")
    with pytest.raises(ValueError, match=r"fake\.png' is not a PNG file"):
        clipart.list_files(root)
    with open(os.path.join(root, FLAG), "rb") as f:
        head = f.read(40)
    with open(os.path.join(root, "animals", "fake.png"), "wb") as f:
        f.write(head)  # a valid header, truncated data
    with pytest.raises(ValueError, match=r"cannot decode the clip-art image .*fake\.png"):
        clipart.load("train", root)
    assert not os.path.exists(cache_dir)  # nothing cached from a failed decode


def test_registered_source_and_pipelines(tree, cache_dir):
    assert "clipart" in data.NAMES
    assert data.dataset_info("clipart") == ((64, 64, 3), clipart.NUM_CLASSES)
    assert clipart.NUM_CLASSES == 22
    train = data.get_source("clipart", "train", path=tree)
    test = data.get_source("clipart", "test", path=tree)
    assert len(train) + len(test) == len(SELECTED)
    record = test[0]
    assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
    assert 0 <= record["label"] < clipart.NUM_CLASSES

    batches = data.make_dataset(
        train, global_batch_size=8, seed=0, process_index=0, process_count=1
    )
    for _ in range(len(train) // 8 + 1):  # past one epoch
        batch = next(batches)
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 64, 64, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert ((batch["label"] >= 0) & (batch["label"] < clipart.NUM_CLASSES)).all()
    evaluation = data.make_eval_dataset(test, global_batch_size=4, process_index=0, process_count=1)
    first = evaluation[0]
    assert first["image"].shape == (4, 64, 64, 3) and int(first["mask"].sum()) == min(4, len(test))
    np.testing.assert_array_equal(first["image"][0], transforms.to_float(test[0]["image"]))


def test_train_smoke_runs_two_steps(tree, cache_dir, tmp_path):
    config = clipart_config.get_config("smoke")
    assert config.data.name == "clipart" and config.model.name == "unet-tiny"
    config.data.path = tree
    config.total_steps = 2
    workdir = str(tmp_path / "run")
    result = loop.train_and_evaluate(config, workdir)
    assert result["step"] == 2
    manager = ocp.CheckpointManager(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR))
    assert manager.latest_step() == 2
    manager.close()
    records = list(loop.metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    assert any(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_default_config_and_its_unet():
    config = clipart_config.get_config()
    assert (config.data.name, config.data.image_size, config.data.random_flip) == (
        "clipart",
        None,
        False,
    )
    assert config.levels.params.patch_sizes[-1] == 64  # the level grid is the 64 x 64 pixels
    assert config.model.options.to_dict() == clipart_config.UNET_SMALL_64
    count = models.param_count(
        config.model.name,
        (64, 64, 3),
        num_classes=clipart.NUM_CLASSES,
        **clipart_config.UNET_SMALL_64,
    )
    assert 0.85e6 < count < 0.95e6  # as unet-small on Fashion-MNIST
    assert clipart_config.get_config("size=unet-60m").model.options.to_dict() == {}


@needs_package
def test_installed_package_sizes_and_a_known_file():
    files = clipart.list_files()
    splits = [clipart.split_of(relpath) for relpath, _, _ in files]
    assert (len(files), splits.count("train"), splits.count("test")) == (5455, 4951, 504)
    assert {relpath.split("/")[0] for relpath, _, _ in files} == set(clipart.CATEGORIES)
    # Aruba's flag, 324 x 216 opaque RGB, padded to a square: white bands above and below.
    relpath = "signs_and_symbols/flags/america/aruba.png"
    assert relpath in [r for r, _, _ in files] and clipart.split_of(relpath) == "test"
    aruba = clipart.decode(os.path.join(clipart.DEFAULT_PATH, relpath))
    assert (aruba[:8] == 255).all() and (aruba[56:] == 255).all()
    assert (np.abs(aruba[32, :8].astype(int) - (51, 153, 204)) <= 2).all()
