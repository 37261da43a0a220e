"""PyTorch weight files, read without making torch a dependency of apd.

Published evaluation networks (FID's Inception, LPIPS's AlexNet and linear heads) come as
PyTorch state_dicts (.pth). `read_pth` reads one with torch when it is installed. `write_npz`
stores converted tensors as an .npz that loads with numpy alone, together with the SHA-256 of
each source file and a hash of the arrays' content; `read_npz` checks that content hash, so a
modified or corrupt .npz is refused and its provenance stays checkable. A file that is not what
it should be (a text file, random bytes, a plain .npy) raises one ValueError line naming the file
and the form expected.
"""

import json
import os
import pickle
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

from apd.evaluation import integrity

_SOURCES_KEY = "__sources__"
_CONTENT_KEY = "__content_sha256__"


def read_pth(path: str, convert_hint: str, expected: str) -> dict[str, np.ndarray]:
    """A torch state_dict file -> name -> numpy array (torch layout and dtype).

    Args:
      path: the .pth file (loaded with `torch.load(weights_only=True)`: tensors only, no code).
      convert_hint: how to convert the file where torch is installed, for the error message.
      expected: what the file should be, for the error message (e.g. "pytorch-fid's
        pt_inception-2015-12-05-6726825d.pth").

    Raises:
      ValueError: if torch is not installed, or the file is not a state_dict torch can read.
    """
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"reading {path!r} (a PyTorch state_dict) needs torch, which is not installed. "
            f"Convert it where torch is installed: {convert_hint}"
        ) from e
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{path!r} is not a PyTorch state_dict torch can read ({type(err).__name__}); "
            f"expected {expected}."
        ) from None
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{path!r} holds a {type(state_dict).__name__}, not a state_dict; expected {expected}."
        )
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


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


def check_source(path: str, sources: Mapping[str, str], name: str, expected: str | None) -> None:
    """ValueError unless the recorded SHA-256 of source `name` starts with `expected` (if given)."""
    if expected is None:
        return
    recorded = sources.get(name, "")
    if not recorded.startswith(expected.lower()):
        raise ValueError(
            f"{path!r} was converted from a {name} file with SHA-256 {recorded or '(none)'}, "
            f"expected one starting with {expected.lower()}: not the published weights."
        )
