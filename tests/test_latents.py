"""The latent codec (apd.latents), the encoder binary (apd.encode) and the `latents` data source.

The autoencoder is the smoke config's tiny one (experiments/clipart_autoencoder.py:smoke) on the
small clip-art tree of tests/test_clipart.py, with host-drawn parameters saved as a checkpoint
the way the training loop saves one (`save_checkpoint`). One
library encode of both splits (train with its flips, shards of 8 images) is the reference the
other encodes (resumed, two processes, the binary) are compared with, byte for byte.
"""

import json
import os
import shutil

import helpers
import jax
import numpy as np
import pytest

from apd import cli, encode, latents
from apd import data as data_lib
from apd.data import latents as latents_data
from apd.data import transforms
from apd.training import checkpoint as checkpoint_lib
from apd.training import loop
from experiments import clipart_autoencoder, fashion_mnist

SHARD_SIZE = 8
BATCH = 4  # with flips, encoder calls of 8 images: one compilation for every encode here


def save_checkpoint(config, workdir: str, seed: int = 0) -> None:
    """A checkpoint at step 0 of the run `config` describes, with its config.json, saved the way
    the training loop saves one (`loop.prepare`, `Checkpointer.save`, `loop.write_config`).

    The state has the run's exact structure, shapes and dtypes (`run.abstract_state`), on the
    first device; its values are drawn on the host (floats ~ N(0, 0.1^2), a VQ codebook's
    cluster sizes 1 as its initialiser sets them, integers 0), because XLA:CPU takes 25-55 s
    here to compile the autoencoder's own initialiser (and Orbax 15 s to save the state sharded
    over the 8 test devices)."""
    prepared = loop.prepare(config, workdir)
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        if jax.tree_util.keystr(path).endswith("['cluster_size']"):
            array = np.ones(leaf.shape, leaf.dtype)
        elif np.issubdtype(leaf.dtype, np.floating):
            array = rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype)
        else:
            array = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(array, jax.local_devices()[0])

    state = jax.tree_util.tree_map_with_path(value, prepared.run.abstract_state)
    os.makedirs(workdir, exist_ok=True)
    loop.write_config(config, workdir)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, every_steps=1, keep_last=1, keep_every=None, async_save=False
    )
    checkpointer.save(0, state, prepared.train_iter, prepared.run.description, force=True)
    checkpointer.close()


@pytest.fixture(scope="module")
def ae_workdir(clipart_tree, tmp_path_factory):
    config = clipart_autoencoder.get_config("smoke")
    config.data.path = clipart_tree
    workdir = str(tmp_path_factory.mktemp("ae"))
    save_checkpoint(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def codec(ae_workdir):
    return latents.Codec.from_workdir(ae_workdir)


def data_block(tree, random_flip=True) -> dict:
    return {"name": "clipart", "path": tree, "image_size": None, "random_flip": random_flip}


@pytest.fixture(scope="module")
def encoded(codec, clipart_tree, tmp_path_factory):
    """The reference encode: train (with flips) and test, in one library call."""
    out = str(tmp_path_factory.mktemp("latents"))
    result = latents.encode_dataset(
        codec, data_block(clipart_tree), out, batch=BATCH, shard_size=SHARD_SIZE
    )
    assert result.manifest is not None
    return out, result


def images_of(tree, split):
    source = data_lib.get_source("clipart", split, path=tree)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.asarray([source[i]["label"] for i in range(len(source))])
    return transforms.to_float(images), labels


def shard_files(out: str) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    return {n: open(os.path.join(out, n), "rb").read() for n in names}


# ---------------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------------


def test_codec_shapes_and_round_trip(codec, ae_workdir):
    """Shapes, the latent mask rule, and decode(encode(x)) = the autoencoder's own reconstruction
    (encode, quantise, decode with the same mask), with and without a normalisation: it cancels."""
    assert codec.factor == 4 and codec.latent_dim == 3
    assert codec.latent_shape((64, 64, 3)) == (16, 16, 3)
    assert codec.latent_shape((32, 48, 3)) == (8, 12, 3)
    assert codec.identity["workdir"] == os.path.abspath(ae_workdir)
    assert codec.identity["step"] == 0 and codec.identity["model"]["task"] == "autoencoder"
    assert codec.variables.get("quantizer_stats")  # the VQ codebook's EMA statistics

    x, _ = images_of(codec.config.data.path, "train")
    x = x[:5]  # not a multiple of the 8 devices: padded and cut back
    rng = np.random.default_rng(0)
    known = np.ones(x.shape[:3], np.float32)
    known[:, 8:40, 20:44] = 0
    known[0] = 1

    z = np.asarray(codec.encode(x, known))
    assert z.shape == (5, 16, 16, 3) and z.dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(codec.latent_mask(known)),
        known.reshape(5, 16, 4, 16, 4).min(axis=(2, 4)),
    )
    own = jax.jit(lambda v, x, known: codec.model.apply(v, x, known).x_hat)(
        codec.variables, x, known
    )
    x_hat = np.asarray(codec.decode(z, known))
    assert x_hat.shape == x.shape and x_hat.min() >= -1 and x_hat.max() <= 1
    np.testing.assert_allclose(x_hat, np.clip(own, -1, 1), atol=1e-5)
    # Without the quantiser: the decoder on the continuous latents, which differs; on latents
    # that are already codebook entries the two agree.
    own_raw = jax.jit(
        lambda v, x, known: codec.model.apply(
            v, codec.model.apply(v, x, known, method="encode"), known, method="decode"
        )
    )(codec.variables, x, known)
    x_raw = np.asarray(codec.decode(z, known, quantize=False))
    np.testing.assert_allclose(x_raw, np.clip(own_raw, -1, 1), atol=1e-5)
    assert np.abs(x_raw - x_hat).max() > 1e-3
    quantized = codec.model.apply(codec.variables, z, method="quantize").quantized
    np.testing.assert_allclose(
        np.asarray(codec.decode(quantized, known, quantize=False)), x_hat, atol=1e-5
    )

    shift = rng.normal(size=3).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 3).astype(np.float32)
    normed = codec.with_normalization(latents.Normalization(shift, scale, "test"))
    zn = np.asarray(normed.encode(x, known))
    np.testing.assert_allclose(zn, (z - shift) / scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(normed.decode(zn, known)), x_hat, atol=1e-5)

    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        codec.encode(x[..., :1])
    with pytest.raises(ValueError, match=r"divisible by the autoencoder's factor 4"):
        codec.encode(x[:, :62, :62])
    with pytest.raises(ValueError, match=r"known must hold only 0 .* got a value 0.5"):
        codec.encode(x, known * 0.5)
    with pytest.raises(ValueError, match=r"decode: latents must be \[B, h, w, 3\]"):
        codec.decode(z[..., :2])


def test_codec_reads_the_workdir_without_writing(ae_workdir):
    def snapshot():
        return {
            os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, dirs, files in os.walk(ae_workdir)
            for name in files + dirs
        }

    before = snapshot()
    codec = latents.Codec.from_workdir(ae_workdir, step=0)
    assert codec.identity["step"] == 0
    assert snapshot() == before


# ---------------------------------------------------------------------------------------------
# Encoding and reading back
# ---------------------------------------------------------------------------------------------


def test_encode_then_read_back_through_grain(codec, clipart_tree, encoded):
    """The records read through grain hold the codec's latents (up to float16), normalised by
    the statistics of the train split's latents, with labels, flips for train only."""
    out, result = encoded
    manifest = result.manifest
    with open(os.path.join(out, "latents.json")) as f:
        assert json.load(f) == manifest
    assert manifest["latent_shape"] == [16, 16, 3] and manifest["factor"] == 4
    assert manifest["dataset"]["name"] == "clipart" and manifest["dataset"]["num_classes"] == 22
    assert manifest["autoencoder"]["params_sha256"] == codec.identity["params_sha256"]
    assert data_lib.dataset_info("latents", path=out) == ((16, 16, 3), 22)
    assert set(data_lib.dataset_splits("latents", path=out)) == {"train", "test"}

    x_train, _ = images_of(clipart_tree, "train")
    raw_train = np.asarray(codec.encode_raw(x_train))
    norm = manifest["normalization"]
    shift, scale = np.asarray(norm["shift"]), np.asarray(norm["scale"])
    np.testing.assert_allclose(shift, raw_train.reshape(-1, 3).mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scale, raw_train.reshape(-1, 3).std(0), rtol=1e-4)
    assert "'train'" in norm["measured"]

    for split in ("train", "test"):
        x, labels = images_of(clipart_tree, split)
        entry = manifest["splits"][split]
        assert entry["records"] == len(x) and entry["flips"] == (split == "train")
        assert len(entry["shards"]) == -(-len(x) // SHARD_SIZE)
        source = data_lib.get_source("latents", split, path=out)
        assert len(source) == len(x) and source.stored_flips == (split == "train")
        expected = (np.asarray(codec.encode_raw(x)) - shift) / scale
        tolerance = 2e-3 * np.abs(expected).max()
        batch = data_lib.make_eval_dataset(
            source, global_batch_size=len(x), process_index=0, process_count=1
        )[0]
        assert batch["image"].dtype == np.float32 and set(batch) == {"image", "label", "mask"}
        np.testing.assert_allclose(batch["image"], expected, atol=tolerance)
        np.testing.assert_array_equal(batch["label"], labels)
        if split == "train":
            flipped = (np.asarray(codec.encode_raw(x[:, :, ::-1])) - shift) / scale
            stored = np.stack([source[i][transforms.FLIPPED] for i in range(len(source))])
            np.testing.assert_allclose(stored, flipped, atol=tolerance)
            # Latents of the mirrored image are not the mirrored latents.
            assert np.abs(flipped - expected[:, :, ::-1]).max() > 10 * tolerance

    # The training pipeline: float32 batches of the latent shape, flips drawn from the stored.
    source = data_lib.get_source("latents", "train", path=out)
    unflipped = np.stack([source[i]["image"] for i in range(len(source))])
    flips = np.stack([source[i][transforms.FLIPPED] for i in range(len(source))])
    stream = data_lib.make_dataset(
        source,
        global_batch_size=len(source),
        seed=0,
        shuffle=False,
        random_flip=True,
        process_index=0,
        process_count=1,
    )
    batch = next(stream)
    assert batch["image"].shape == (len(source), 16, 16, 3) and set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.float32
    picked_flip = [np.array_equal(b, f) for b, f in zip(batch["image"], flips, strict=True)]
    picked_plain = [np.array_equal(b, u) for b, u in zip(batch["image"], unflipped, strict=True)]
    assert all(f or p for f, p in zip(picked_flip, picked_plain, strict=True))
    # Among the images that are not mirror-symmetric, both kinds are picked.
    asymmetric = [not np.array_equal(f, u) for f, u in zip(flips, unflipped, strict=True)]
    assert sum(asymmetric) > 20
    flipped_rows = [f for f, a in zip(picked_flip, asymmetric, strict=True) if a]
    assert 0 < sum(flipped_rows) < len(flipped_rows)
    plain = data_lib.make_dataset(
        source, global_batch_size=8, seed=0, shuffle=False, process_index=0, process_count=1
    )
    batch = next(plain)
    assert set(batch) == {"image", "label"}
    np.testing.assert_array_equal(batch["image"], unflipped[:8])
    # The test split stores no flips, and its latents cannot be mirrored.
    with pytest.raises(ValueError, match=r"random_flip=True needs the flipped images"):
        data_lib.make_dataset(
            data_lib.get_source("latents", "test", path=out),
            global_batch_size=2,
            seed=0,
            random_flip=True,
        )


def test_interrupted_encode_resumes(codec, clipart_tree, encoded, tmp_path):
    """An encode stopped after 2 shards, with a shard half-written (no done-file) and a
    temporary file left by a kill: the rerun keeps the 2 shards (same mtimes), rewrites the
    others and gives the reference's bytes and manifest."""
    reference, result = encoded
    out = str(tmp_path / "latents")
    first = latents.encode_dataset(
        codec, data_block(clipart_tree), out, batch=BATCH, shard_size=SHARD_SIZE, max_shards=2
    )
    assert first.shards_written == 2 and first.manifest is None
    assert not os.path.exists(os.path.join(out, "latents.json"))
    with pytest.raises(data_lib.DatasetNotFoundError, match=r"incomplete.*Rerun apd.encode"):
        data_lib.get_source("latents", "train", path=out)

    train_shards = result.manifest["splits"]["train"]["shards"]
    done = [os.path.join(out, name) for name in train_shards[:2]]
    stats = [(os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in done]
    with open(os.path.join(out, train_shards[2]), "wb") as f:
        f.write(b"half a shard")
    with open(os.path.join(out, train_shards[3]) + ".tmp", "wb") as f:
        f.write(b"a kill while writing")

    second = latents.encode_dataset(
        codec, data_block(clipart_tree), out, batch=BATCH, shard_size=SHARD_SIZE
    )
    assert second.shards_kept == 2 and second.manifest is not None
    assert second.shards_written == len(train_shards) - 2 + 1  # + the test split's shard
    assert [(os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in done] == stats
    assert shard_files(out) == shard_files(reference)
    assert second.manifest["normalization"] == result.manifest["normalization"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    # Other settings in the same directory are refused, naming the difference.
    with pytest.raises(ValueError, match=r"other settings: shard_size is 8 there, 4 now"):
        latents.encode_dataset(codec, data_block(clipart_tree), out, batch=BATCH, shard_size=4)


def test_two_processes_write_disjoint_shards_covering_each_split_once(
    codec, clipart_tree, encoded, tmp_path
):
    reference, result = encoded
    out = str(tmp_path / "latents")
    kwargs = {"batch": BATCH, "shard_size": SHARD_SIZE, "process_count": 2}
    r0 = latents.encode_dataset(codec, data_block(clipart_tree), out, process_index=0, **kwargs)
    written0 = set(shard_files(out))
    assert r0.manifest is None
    r1 = latents.encode_dataset(codec, data_block(clipart_tree), out, process_index=1, **kwargs)
    written1 = set(shard_files(out)) - written0
    assert r1.manifest is not None and r1.shards_kept == 0
    assert written0 and written1 and not written0 & written1
    for split in ("train", "test"):
        shards = result.manifest["splits"][split]["shards"]
        assert written0 & set(shards) == set(shards[0::2])
        assert written1 & set(shards) == set(shards[1::2])
    assert shard_files(out) == shard_files(reference)
    _, labels = images_of(clipart_tree, "train")
    source = data_lib.get_source("latents", "train", path=out)
    np.testing.assert_array_equal([source[i]["label"] for i in range(len(source))], labels)


def test_a_diffusion_run_reads_the_latents(encoded, tmp_path):
    """`loop.prepare` of a diffusion config on `latents`: the model on 16 x 16 x 3 latents with the
    clip-art classes, and float32 batches of that shape from the pipeline."""
    out, _ = encoded
    config = fashion_mnist.get_config("smoke")
    config.data.name = "latents"
    config.data.path = out
    config.data.random_flip = True
    config.levels.name = "synchronous"
    config.levels.params = {}
    prepared = loop.prepare(config, str(tmp_path / "run"))
    assert prepared.image_shape == (16, 16, 3) and prepared.num_classes == 22
    batch = next(prepared.train_iter)
    per_process = config.data.global_batch_size // jax.process_count()
    assert batch["image"].shape == (per_process, 16, 16, 3)
    assert batch["image"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# The binary and errors
# ---------------------------------------------------------------------------------------------


def run_binary(*args):
    """`python -m apd.encode ARGS` in-process; a user error raises SystemExit with its line."""
    argv = ["apd.encode", *args]
    helpers.call_main(lambda: cli.call(encode.main, encode.parse_flags(argv), "apd.encode", False))


def test_binary_sets_config_overrides_aside_in_order():
    """`--config.KEY=VALUE` overrides are taken off the command line for `load_config`, in
    order; one without a value ends the binary with one line."""
    argv = ["apd.encode", "--config.data.image_size=32", "--autoencoder=/a", "--out=/o"]
    assert encode.parse_flags([*argv, "--config.data.path=/p"]) == ["apd.encode"]
    assert encode._OVERRIDES == [("data.image_size", "32"), ("data.path", "/p")]
    assert (encode._FLAGS["autoencoder"].value, encode._FLAGS["out"].value) == ("/a", "/o")
    with pytest.raises(
        SystemExit,
        match=r"^apd.encode: error: --config.data.path needs a value \(--config.KEY=VALUE\)\.$",
    ):
        encode.parse_flags([*argv, "--config.data.path"])


def test_binary_encodes_with_the_autoencoders_data_and_prints_throughput(
    ae_workdir, encoded, tmp_path, capsys
):
    """Without --config the autoencoder's data block (no flips) is encoded; the test split's
    shard is the reference's (it has no flips either way)."""
    reference, _ = encoded
    out = str(tmp_path / "latents")
    run_binary(f"--autoencoder={ae_workdir}", f"--out={out}", "--batch=8", "--shard_size=8")
    printed = capsys.readouterr().out
    assert "images/s" in printed and "latents [16, 16, 3]" in printed
    manifest = latents_data.read_manifest(out)
    assert not manifest["splits"]["train"]["flips"]
    assert manifest["command"].startswith("python -m apd.encode --autoencoder=")
    test_shard = manifest["splits"]["test"]["shards"][0]
    assert shard_files(out)[test_shard] == shard_files(reference)[test_shard]

    with pytest.raises(SystemExit, match=r"^apd.encode: error: .*must include 'train'"):
        run_binary(f"--autoencoder={ae_workdir}", f"--out={tmp_path / 'x'}", "--splits=test")


def test_clear_errors(ae_workdir, codec, clipart_tree, encoded, tmp_path):
    out, result = encoded
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no autoencoder workdir .*nowhere"):
        latents.Codec.from_workdir(missing)

    # A diffusion run passed as the autoencoder.
    config = fashion_mnist.get_config("smoke")
    config.data.path = helpers.write_fake_fashion_mnist(str(tmp_path / "fmnist"), 16, 8)
    diffusion = str(tmp_path / "diffusion")
    save_checkpoint(config, diffusion)
    with pytest.raises(ValueError, match=r"is not an autoencoder run: .*task 'diffusion'"):
        latents.Codec.from_workdir(diffusion)
    with pytest.raises(SystemExit, match=r"^apd.encode: error: .*not an autoencoder run"):
        run_binary(f"--autoencoder={diffusion}", f"--out={tmp_path / 'x'}")

    # An autoencoder workdir without a checkpoint.
    empty = str(tmp_path / "ae_empty")
    os.makedirs(empty)
    shutil.copy(os.path.join(ae_workdir, "config.json"), empty)
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint"):
        latents.Codec.from_workdir(empty)

    # Latent directories: missing, not one, another format, a missing shard; bad arguments.
    with pytest.raises(data_lib.DatasetNotFoundError, match=r"does not exist.*apd.encode"):
        data_lib.get_source("latents", "train", path=missing)
    with pytest.raises(ValueError, match=r"'latents' needs path=DIR"):
        data_lib.dataset_info("latents")
    with pytest.raises(data_lib.DatasetNotFoundError, match=r"is not a latent dataset"):
        data_lib.get_source("latents", "train", path=str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "latents.json").write_text(json.dumps({"format": "tfds", "version": 3}))
    with pytest.raises(ValueError, match=r"not a latent dataset of format 'apd-latents'"):
        data_lib.dataset_info("latents", path=str(other))
    with pytest.raises(ValueError, match=r"image_size=32 does not apply"):
        data_lib.dataset_info("latents", 32, path=out)
    with pytest.raises(ValueError, match=r"no split 'validation'"):
        data_lib.get_source("latents", "validation", path=out)
    with pytest.raises(ValueError, match=r"names the dataset 'latents'"):
        latents.encode_dataset(codec, {"name": "latents", "path": out}, str(tmp_path / "y"))
    with pytest.raises(ValueError, match=r"not empty and holds no plan.json"):
        latents.encode_dataset(codec, data_block(clipart_tree), str(other))

    # A dataset made with another autoencoder checkpoint is refused by the codec.
    changed = dict(result.manifest["autoencoder"], step=7)
    with pytest.raises(ValueError, match=r"at step 7, but .* differs: step 7 vs 0"):
        latents.check_same_autoencoder(changed, codec.identity, "the latent dataset")
    restored = latents.Codec.from_latents(out)
    assert restored.identity == codec.identity
    norm = result.manifest["normalization"]
    np.testing.assert_array_equal(restored.normalization.shift, np.float32(norm["shift"]))
    np.testing.assert_array_equal(restored.normalization.scale, np.float32(norm["scale"]))
