"""Tests of apd.data: IDX parsing, sources, and the grain training and evaluation pipelines."""

import gzip
import os
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from apd import data
from apd.data import fashion_mnist, transforms

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    dims = np.asarray(array.shape, ">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, payload: bytes, gz: bool) -> str:
    path = f"{path}.gz" if gz else str(path)
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return path


def _write_fashion_mnist(directory, num: int, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (num,), dtype=np.uint8)
    _write(directory / "t10k-images-idx3-ubyte", _idx_bytes(images), gz)
    _write(directory / "t10k-labels-idx1-ubyte", _idx_bytes(labels), gz)
    return images, labels


def _indexed_source(num: int, height: int = 4, width: int = 4) -> data.ArraySource:
    """Record i has label i and an image whose left column is brighter than its right one."""
    ramp = np.linspace(255, 0, width).astype(np.uint8)
    images = np.broadcast_to(ramp[None, None, :, None], (num, height, width, 1)).copy()
    images[:, 0, 0, 0] = np.arange(num) % 256
    return data.ArraySource(images, np.arange(num))


def _labels(iterator, num_batches: int) -> list[np.ndarray]:
    return [next(iterator)["label"] for _ in range(num_batches)]


# ---------------------------------------------------------------------------------------------
# IDX files.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32])
def test_read_idx_round_trips_values_and_shape(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) * 37 - 50).astype(dtype).reshape(2, 3, 5)
    path = _write(tmp_path / "x-idx3-ubyte", _idx_bytes(array), gz)
    got = fashion_mnist.read_idx(path)
    assert got.shape == (2, 3, 5) and got.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(got, array)


def test_load_synthetic_split(tmp_path):
    images, labels = _write_fashion_mnist(tmp_path, num=7, gz=False)
    got_images, got_labels = fashion_mnist.load("test", str(tmp_path))
    assert got_images.shape == (7, 28, 28, 1) and got_images.dtype == np.uint8
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x00\x01" + b[2:], "bad magic number"),  # Non-zero leading bytes.
        (lambda b: b[:2] + b"\x42" + b[3:], "bad magic number"),  # Unknown dtype code.
        (lambda b: b[:-5], "truncated IDX file"),
        (lambda b: b + b"\x00", "corrupt IDX file"),
        (lambda b: b[:6], "truncated IDX file"),  # Cut inside the dimensions.
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, match, gz):
    payload = mutate(_idx_bytes(np.zeros((3, 4, 4), np.uint8)))
    path = _write(tmp_path / "bad-idx3-ubyte", payload, gz)
    with pytest.raises(ValueError, match=match):
        fashion_mnist.read_idx(path)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        fashion_mnist.read_idx(str(path))


def test_load_rejects_mismatched_labels_and_unknown_split(tmp_path):
    _write_fashion_mnist(tmp_path, num=4)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros((3,), np.uint8)), gz=True)
    with pytest.raises(ValueError, match="one label per image"):
        fashion_mnist.load("test", str(tmp_path))
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(np.full((4,), 10, np.uint8)), gz=True)
    with pytest.raises(ValueError, match=r"labels in \[0, 9\]"):
        fashion_mnist.load("test", str(tmp_path))
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        fashion_mnist.load("val", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist missing")
def test_real_fashion_mnist_files():
    for split, num in [("train", 60000), ("test", 10000)]:
        source = data.get_source("fashion_mnist", split)
        assert len(source) == num
        record = source[num - 1]
        assert record["image"].shape == data.dataset_info("fashion_mnist")[0]
        assert record["image"].dtype == np.uint8
    images, labels = fashion_mnist.load("train")
    # Fashion-MNIST is balanced: 6000 training images per class, labels 0..9.
    np.testing.assert_array_equal(np.bincount(labels, minlength=11), [6000] * 10 + [0])
    assert 60 < images.mean() < 80  # Mostly dark background; a garbled file would not be.


# ---------------------------------------------------------------------------------------------
# Sources and the registry.
# ---------------------------------------------------------------------------------------------


def test_fashion_mnist_source_from_path(tmp_path):
    images, labels = _write_fashion_mnist(tmp_path, num=5)
    source = data.get_source("fashion_mnist", "test", path=str(tmp_path))
    assert len(source) == 5
    np.testing.assert_array_equal(source[3]["image"][..., 0], images[3])
    assert source[3]["label"] == labels[3]


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.get_source("fashion_mnist", "train", path=str(tmp_path / "nowhere"))
    # The default directory missing and no TFDS copy: both ways to get it are named.
    monkeypatch.setattr(fashion_mnist, "DEFAULT_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_source("fashion_mnist", "train", data_dir=str(tmp_path))
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "--config.data.path" in str(e.value) and str(tmp_path) in str(e.value)


def test_dataset_info():
    assert data.dataset_info("fashion_mnist") == ((28, 28, 1), 10)
    assert data.dataset_info("cifar10") == ((32, 32, 3), 10)
    assert data.dataset_info("imagenet2012", image_size=64) == ((64, 64, 3), 1000)
    assert data.dataset_info("lsun/bedroom", image_size=64) == ((64, 64, 3), 0)
    with pytest.raises(ValueError, match="varying size; pass image_size"):
        data.dataset_info("imagenet2012")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        data.dataset_info("mnist")


def test_get_source_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown split of cifar10 'validation'"):
        data.get_source("cifar10", "validation")
    with pytest.raises(ValueError, match="applies to fashion_mnist and clipart only"):
        data.get_source("cifar10", "train", path="/tmp")


def _fake_prepared(data_dir, name: str, version: str, files: list[str]):
    """The files `tfds build` leaves behind (their contents are mocked by tfds.testing)."""
    variant = data_dir.joinpath(*name.split("/"), version)
    variant.mkdir(parents=True)
    for file in ["dataset_info.json", *files]:
        (variant / file).write_text("{}")


def test_tfds_source_with_mock_data(tmp_path):
    _fake_prepared(tmp_path, "cifar10", "3.0.2", ["cifar10-train.array_record-00000-of-00001"])
    with tfds.testing.mock_data(num_examples=12):
        source = data.get_source("cifar10", "train", data_dir=str(tmp_path))
        assert len(source) == 12
        record = source[5]
        assert set(record) == {"image", "label"}
        assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
        assert isinstance(record["label"], int) and 0 <= record["label"] < 10
        batches = data.make_dataset(
            source, global_batch_size=4, seed=0, process_index=0, process_count=1
        )
        batch = next(batches)
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32


def test_tfds_source_without_labels_gets_label_zero():
    image = np.full((3, 5, 3), 7, np.uint8)
    source = data.TfdsSource([{"image": image}] * 2, labelled=False)
    assert len(source) == 2 and source[1]["label"] == 0
    np.testing.assert_array_equal(source[1]["image"], image)


@pytest.mark.parametrize(
    "name, split, extra",
    [
        ("cifar10", "train", ""),
        ("imagenet2012", "validation", "downloads/manual"),
        ("lsun/bedroom", "train", ""),
    ],
)
def test_missing_tfds_dataset_fails_fast_with_build_command(tmp_path, name, split, extra):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_source(name, split, data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5.0  # No download attempt (that would take minutes).
    message = str(e.value)
    assert f"tfds build {name} --data_dir={tmp_path} --file_format=array_record" in message
    assert repr(name) in message and extra in message


def test_tfds_dataset_prepared_as_tfrecord_is_reported(tmp_path):
    _fake_prepared(tmp_path, "cifar10", "3.0.2", ["cifar10-train.tfrecord-00000-of-00001"])
    with pytest.raises(data.DatasetNotFoundError, match="another file format"):
        data.get_source("cifar10", "train", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Transforms.
# ---------------------------------------------------------------------------------------------


def test_to_float_maps_uint8_onto_minus_one_one():
    pixels = np.arange(256, dtype=np.uint8)
    got = transforms.to_float(pixels)
    assert got.dtype == np.float32 and got[0] == -1.0 and got[255] == 1.0
    np.testing.assert_allclose(got, pixels / 127.5 - 1.0, atol=1e-6)
    latents = np.linspace(-3.0, 3.0, 7, dtype=np.float32)
    assert transforms.to_float(latents) is latents  # float latents pass through unchanged
    with pytest.raises(ValueError, match="expects uint8"):
        transforms.to_float(pixels.astype(np.int32))


def test_center_crop_resize_keeps_the_centre():
    # 8 x 16: dark quarters left and right, a bright centre half.
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, 4:12] = 255
    got = transforms.center_crop_resize(image, 4)
    assert got.shape == (4, 4, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, 255)
    # Portrait grayscale: the output is square and a constant image stays constant.
    got = transforms.center_crop_resize(np.full((30, 20, 1), 9, np.uint8), 7)
    assert got.shape == (7, 7, 1)
    np.testing.assert_array_equal(got, 9)
    square = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
    assert transforms.center_crop_resize(square, 4) is square


# ---------------------------------------------------------------------------------------------
# Training pipeline.
# ---------------------------------------------------------------------------------------------


def test_batches_shapes_dtypes_and_range():
    source = _indexed_source(32)
    batch = next(
        data.make_dataset(source, global_batch_size=8, seed=0, process_index=0, process_count=1)
    )
    assert batch["image"].shape == (8, 4, 4, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    # The pixels are the source's, scaled: pixel (0, 0) of record i is i.
    np.testing.assert_allclose(batch["image"][:, 0, 0, 0], batch["label"] / 127.5 - 1, atol=1e-6)


def test_stream_is_deterministic_per_seed_and_reshuffles_each_epoch():
    source = _indexed_source(32)

    def stream(seed):
        it = data.make_dataset(
            source, global_batch_size=8, seed=seed, process_index=0, process_count=1
        )
        return np.concatenate(_labels(it, 8))  # Two epochs.

    first, again, other = stream(1), stream(1), stream(2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    for epoch in (first[:32], first[32:]):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(32))  # Each epoch: a permutation.
    assert not np.array_equal(first[:32], first[32:])
    assert not np.array_equal(first[:32], np.arange(32))


def test_unshuffled_stream_is_in_order():
    it = data.make_dataset(
        _indexed_source(12),
        global_batch_size=8,
        seed=0,
        shuffle=False,
        process_index=0,
        process_count=1,
    )
    np.testing.assert_array_equal(np.concatenate(_labels(it, 3)), np.arange(24) % 12)


def test_two_processes_split_each_global_batch():
    source = _indexed_source(48)
    single = data.make_dataset(
        source, global_batch_size=8, seed=5, process_index=0, process_count=1
    )
    shards = [
        data.make_dataset(source, global_batch_size=8, seed=5, process_index=i, process_count=2)
        for i in range(2)
    ]
    seen = []
    for _ in range(6):  # One epoch.
        expected = next(single)["label"]
        parts = [next(shard)["label"] for shard in shards]
        assert all(part.shape == (4,) for part in parts)
        # Process p holds rows [4p, 4p + 4) of the global batch, in order.
        np.testing.assert_array_equal(np.concatenate(parts), expected)
        seen.extend(np.concatenate(parts))
    np.testing.assert_array_equal(np.sort(seen), np.arange(48))


def test_finite_epochs_drop_the_remainder():
    it = data.make_dataset(
        _indexed_source(21),
        global_batch_size=8,
        seed=0,
        num_epochs=2,
        process_index=1,
        process_count=2,
    )
    batches = list(it)
    assert len(batches) == 42 // 8 and all(b["label"].shape == (4,) for b in batches)


def test_random_flip_is_a_fair_coin_per_record_and_epoch():
    source = _indexed_source(200)

    def flipped(random_flip):
        it = data.make_dataset(
            source,
            global_batch_size=100,
            seed=3,
            random_flip=random_flip,
            process_index=0,
            process_count=1,
        )
        batches = [next(it) for _ in range(4)]  # Two epochs.
        labels = np.concatenate([b["label"] for b in batches])
        images = np.concatenate([b["image"] for b in batches])
        is_flipped = images[:, 1, 0, 0] < images[:, 1, -1, 0]  # The ramp now rises to the right.
        return labels, is_flipped

    _, never = flipped(False)
    assert not never.any()
    labels, is_flipped = flipped(True)
    # 400 fair coins: 200 +- 10 (sd); 5 sd bounds.
    assert 150 < is_flipped.sum() < 250
    by_record = np.zeros((2, 200), bool)
    for epoch in range(2):
        by_record[epoch, labels[epoch * 200 : (epoch + 1) * 200]] = is_flipped[
            epoch * 200 : (epoch + 1) * 200
        ]
    disagree = (by_record[0] != by_record[1]).mean()  # Fresh coins each epoch: about 1/2.
    assert 0.3 < disagree < 0.7


def test_image_size_crops_and_resizes():
    images = np.zeros((6, 6, 10, 3), np.uint8)
    images[:, :, 2:8] = 200
    source = data.ArraySource(images, np.zeros(6, np.int64))
    batch = next(
        data.make_dataset(
            source, global_batch_size=2, seed=0, image_size=3, process_index=0, process_count=1
        )
    )
    assert batch["image"].shape == (2, 3, 3, 3)
    np.testing.assert_allclose(batch["image"], 200 / 127.5 - 1, atol=1e-6)


def test_iterator_state_resumes_the_identical_stream():
    source = _indexed_source(40)
    kwargs = dict(global_batch_size=8, seed=11, random_flip=True, process_index=0, process_count=1)
    it = data.make_dataset(source, **kwargs)
    _labels(it, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]  # Crosses an epoch boundary.
    resumed = data.make_dataset(source, **kwargs)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_orbax_checkpoint_restores_the_identical_stream(tmp_path):
    source = _indexed_source(40)
    kwargs = dict(global_batch_size=8, seed=4, random_flip=True, process_index=0, process_count=1)
    it = data.make_dataset(source, **kwargs)
    _labels(it, 2)
    params = {"w": np.arange(6.0, dtype=np.float32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(
            2,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), data=data.checkpoint_save_args(it)
            ),
        )
        manager.wait_until_finished()
    expected = _labels(it, 6)
    fresh = data.make_dataset(source, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 2
        restored = manager.restore(
            2,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params), data=data.checkpoint_restore_args(fresh)
            ),
        )
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    assert restored["data"] is fresh
    for want, got in zip(expected, _labels(fresh, 6), strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_batch_and_process_arguments():
    source = _indexed_source(8)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.make_dataset(source, global_batch_size=8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="0 <= process_index < process_count"):
        data.make_dataset(source, global_batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="image_size must be None or a positive integer"):
        data.make_dataset(
            source, global_batch_size=8, seed=0, image_size=0, process_index=0, process_count=1
        )
    with pytest.raises(ValueError, match="num_epochs"):
        data.make_dataset(
            source, global_batch_size=8, seed=0, num_epochs=0, process_index=0, process_count=1
        )


# ---------------------------------------------------------------------------------------------
# Evaluation pipeline.
# ---------------------------------------------------------------------------------------------


def test_eval_dataset_is_one_ordered_padded_pass():
    source = _indexed_source(10)
    ds = data.make_eval_dataset(source, global_batch_size=4, process_index=0, process_count=1)
    batches = list(ds)
    assert len(ds) == len(batches) == 3
    assert all(b["image"].shape == (4, 4, 4, 1) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, np.arange(12) < 10)
    np.testing.assert_array_equal(labels[mask], np.arange(10))
    np.testing.assert_array_equal(batches[-1]["image"][2:], -1.0)  # Padding: black images.
    assert len(list(ds)) == 3  # Re-iterable.


def test_eval_dataset_over_two_processes_counts_each_example_once():
    source = _indexed_source(10)
    parts = [
        list(
            data.make_eval_dataset(
                source, global_batch_size=4, num_examples=7, process_index=i, process_count=2
            )
        )
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 2
    assert all(b["label"].shape == (2,) for part in parts for b in part)
    valid = [b["label"][b["mask"]] for part in parts for b in part]
    np.testing.assert_array_equal(np.sort(np.concatenate(valid)), np.arange(7))
