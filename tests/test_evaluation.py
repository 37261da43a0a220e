"""Tests of apd.evaluation: Fréchet distance, Inception, the Fashion-MNIST feature network,
reference statistics, inpainting masks, PSNR/SSIM, LPIPS and the ADM evaluator export."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from apd.evaluation import (
    adm,
    features,
    frechet,
    image_metrics,
    inception,
    integrity,
    kid,
    lpips,
    masks,
    protocol,
    reference,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_torch = pytest.mark.skipif(not _has_torch(), reason="torch is not installed")


# ---------------------------------------------------------------------------------------------
# Fréchet distance.
# ---------------------------------------------------------------------------------------------


def test_fid_identity_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    eye = np.eye(16)
    assert frechet.fid_from_stats(mu1, eye, mu2, eye) == pytest.approx(
        np.sum((mu1 - mu2) ** 2), rel=1e-9
    )


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 12), rng.uniform(0.1, 3.0, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet.fid_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_matches_eigenvalue_formula_on_random_features():
    rng = np.random.default_rng(2)
    f1 = rng.normal(size=(400, 20)) @ rng.normal(size=(20, 20))
    f2 = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) + 0.5
    mu1, s1 = frechet.stats_from_features(f1)
    mu2, s2 = frechet.stats_from_features(f2)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False))
    # Tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1 S2 (real, >= 0).
    eigenvalues = scipy.linalg.eigvals(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    expected -= 2 * np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
    assert frechet.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert frechet.fid_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(8, 32)), rng.normal(size=(8, 32)) + 1.0  # rank 7 in 32 dimensions
    mu1, s1 = frechet.stats_from_features(f1)
    mu2, s2 = frechet.stats_from_features(f2)
    value = frechet.fid_from_stats(mu1, s1, mu2, s2)
    assert np.isfinite(value) and value > np.sum((mu1 - mu2) ** 2) * 0.5


@pytest.mark.parametrize("n", [12, 64, 65, 200])
def test_fid_from_features_equals_fid_from_their_statistics(n):
    """Fewer samples than dimensions (the N x N eigenproblem), exactly as many, and more (the
    statistics' path): the same distance as the square root of the D x D product."""
    rng = np.random.default_rng(n)
    d = 64
    f1 = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    f2 = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) * 0.3
    mu2, s2 = frechet.stats_from_features(f2)
    mu1, s1 = frechet.stats_from_features(f1)
    # The reference: sum of the square roots of the eigenvalues of S1 S2 (rank <= n - 1).
    eigenvalues = scipy.linalg.eigvals(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
    expected -= 2 * np.sum(np.sqrt(np.clip(eigenvalues, 0, None)))
    got = frechet.fid_from_features(f1.astype(np.float32).astype(np.float64), mu2, s2)
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet.fid_from_features(f1, mu2, s2) == pytest.approx(
        frechet.fid_from_stats(mu1, s1, mu2, s2), rel=1e-6
    )
    with pytest.raises(ValueError, match=r"dimensions?:? 64 and (the reference statistics )?3"):
        frechet.fid_from_features(f1, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"N >= 2"):
        frechet.fid_from_features(f1[:1], mu2, s2)


def test_fid_rejects_bad_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet.fid_from_stats(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"covariance \[D, D\]"):
        frechet.fid_from_stats(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet.fid_from_stats(np.array([0.0, np.nan, 0.0]), eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="imaginary"):
        frechet.fid_from_stats(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))


def test_running_stats_match_batch_statistics_with_a_large_offset():
    rng = np.random.default_rng(4)
    data = rng.normal(size=(1000, 6)) * [1, 2, 3, 0.1, 0.5, 1] + 1e4
    running = frechet.RunningStats(6)
    for batch in np.array_split(data, [7, 100, 101, 640]):
        running.update(batch.astype(np.float32) if batch.shape[0] == 7 else batch)
    running.update(np.zeros((0, 6)))
    mean, cov = frechet.stats_from_features(np.concatenate([data[:7].astype(np.float32), data[7:]]))
    assert running.count == 1000
    np.testing.assert_allclose(running.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(running.covariance, cov, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        running.update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet.RunningStats(3).covariance  # noqa: B018


# ---------------------------------------------------------------------------------------------
# Inception.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_variables():
    return inception.random_variables(jax.random.key(0))


def test_inception_layout_matches_the_pytorch_fid_state_dict():
    shapes = inception.expected_state_dict_shapes()
    # 94 convolutions x (weight + 4 batch-norm tensors) + the 1008-way classifier.
    assert len(shapes) == 94 * 5 + 2
    known = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.weight": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: shapes[k] for k in known} == known
    # torchvision's Inception3 without the auxiliary head has 23,834,568 trainable parameters
    # with 1000 classes; 8 more classes add 8 * 2049.
    trainable = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k)
    assert trainable == 23_834_568 + 8 * 2049


def test_inception_forward_shapes(inception_variables):
    model = inception.InceptionV3()
    x = jax.random.uniform(jax.random.key(1), (1, 75, 75, 3), minval=-1.0, maxval=1.0)
    features, logits = jax.jit(lambda v, x: model.apply(v, x, with_logits=True))(
        inception_variables, x
    )
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    assert np.all(np.isfinite(features)) and np.all(np.asarray(features) >= 0)  # ReLU, avg pool
    assert float(jnp.std(features)) > 0
    # The full FID path (resize to 299) by shape only: any input size, grayscale repeated.
    fn = inception.feature_fn()
    out = jax.eval_shape(fn, inception_variables, jax.ShapeDtypeStruct((3, 32, 32, 1), jnp.float32))
    assert out.shape == (3, 2048) and out.dtype == jnp.float32


def test_inception_preprocess_shapes_and_range():
    x = jnp.linspace(-1.0, 1.0, 2 * 8 * 8).reshape(2, 8, 8, 1)
    y = inception.preprocess(x)
    assert y.shape == (2, 299, 299, 3)
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    np.testing.assert_array_equal(y[..., 0], y[..., 2])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        inception.preprocess(jnp.zeros((2, 8, 8, 2)))


@needs_torch
@pytest.mark.parametrize("size", [32, 400])
def test_inception_resize_matches_torch_bilinear(size):
    import torch
    from torch.nn import functional

    x = np.random.default_rng(size).uniform(0, 1, (1, 3, size, size)).astype(np.float32)
    expected = functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear")
    got = inception.preprocess(jnp.asarray(np.transpose(x, (0, 2, 3, 1))) * 2 - 1)
    np.testing.assert_allclose(
        np.asarray(got), np.transpose(expected.numpy(), (0, 2, 3, 1)) * 2 - 1, atol=2e-6
    )


@needs_torch
def test_inception_layers_match_torch_with_converted_weights():
    """BasicConv2d with weights in torch layout, and the FID pooling patches, match torch."""
    import torch
    from torch.nn import functional

    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 9, 9, 6)).astype(np.float32)
    weight = rng.normal(size=(8, 6, 1, 3)).astype(np.float32)  # [O, I, kh, kw]
    bn = {
        "weight": rng.uniform(0.5, 1.5, 8),
        "bias": rng.normal(size=8),
        "running_mean": rng.normal(size=8),
        "running_var": rng.uniform(0.5, 2.0, 8),
    }
    bn = {k: v.astype(np.float32) for k, v in bn.items()}
    xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)))
    expected = functional.conv2d(xt, torch.from_numpy(weight), padding=(0, 1))
    stats = (torch.from_numpy(bn[k]) for k in ("running_mean", "running_var", "weight", "bias"))
    expected = functional.batch_norm(expected, *stats, eps=1e-3)
    expected = functional.relu(expected).numpy().transpose(0, 2, 3, 1)
    variables = {
        "params": {
            "conv": {"kernel": np.transpose(weight, (2, 3, 1, 0))},
            "bn": {"scale": bn["weight"], "bias": bn["bias"]},
        },
        "batch_stats": {"bn": {"mean": bn["running_mean"], "var": bn["running_var"]}},
    }
    got = inception.BasicConv2d(8, (1, 3), padding=(0, 1)).apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)

    avg = functional.avg_pool2d(xt, 3, 1, 1, count_include_pad=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inception._avg_pool_3x3(x)), avg, atol=1e-6)
    peak = (
        functional.max_pool2d(xt - 10, 3, 1, 1).numpy().transpose(0, 2, 3, 1)
    )  # all negative: pads
    np.testing.assert_allclose(np.asarray(inception._max_pool_3x3(x - 10, 1)), peak)
    stride2 = functional.max_pool2d(xt, 3, 2).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inception._max_pool_3x3(x, 2)), stride2)


def _assert_trees_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_inception_npz_round_trip_and_checks(tmp_path, inception_variables):
    state_dict = inception.state_dict_from_variables(inception_variables)
    state_dict["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.asarray(7)  # present in torch files
    source = "ab" * 32
    path = str(tmp_path / "weights.npz")
    inception.write_npz(state_dict, path, source)
    _assert_trees_equal(inception.load_variables(path, expected_sha256=None), inception_variables)
    assert inception.load_variables(path, expected_sha256="abababab") is not None

    with pytest.raises(ValueError, match="6726825d"):  # converted from another file
        inception.load_variables(path)

    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["fc.bias"] = arrays["fc.bias"] + 1.0
    tampered = str(tmp_path / "tampered.npz")
    np.savez(tampered, **arrays)
    with pytest.raises(ValueError, match="corrupt or was modified"):
        inception.load_variables(tampered, expected_sha256=None)


def test_inception_state_dict_checked_strictly(inception_variables):
    state_dict = inception.state_dict_from_variables(inception_variables)
    missing = dict(state_dict)
    del missing["Mixed_6c.branch7x7_3.bn.running_mean"]
    with pytest.raises(ValueError, match=r"1 missing tensors \['Mixed_6c.branch7x7_3"):
        inception.variables_from_state_dict(missing)
    extra = {**state_dict, "AuxLogits.fc.weight": np.zeros((1008, 768))}
    with pytest.raises(ValueError, match="1 unexpected"):
        inception.variables_from_state_dict(extra)
    misshaped = {**state_dict, "Mixed_5b.branch1x1.conv.weight": np.zeros((64, 192, 3, 3))}
    with pytest.raises(ValueError, match=r"wrong shape \['Mixed_5b.branch1x1.conv.weight"):
        inception.variables_from_state_dict(misshaped)


def test_inception_missing_file_names_file_source_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_variables(str(tmp_path / inception.FID_WEIGHTS_FILENAME))
    message = str(info.value)
    assert inception.FID_WEIGHTS_FILENAME in message and "--inception_weights" in message
    assert "github.com/mseitzer/pytorch-fid" in message and "downloads nothing" in message


def _unreadable_weight_files(directory):
    """Files named like weights that are not: text, random bytes, a plain .npy, a broken zip."""
    directory.mkdir(exist_ok=True)
    (directory / "text.npz").write_text("these are not weights\n")
    (directory / "random.npz").write_bytes(np.random.default_rng(0).bytes(3000))
    with open(directory / "array.npz", "wb") as f:
        np.save(f, np.zeros(3))
    (directory / "broken.npz").write_bytes(b"PK\x03\x04" + b"0" * 100)
    np.savez(directory / "plain.npz", x=np.zeros(3))  # an archive, but not a converted one
    return sorted(str(p) for p in directory.iterdir())


@pytest.mark.parametrize(
    "load, expected",
    [
        (lambda p: inception.load_variables(p, expected_sha256=None), "apd.evaluation.inception"),
        (lambda p: lpips.load_params(p, expected_alexnet_sha256=None), "apd.evaluation.lpips"),
    ],
)
def test_unreadable_weight_files_name_the_file_and_the_expected_form(tmp_path, load, expected):
    for path in _unreadable_weight_files(tmp_path / "weights"):
        with pytest.raises(ValueError) as info:
            load(path)
        message = str(info.value)
        assert path in message and f"python -m {expected} convert" in message, message
        assert "\n" not in message and "pickle" not in message, message
    with pytest.raises(ValueError, match=r"pytorch-fid's pt_inception-2015-12-05-6726825d\.pth"):
        inception.load_variables(str(tmp_path / "weights" / "text.npz"))


@needs_torch
def test_inception_pth_wrong_hash_refused_and_converter_cli(tmp_path, inception_variables):
    import torch

    state_dict = inception.state_dict_from_variables(inception_variables)
    pth = str(tmp_path / "fake.pth")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, pth)
    with pytest.raises(ValueError, match=r"SHA-256 \w+, expected one starting with 6726825d"):
        inception.load_variables(pth)
    with pytest.raises(ValueError, match="6726825d"):
        inception.convert(pth, str(tmp_path / "refused.npz"))
    assert not os.path.exists(tmp_path / "refused.npz")
    _assert_trees_equal(inception.load_variables(pth, expected_sha256=None), inception_variables)

    npz = str(tmp_path / "fake.npz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apd.evaluation.inception",
            "convert",
            pth,
            npz,
            "--expected_sha256=",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pth_hash = integrity.sha256_file(pth)
    variables = inception.load_variables(npz, expected_sha256=pth_hash)
    _assert_trees_equal(variables, inception_variables)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST feature network and reference statistics.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_feature_dir(tmp_path_factory):
    """One end-to-end run of the binary: trains on fake data, stores, caches test statistics."""
    data_dir = helpers.write_fake_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))
    out = str(tmp_path_factory.mktemp("features"))
    command = [
        sys.executable,
        "-m",
        "apd.features",
        "--dataset=fashion_mnist",
        f"--out={out}",
        f"--path={data_dir}",
        "--steps=40",
        "--batch_size=32",
        "--learning_rate=3e-3",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, data_dir


def test_feature_network_trains_and_records_its_hash(trained_feature_dir):
    out, data_dir = trained_feature_dir
    record = integrity.read_json(os.path.join(out, features.RECORD_FILE))
    assert record["params_sha256"] == integrity.sha256_file(os.path.join(out, features.PARAMS_FILE))
    assert record["steps"] == 40 and record["dataset"] == "fashion_mnist"
    # Fake classes differ in mean brightness: a trained network separates them well.
    assert record["test_accuracy"] > 0.6
    params, loaded = features.load(out)
    assert loaded == record
    from apd.data import fashion_mnist

    images, labels = fashion_mnist.load("test", data_dir)
    assert features.accuracy(params, images, labels) == pytest.approx(record["test_accuracy"])
    feats = features.features(params, jnp.zeros((3, 28, 28, 1)))
    assert feats.shape == (3, features.FEATURE_DIM)


def test_feature_network_is_reused_and_tampering_is_detected(trained_feature_dir, tmp_path):
    from apd import features as features_binary

    out, data_dir = trained_feature_dir
    params_path = os.path.join(out, features.PARAMS_FILE)
    mtime = os.stat(params_path).st_mtime_ns
    record = features_binary.train_or_load(out, "fashion_mnist", data_dir, 5, 8, 1e-3, 1)
    assert record["steps"] == 40 and os.stat(params_path).st_mtime_ns == mtime  # not retrained

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (features.PARAMS_FILE, features.RECORD_FILE):
        with open(os.path.join(out, name), "rb") as f:
            (copy / name).write_bytes(f.read())
    params, _ = features.load(str(copy))
    flat = features._flatten(params)
    first = sorted(flat)[0]
    flat[first] = flat[first] + 1e-3
    np.savez(copy / features.PARAMS_FILE, **flat)
    with pytest.raises(ValueError, match="SHA-256"):
        features.load(str(copy))
    with pytest.raises(ValueError, match="SHA-256"):
        features_binary.train_or_load(str(copy), "fashion_mnist", data_dir, 5, 8, 1e-3, 1)
    with pytest.raises(FileNotFoundError, match=r"python -m apd\.features"):
        features.load(str(tmp_path / "nothing"))


def test_reference_statistics_cached_by_network_hash(trained_feature_dir, monkeypatch):
    out, data_dir = trained_feature_dir
    stats = features.reference_statistics(out, "test", data_dir)
    assert stats.count == 64 and stats.mean.shape == (128,)
    params, record = features.load(out)
    from apd.data import fashion_mnist, transforms

    images = transforms.to_float(fashion_mnist.load("test", data_dir)[0])
    direct = np.asarray(features.features(params, images), np.float64)
    mean, cov = frechet.stats_from_features(direct)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.covariance, cov, rtol=1e-4, atol=1e-5)

    # Second call: read from the cache, nothing recomputed.
    monkeypatch.setattr(features, "statistics", lambda *a, **k: pytest.fail("recomputed"))
    cached = features.reference_statistics(out, "test", data_dir)
    np.testing.assert_array_equal(cached.covariance, stats.covariance)

    cache_dir = os.path.join(out, features.REFERENCE_DIR)
    stats_path, record_path = reference.cache_paths(
        cache_dir, "fashion_mnist", "test", record["params_sha256"]
    )
    assert os.path.isfile(stats_path) and os.path.isfile(record_path)
    other = "0" * 64  # another network: a different entry
    assert reference.load(cache_dir, "fashion_mnist", "test", other) is None
    # The split's first features are kept for KID, exactly the network's.
    np.testing.assert_allclose(cached.features, direct[:64], rtol=1e-5, atol=1e-5)


def test_reference_entry_without_kid_features_is_recomputed(tmp_path):
    network = "e" * 64
    old = reference.Stats(np.zeros(3), np.eye(3), 10)  # as written before features were kept
    reference.save(str(tmp_path), "toy", "test", network, old)
    assert reference.load(str(tmp_path), "toy", "test", network).features is None
    fresh = reference.Stats(np.ones(3), np.eye(3), 4, np.ones((4, 3), np.float32))
    got = reference.load_or_compute(str(tmp_path), "toy", "test", network, lambda: fresh)
    np.testing.assert_array_equal(got.features, fresh.features)
    again = reference.load(str(tmp_path), "toy", "test", network)  # replaced on disk
    np.testing.assert_array_equal(again.features, fresh.features)


def test_accumulate_keeps_the_first_features():
    batches = [np.full((3, 2), i, np.float32) for i in range(4)]
    stats = reference.accumulate(lambda b: b, batches, 2, keep=5)
    assert stats.count == 12 and stats.features.shape == (5, 2)
    np.testing.assert_array_equal(stats.features[:, 0], [0, 0, 0, 1, 1])
    assert reference.accumulate(lambda b: b, batches, 2, keep=0).features.shape == (0, 2)


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def test_mmd2_unbiased_matches_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(1.0, 1.0, size=(6, 4))

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert kid.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_unbiased_where_fid_is_not():
    """Two samples of one distribution: FID's estimate is far above 0 at small N and shrinks
    with N; KID's averages to 0 at every N (within 4 standard errors over repeats)."""
    rng = np.random.default_rng(1)
    dim, reference_features = 32, rng.normal(size=(2000, 32))
    ref_mean, ref_cov = frechet.stats_from_features(reference_features)
    for n in (50, 400):
        kids, fids = [], []
        for _ in range(40):
            sample = rng.normal(size=(n, dim))
            kids.append(kid.kid(sample, reference_features, num_subsets=5, seed=1).mean)
            fids.append(
                frechet.fid_from_stats(*frechet.stats_from_features(sample), ref_mean, ref_cov)
            )
        kids = np.asarray(kids)
        assert abs(kids.mean()) < 4 * kids.std(ddof=1) / np.sqrt(len(kids)), n
        if n == 50:
            fid_small = np.mean(fids)
    assert fid_small > 5 * np.mean(fids)  # FID at N = 50 is mostly bias
    # A real difference is seen: a shifted distribution gives a KID many spreads above 0.
    shifted = kid.kid(rng.normal(0.5, 1.0, size=(400, dim)), reference_features)
    assert shifted.mean > 10 * shifted.std / np.sqrt(shifted.num_subsets)
    assert shifted.subset_size == 400 and shifted.num_subsets == kid.NUM_SUBSETS


def test_standardised_kid_resolves_what_raw_features_hide():
    """Features on the Fashion-MNIST network's scale (per-dimension spreads up to ~10): KID of a
    sample of the reference distribution is about 0 once standardised by the reference, and a
    shift of half a spread in a few dimensions stands out; raw, the same comparison is noise."""
    from apd.evaluation import protocol

    rng = np.random.default_rng(0)
    dim, scale = 64, rng.uniform(1.0, 10.0, 64)
    ref = rng.normal(size=(3000, dim)) * scale + 5.0
    ref_mean, ref_cov = frechet.stats_from_features(ref)

    def features(standardise):
        return protocol.Features(
            name="toy",
            sha256="0" * 64,
            embed=lambda x: x,
            dim=dim,
            reference=reference.Stats(ref_mean, ref_cov, len(ref), ref.astype(np.float32)),
            reference_record={},
            kid_standardise=standardise,
        )

    same = rng.normal(size=(160, dim)) * scale + 5.0
    shifted = same + 0.5 * scale * (np.arange(dim) < 8)
    std_same = features(True).scores(same, 64, 50, 1000)["kid"]
    std_shifted = features(True).scores(shifted, 64, 50, 1000)["kid"]
    assert abs(std_same) < 0.02 and std_shifted > 5 * max(abs(std_same), 0.01)
    raw = features(False).scores(same, 64, 50, 1000)
    assert abs(raw["kid"]) > 50 * abs(std_same)  # the raw estimate's noise dwarfs the signal


def test_kid_leaves_the_completed_inputs_out_of_its_reference():
    """Near-copies of the reference's first images (what inpainting returns) pull KID below 0
    against a reference that holds them (here 160 of 400: the real protocol's 160 of 5,000
    moves it less); leaving them out removes that pull."""
    from apd.evaluation import protocol

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 16))
    mean, cov = frechet.stats_from_features(ref)
    features = protocol.Features(
        name="toy",
        sha256="0" * 64,
        embed=lambda x: x,
        dim=16,
        reference=reference.Stats(mean, cov, len(ref), ref.astype(np.float32)),
        reference_record={},
    )
    completed = ref[:160] + 0.1 * rng.normal(size=(160, 16))
    with_inputs = features.scores(completed, 64, 100, 1000)["kid"]
    without = features.scores(completed, 64, 100, 1000, kid_exclude=160)["kid"]
    assert with_inputs < -0.02 and without > with_inputs + 0.02
    with pytest.raises(ValueError, match="beyond the first 400"):
        features.scores(completed, 64, 100, 1000, kid_exclude=400)


def test_kid_refuses_bad_input():
    ok = np.zeros((4, 3))
    with pytest.raises(ValueError, match="different dimensions"):
        kid.kid(ok, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"N >= 2"):
        kid.kid(np.zeros((1, 3)), ok)
    with pytest.raises(ValueError, match="NaN"):
        kid.kid(np.full((4, 3), np.nan), ok)
    with pytest.raises(ValueError, match="subset_size must be an int >= 2"):
        kid.kid(ok, ok, subset_size=1)


def test_reference_cache_refuses_tampered_statistics(tmp_path):
    network = "f" * 64
    stats = reference.Stats(np.zeros(3), np.eye(3), 10)
    path = reference.save(str(tmp_path), "toy", "test", network, stats)
    loaded = reference.load(str(tmp_path), "toy", "test", network)
    assert loaded.count == 10
    np.testing.assert_array_equal(loaded.covariance, np.eye(3))
    np.savez(path, mean=np.ones(3), covariance=np.eye(3), count=np.int64(10))
    with pytest.raises(ValueError, match="Delete"):
        reference.load(str(tmp_path), "toy", "test", network)
    with pytest.raises(ValueError, match="64 digits"):
        reference.cache_paths(str(tmp_path), "toy", "test", "abc")
    with pytest.raises(ValueError, match="cannot name a cache file"):
        reference.cache_paths(str(tmp_path), "toy/../x", "test", network)


# ---------------------------------------------------------------------------------------------
# Inpainting masks.
# ---------------------------------------------------------------------------------------------

# The unknown-fraction ranges documented in apd.evaluation.masks, for even image sizes.
UNKNOWN_RANGES = {
    "extrema": (0.75, 0.75),
    "square": (0.25, 0.25),
    "thin": (1e-9, 0.5),
    "wide": (1e-9, 0.5),
    "half": (0.5, 0.5),
    "perlin": (0.2, 0.8),
}


@pytest.mark.parametrize("family", masks.FAMILIES)
@pytest.mark.parametrize("grid", [32, (64, 48)])
def test_mask_coverage_within_documented_range(family, grid):
    m = masks.make_masks(family, 11, 40, grid)
    height, width = (grid, grid) if isinstance(grid, int) else grid
    assert m.dtype == np.uint8 and m.shape == (40, height, width)
    assert set(np.unique(m)) <= {0, 1}
    unknown = masks.unknown_fraction(m)
    low, high = UNKNOWN_RANGES[family]
    assert np.all(unknown >= low - 1e-9) and np.all(unknown <= high + 1e-9), unknown
    if low < high:  # random families vary from mask to mask
        assert np.std(unknown) > 0.02
    if family in ("thin", "wide"):
        assert 0.1 < unknown.mean() < 0.45


def test_mask_box_families_respect_the_margin():
    square = masks.make_masks("square", 0, 200, 64)
    unknown_rows = (square == 0).any(axis=2)
    assert not unknown_rows[:, :4].any() and not unknown_rows[:, -4:].any()  # margin 64 // 16
    tops = unknown_rows.argmax(axis=1)
    assert tops.min() == 4 and tops.max() == 64 - 4 - 32  # both extreme positions are drawn
    extrema = masks.make_masks("extrema", 0, 50, 64)
    known_rows, known_cols = extrema.any(axis=2), extrema.any(axis=1)
    assert (known_rows.sum(axis=1) == 32).all() and (known_cols.sum(axis=1) == 32).all()
    assert (extrema.sum(axis=(1, 2)) == 32 * 32).all()  # one 32 x 32 known box
    assert not known_rows[:, :4].any() and not known_cols[:, -4:].any()


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_masks_deterministic_by_seed(family):
    a = masks.make_masks(family, 5, 6, 32)
    np.testing.assert_array_equal(a, masks.make_masks(family, 5, 6, 32))
    np.testing.assert_array_equal(a[:3], masks.make_masks(family, 5, 3, 32))  # mask i: (seed, i)
    b = masks.make_masks(family, 6, 6, 32)
    assert (a != b).any(axis=(1, 2)).sum() >= 4  # another seed gives other masks
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        masks.make_masks(family, key, 4, 32), masks.make_masks(family, jax.random.key(5), 4, 32)
    )


# SHA-256 prefixes of the mask bytes and known-pixel counts, recorded before the mask module also
# served apd.sample: evaluation records and the masks saved beside them depend on these values.
PINNED_CASES = (
    (lambda: 0, 8, 28),
    (lambda: 3, 5, (64, 48)),
    (lambda: jax.random.key(7), 4, 32),
)
PINNED_MASKS = {
    "extrema": (("22de41d37567b86c", 1568), ("48f3881d25ba7d01", 3840), ("245f36a7602c112c", 1024)),
    "square": (("f6c9d292bcad1b8a", 4704), ("7f7c0850bdd5f56c", 11520), ("356514bf5798f5fb", 3072)),
    "thin": (("c3bd52d7597b3a31", 4308), ("da645ee32789cdc4", 11735), ("0fce40a947064fd8", 2766)),
    "wide": (("11481c6503f6c59b", 4313), ("a38d3d8add4d4b8c", 11059), ("c2a9b76e81bc49f9", 3282)),
    "half": (("588ebe5738e67368", 3136), ("e5dc13e89ea4bad3", 7680), ("33e2f7920ab5179a", 2048)),
    "perlin": (("8eddefc22007ee4c", 3086), ("2d31f1551fb649ba", 8374), ("bf67cd85bffef1a2", 1864)),
}


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_protocol_masks_are_pinned(family):
    """The protocol's masks for given seeds never change (int seeds, a key, two image sizes)."""
    for (seed, batch, grid), (digest, known) in zip(
        PINNED_CASES, PINNED_MASKS[family], strict=True
    ):
        m = masks.make_masks(family, seed(), batch, grid)
        assert (hashlib.sha256(m.tobytes()).hexdigest()[:16], int(m.sum())) == (digest, known)


def test_sampling_families_top_and_patches(tmp_path):
    """The families apd.sample adds: deterministic 'top'; 'patches', cells of a 4 x 4 grid
    generated with probability 1/2, mask i depending only on (seed, i)."""
    assert set(masks.ALL_FAMILIES) == set(masks.FAMILIES) | {"top", "patches"}
    top = masks.make_masks("top", 5, 3, 28)
    assert top[:, :14].all() and not top[:, 14:].any()
    patches = masks.make_masks("patches", 0, 400, 28)
    assert abs(masks.unknown_fraction(patches).mean() - 0.5) < 0.02
    assert (patches[:, ::7, ::7].repeat(7, 1).repeat(7, 2) == patches).all()  # 7 x 7 cells
    np.testing.assert_array_equal(masks.make_masks("patches", 0, 3, 28), patches[:3])
    assert not np.array_equal(masks.make_masks("patches", 1, 3, 28), patches[:3])
    masks.save_masks(str(tmp_path / "top.npz"), top, "top", 5)
    assert masks.load_masks(str(tmp_path / "top.npz"))[1]["family"] == "top"


def test_masks_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask family 'box'"):
        masks.make_masks("box", 0, 1, 32)
    with pytest.raises(ValueError, match="mask grid"):
        masks.make_masks("half", 0, 1, 2)
    with pytest.raises(ValueError, match="seed"):
        masks.make_masks("half", -1, 1, 32)
    with pytest.raises(ValueError, match="batch size"):
        masks.make_masks("half", 0, -1, 32)
    assert masks.make_masks("thin", 0, 0, 32).shape == (0, 32, 32)


def test_masks_save_load_round_trip(tmp_path):
    m = masks.make_masks("wide", 9, 7, (32, 40))
    path = str(tmp_path / "masks.npz")
    masks.save_masks(path, m, "wide", 9)
    loaded, info = masks.load_masks(path)
    np.testing.assert_array_equal(loaded, m)
    assert loaded.dtype == np.uint8 and info == {"family": "wide", "seed_words": (9,)}
    key_path = str(tmp_path / "key_masks.npz")
    masks.save_masks(key_path, m, "wide", jax.random.key(3))
    assert masks.load_masks(key_path)[1]["seed_words"] == tuple(
        int(w) for w in jax.random.key_data(jax.random.key(3))
    )
    with pytest.raises(ValueError, match="uint8"):
        masks.save_masks(path, m * 2, "wide", 9)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved mask file"):
        masks.load_masks(str(tmp_path / "other.npz"))


# ---------------------------------------------------------------------------------------------
# PSNR and SSIM.
# ---------------------------------------------------------------------------------------------


def test_psnr_known_values():
    rng = np.random.default_rng(6)
    x = rng.uniform(-0.5, 0.5, (3, 16, 16, 3)).astype(np.float32)
    delta = np.array([0.1, 0.01, 0.5], np.float32)[:, None, None, None]
    values = np.asarray(image_metrics.psnr(x, x + delta))
    np.testing.assert_allclose(values, 10 * np.log10(4.0 / delta.ravel() ** 2), rtol=1e-4)
    assert np.isinf(image_metrics.psnr(x, x)).all()
    in_unit_range = image_metrics.psnr((x + 1) / 2, (x + delta + 1) / 2, data_range=1.0)
    np.testing.assert_allclose(np.asarray(in_unit_range), values, rtol=1e-4)
    with pytest.raises(ValueError, match="of one shape"):
        image_metrics.psnr(x, x[:2])


def test_capped_psnr_reads_the_8bit_rounding_floor_for_identical_images():
    """An identical image reads 10 log10(12 * 255^2) = 58.9 dB in any data range, so that the
    mean over images stays finite; other images keep their PSNR."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.5, 0.5, (3, 16, 16, 3)).astype(np.float32)
    y = x.copy()
    y[1] += 0.1
    y[2, :1, :1] += 2.0 / 255 * 0.01  # within 8-bit rounding of x
    capped = np.asarray(image_metrics.capped_psnr(y, x))
    assert abs(image_metrics.PSNR_CAP_DB - 58.92) < 0.01
    np.testing.assert_allclose(capped[[0, 2]], image_metrics.PSNR_CAP_DB)
    assert capped[1] == pytest.approx(10 * np.log10(4.0 / 0.01), rel=1e-4)
    in_uint8_range = image_metrics.capped_psnr((x + 1) * 127.5, (x + 1) * 127.5, data_range=255.0)
    np.testing.assert_allclose(np.asarray(in_uint8_range), image_metrics.PSNR_CAP_DB)


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Wang et al. SSIM with scipy's Gaussian filter (sigma 1.5, 11 taps), valid region."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xi, yi in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
        maps = []
        for c in range(xi.shape[-1]):
            a, b = xi[..., c], yi[..., c]

            def blur(z):
                return scipy.ndimage.gaussian_filter(z, 1.5, truncate=3.5)[5:-5, 5:-5]

            mu_a, mu_b = blur(a), blur(b)
            var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
            cov = blur(a * b) - mu_a * mu_b
            maps.append(
                ((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
            )
        values.append(np.mean(maps))
    return np.asarray(values)


def test_ssim_matches_numpy_reference():
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (2, 24, 20, 3)).astype(np.float32)
    smooth = scipy.ndimage.gaussian_filter(x, (0, 2, 2, 0))
    y = np.clip(smooth + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    got = np.asarray(image_metrics.ssim(x, y))
    np.testing.assert_allclose(got, _ssim_reference(x, y, 2.0), atol=2e-5)
    np.testing.assert_allclose(np.asarray(image_metrics.ssim(x, x)), 1.0, atol=1e-5)
    gray = np.asarray(image_metrics.ssim(x[..., :1], y[..., :1], data_range=2.0))
    np.testing.assert_allclose(gray, _ssim_reference(x[..., :1], y[..., :1], 2.0), atol=2e-5)


def test_ssim_constant_images_closed_form():
    a, b = 0.3, -0.2
    x, y = np.full((1, 16, 16, 1), a, np.float32), np.full((1, 16, 16, 1), b, np.float32)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances vanish: the C2 terms cancel
    assert float(image_metrics.ssim(x, y)[0]) == pytest.approx(expected, rel=1e-4)
    noisy = x + 0.05 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    noisier = x + 0.3 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    assert float(image_metrics.ssim(x, noisy)[0]) > float(image_metrics.ssim(x, noisier)[0])
    with pytest.raises(ValueError, match="window"):
        image_metrics.ssim(x[:, :8, :8], y[:, :8, :8])


# ---------------------------------------------------------------------------------------------
# LPIPS.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_params():
    return lpips.random_params(jax.random.key(2))


def _image_pair(noise: float, seed: int = 0, shape=(2, 40, 36, 3)):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    y = np.clip(x + noise * rng.normal(size=shape), -1, 1).astype(np.float32)
    return x, y


def test_lpips_is_a_distance_growing_with_corruption(lpips_params):
    x, y = _image_pair(0.2)
    d = np.asarray(lpips.distance(lpips_params, x, y))
    assert d.shape == (2,) and np.all(d > 0)
    np.testing.assert_allclose(np.asarray(lpips.distance(lpips_params, y, x)), d, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lpips.distance(lpips_params, x, x)), 0.0, atol=1e-7)
    _, y_far = _image_pair(0.8)
    assert np.all(np.asarray(lpips.distance(lpips_params, x, y_far)) > d)
    with pytest.raises(ValueError, match="H, W >= 32"):
        lpips.distance(lpips_params, x[:, :16], y[:, :16])


@needs_torch
def test_lpips_matches_torch_ops(lpips_params):
    """The LPIPS package's computation, written with torch's functional ops."""
    import torch
    from torch.nn import functional

    x, y = _image_pair(0.3, seed=1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    p = {k: torch.from_numpy(v) for k, v in lpips_params.items()}

    def taps(image):
        h = (torch.from_numpy(image.transpose(0, 3, 1, 2)) - shift) / scale
        out = []
        convs = [(0, 4, 2), (3, 1, 2), (6, 1, 1), (8, 1, 1), (10, 1, 1)]
        for i, (layer, stride, padding) in enumerate(convs):
            w, b = p[f"features.{layer}.weight"], p[f"features.{layer}.bias"]
            h = functional.relu(functional.conv2d(h, w, b, stride=stride, padding=padding))
            out.append(h)
            if i < 2:
                h = functional.max_pool2d(h, 3, 2)
        return out

    total = 0
    for i, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + functional.conv2d((a - b) ** 2, p[f"lin{i}.model.1.weight"]).mean((2, 3))
    got = np.asarray(lpips.distance(lpips_params, x, y))
    np.testing.assert_allclose(got, total.numpy().ravel(), rtol=1e-4)


def test_lpips_weights_files(tmp_path, lpips_params):
    path = str(tmp_path / "lpips.npz")
    lpips.save_params(path, lpips_params, {"alexnet": "cd" * 32, "linear": "ef" * 32})
    loaded = lpips.load_params(path, expected_alexnet_sha256=None)
    assert sorted(loaded) == sorted(lpips_params)
    for k, v in lpips_params.items():
        np.testing.assert_array_equal(loaded[k], v)
    with pytest.raises(ValueError, match="expected one starting with 7be5be79"):
        lpips.load_params(path)
    with pytest.raises(FileNotFoundError) as info:
        lpips.load_params(str(tmp_path / "missing.npz"))
    message = str(info.value)
    assert lpips.ALEXNET_FILENAME in message and "lpips/weights/v0.1/alex.pth" in message
    assert "--lpips_weights" in message and "downloads nothing" in message
    bad = {**lpips_params, "lin2.model.1.weight": np.zeros((1, 10, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"wrong shape \['lin2"):
        lpips.save_params(path, bad, {})


@needs_torch
def test_lpips_convert_from_torch_files(tmp_path, lpips_params):
    import torch

    def save(params, name):
        path = str(tmp_path / name)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}, path)
        return path

    backbone = {k: v for k, v in lpips_params.items() if k.startswith("features.")}
    heads = {k: v for k, v in lpips_params.items() if k.startswith("lin")}
    alexnet_pth = save({**backbone, "classifier.6.bias": np.zeros(1000, np.float32)}, "alex.pth")
    linear_pth = save(heads, "lin.pth")
    with pytest.raises(ValueError, match="7be5be79"):
        lpips.convert(alexnet_pth, linear_pth, str(tmp_path / "refused.npz"))
    npz = str(tmp_path / "lpips.npz")
    lpips.convert(alexnet_pth, linear_pth, npz, expected_alexnet_sha256=None)
    loaded = lpips.load_params(npz, expected_alexnet_sha256=integrity.sha256_file(alexnet_pth))
    for k, v in lpips_params.items():
        np.testing.assert_array_equal(loaded[k], v)
    stray = save({**heads, "lins.0.model.1.weight": heads["lin0.model.1.weight"]}, "stray.pth")
    with pytest.raises(ValueError, match=r"lins\.0"):
        lpips.convert(alexnet_pth, stray, npz, expected_alexnet_sha256=None)


# ---------------------------------------------------------------------------------------------
# ADM evaluator export.
# ---------------------------------------------------------------------------------------------


def test_export_npz_in_the_adm_evaluator_layout(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "samples.npz")
    adm.export_npz(path, images)
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == ["arr_0.npy"]
    with np.load(path) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    gray = images[..., :1]
    adm.export_npz(path, gray)
    with np.load(path) as f:
        assert f["arr_0"].shape == (5, 8, 8, 3)
        np.testing.assert_array_equal(f["arr_0"][..., 2], gray[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        adm.export_npz(path, images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\.npz"):
        adm.export_npz(str(tmp_path / "samples.np"), images)


def test_integrity_records_round_trip(tmp_path):
    path = str(tmp_path / "r.json")
    integrity.write_json(path, {"b": 1, "a": [1, 2]})
    assert integrity.read_json(path) == {"a": [1, 2], "b": 1}
    with open(path) as f:
        assert json.load(f) == {"a": [1, 2], "b": 1}
    with pytest.raises(ValueError, match="8 hex digits"):
        integrity.check_sha256(path, "abc", "record")


def test_reference_statistics_are_named_by_dataset_size_count_and_path():
    """Statistics of 64 smoke images, or of a clip-art tree elsewhere, are never reused for the
    full split of the installed package."""
    base = ml_collections.ConfigDict({"name": "clipart", "image_size": None, "path": None})
    full = protocol.reference_name(base, 504)
    assert full == "clipart_native_n504"
    assert protocol.reference_name(base, 64) != full
    elsewhere = ml_collections.ConfigDict({**base.to_dict(), "path": "/tmp/a/tree"})
    other = ml_collections.ConfigDict({**base.to_dict(), "path": "/tmp/b/tree"})
    names = {full, protocol.reference_name(elsewhere, 504), protocol.reference_name(other, 504)}
    assert len(names) == 3
    lsun = ml_collections.ConfigDict({"name": "lsun/bedroom", "image_size": 256, "path": None})
    assert protocol.reference_name(lsun, 10000) == "lsun_bedroom_256_n10000"
