"""Clip art at 64 x 64 RGB from the Debian package `openclipart-png` (Open Clip Art Library 0.18).

The package installs 8,121 public-domain PNGs under `/usr/share/openclipart/png/` in 22 category
folders (with sub-folders): 6,900 files and 1,221 symbolic links that repeat a file under another
category. This module reads the files as follows.

Selection, from the file names and PNG headers alone (so the file list, labels and split are
known without decoding), of the 6,900 files:
- links are skipped (so no image appears twice, or in both splits);
- the 1,375 generated star polygons `shapes/stars/star_<N>pt<K>step.png` (`EXCLUDED`: one
  procedural family, a fifth of the files, nearly identical grey rings at 64 x 64) are left out;
- of the rest, 25 files with a long side under `MIN_SIDE` (48) pixels, 28 whose long side is more
  than `MAX_ASPECT` (4) times the short side and 17 over `MAX_PIXELS` (4096 x 4096; up to
  20,990 x 29,700, gigabytes to decode) are left out.
5,455 images remain: 4,951 train and 504 test.

Decoding (`decode`): the image, converted to RGBA, is cropped to the bounding box of its
non-transparent pixels, composited on white, padded with white to a centred square (of side at
least `MIN_SIDE`, so tiny drawings are not blown up) and resized to 64 x 64 with a Lanczos
filter (box-averaged first by an integer factor when much larger). uint8 RGB.

Labels: the top-level category folder, an index into `CATEGORIES` (alphabetical). The classes are
unbalanced: computer (mostly icon themes) 1,778 images, signs_and_symbols 987 (491 of them
flags), recreation 484, down to logos 7 and buttons 3 (none of them in the test split).

Split: a file is in "test" when the SHA-256 of its path relative to the root (with '/') falls in
the first tenth of the hash range, else in "train": the same on every machine, for any file
order, and a file keeps its split when others are added or removed. Within a split, images are
in the order of their relative paths.

Decoding every file takes a minute or more on 2 CPU cores (63 s on a busy machine; reading the
cache back takes 0.6 s), so `load` keeps the decoded images of both splits in one cache file
(`clipart-64-<key>.npz` in `default_cache_dir()`, 84 MB), keyed by a hash of the root
directory, the selected files' relative paths, byte sizes and modification times and this
module's processing settings; a changed file list, file or setting reads the files again. The
file is written atomically.
"""

import hashlib
import os
import re
import struct
import zlib

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from apd import cache as apd_cache

DEFAULT_PATH = "/usr/share/openclipart/png"
PACKAGE = "openclipart-png"
IMAGE_SIZE = 64
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)
# The package's top-level category folders; a label is an index into this tuple.
CATEGORIES = (
    "animals",
    "buildings",
    "buttons",
    "computer",
    "containers",
    "decorations",
    "education",
    "electronics",
    "food",
    "geography",
    "logos",
    "office",
    "people",
    "plants",
    "recreation",
    "science",
    "shapes",
    "signs_and_symbols",
    "special",
    "tools",
    "transportation",
    "unsorted",
)
NUM_CLASSES = len(CATEGORIES)
SPLITS = ("train", "test")

# Files left out whatever their size (relative paths): the generated star polygons.
EXCLUDED = re.compile(r"shapes/stars/star_\d+pt\d+step\.png")
MIN_SIDE = 48
MAX_ASPECT = 4
MAX_PIXELS = 4096 * 4096
TEST_FRACTION = 0.1
# Part of the cache key: change it whenever `decode` or the selection changes its output.
_FORMAT = (
    f"clipart-v1|excluded={EXCLUDED.pattern}|size={IMAGE_SIZE}|min={MIN_SIDE}|"
    f"aspect={MAX_ASPECT}|px={MAX_PIXELS}"
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHITE = (255, 255, 255)


def default_cache_dir() -> str:
    """Where `load` keeps decoded images: $APD_CACHE/datasets, else ~/.cache/apd/datasets."""
    return os.path.join(apd_cache.root(), "datasets")


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR header, without decoding the image.

    Raises:
      ValueError: if the file does not start with a PNG signature and an IHDR chunk.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(
            f"{path!r} is not a PNG file: expected the PNG signature followed by an IHDR chunk."
        )
    return struct.unpack(">II", head[16:24])


def split_of(relpath: str) -> str:
    """The split of a file, "test" or "train", from the SHA-256 of its '/'-separated path
    relative to the root."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if fraction < TEST_FRACTION else "train"


def _usable(width: int, height: int) -> bool:
    long, short = max(width, height), min(width, height)
    return long >= MIN_SIDE and long <= MAX_ASPECT * short and width * height <= MAX_PIXELS


def list_files(path: str = DEFAULT_PATH) -> list[tuple[str, int, int]]:
    """The selected files under `path`: (relative path with '/', size in bytes, modification time
    in ns), sorted by path.

    Raises:
      FileNotFoundError: `path` is not a directory or holds no selected PNG (the message names
        the Debian package).
      ValueError: a PNG outside the category folders of `CATEGORIES`, or a file named .png that
        is not a PNG.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(_missing_message(path, "is not a directory"))
    files = []
    for directory, _, names in os.walk(path):  # Linked folders are not followed.
        for name in names:
            full = os.path.join(directory, name)
            if not name.lower().endswith(".png") or os.path.islink(full):
                continue
            relpath = os.path.relpath(full, path).replace(os.sep, "/")
            if EXCLUDED.fullmatch(relpath):
                continue
            category = relpath.split("/")[0] if "/" in relpath else None
            if category not in CATEGORIES:
                raise ValueError(
                    f"{full!r} is not in a category folder of {path!r}; expected PNGs under "
                    f"one of {list(CATEGORIES)} (the layout of the package {PACKAGE})."
                )
            if _usable(*png_size(full)):
                stat = os.stat(full)
                files.append((relpath, stat.st_size, stat.st_mtime_ns))
    if not files:
        raise FileNotFoundError(_missing_message(path, "holds no usable clip-art PNG"))
    return sorted(files)


def _missing_message(path: str, problem: str) -> str:
    return (
        f"clip art not found: {path!r} {problem}. Install the Debian package {PACKAGE} "
        f"(sudo apt-get install {PACKAGE}; it installs {DEFAULT_PATH}) or pass "
        "--config.data.path=DIR with a directory of PNGs in its category folders."
    )


def decode(file: str) -> np.ndarray:
    """One clip-art PNG as uint8 [64, 64, 3]: alpha-cropped, on white, padded square, resized.

    Raises:
      ValueError: the file is not a readable image.
    """
    try:
        with Image.open(file) as image:
            rgba = image.convert("RGBA")
    except (UnidentifiedImageError, OSError, SyntaxError, zlib.error) as e:
        raise ValueError(f"cannot decode the clip-art image {file!r}: {e}") from e
    box = rgba.getchannel("A").getbbox()
    if box is None:  # Fully transparent: a white image.
        return np.full(IMAGE_SHAPE, 255, np.uint8)
    rgba = rgba.crop(box)
    width, height = rgba.size
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    side = max(width, height, MIN_SIDE)
    square = Image.new("RGB", (side, side), _WHITE)
    square.paste(rgb, ((side - width) // 2, (side - height) // 2))
    small = square.resize(
        (IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    return np.asarray(small, np.uint8)


def _cache_key(path: str, files: list[tuple[str, int, int]]) -> str:
    digest = hashlib.sha256(f"{_FORMAT}|{os.path.realpath(path)}".encode())
    for relpath, size, mtime_ns in files:
        digest.update(f"\n{relpath}\t{size}\t{mtime_ns}".encode())
    return digest.hexdigest()


def cache_path(cache_dir: str, path: str, files: list[tuple[str, int, int]]) -> str:
    """The cache file in `cache_dir` of the selected `files` (`list_files(path)`) under `path`."""
    return os.path.join(cache_dir, f"clipart-{IMAGE_SIZE}-{_cache_key(path, files)[:16]}.npz")


def _read_cache(path: str, key: str, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (images, labels), or None if absent, unreadable or not for this key."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as cached:
            if str(cached["key"]) != key:
                return None
            images, labels = cached["images"], cached["labels"]
    except (OSError, ValueError, KeyError, zlib.error) as e:
        logging.warning("ignoring the unreadable clip-art cache %s: %s", path, e)
        return None
    if images.shape != (count, *IMAGE_SHAPE) or labels.shape != (count,):
        return None
    return images, labels


def _write_cache(path: str, key: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes the cache atomically: a temporary file in the same directory renamed over `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # One writer per process; the rename is atomic.
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.str_(key), images=images, labels=labels)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_all(
    path: str = DEFAULT_PATH, cache_dir: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every selected image of both splits, from the cache or decoded (and then cached).

    Args:
      path: the root of the category folders; default the Debian package's.
      cache_dir: where the decoded images are kept; default `default_cache_dir()`.

    Returns:
      relpaths: the files' '/'-separated paths relative to `path`, sorted.
      images: uint8 [N, 64, 64, 3], row i decoded from relpaths[i].
      labels: int32 [N], indices into `CATEGORIES`.
    """
    files = list_files(path)
    relpaths = [relpath for relpath, _, _ in files]
    key = _cache_key(path, files)
    cache = cache_path(cache_dir or default_cache_dir(), path, files)
    cached = _read_cache(cache, key, len(files))
    if cached is not None:
        return relpaths, *cached
    logging.info("decoding %d clip-art PNGs under %s into %s", len(files), path, cache)
    images = np.stack([decode(os.path.join(path, *relpath.split("/"))) for relpath in relpaths])
    labels = np.array([CATEGORIES.index(r.split("/")[0]) for r in relpaths], np.int32)
    _write_cache(cache, key, images, labels)
    return relpaths, images, labels


def load(
    split: str, path: str = DEFAULT_PATH, cache_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One split of the clip art, in the order of the files' relative paths.

    Args:
      split: "train" (about 90% of the files) or "test" (about 10%); see the module docstring.
      path: the root of the category folders; default `/usr/share/openclipart/png`.
      cache_dir: where the decoded images are kept; default `default_cache_dir()`.

    Returns:
      images: uint8 [N, 64, 64, 3].
      labels: int32 [N] in [0, NUM_CLASSES - 1]; `CATEGORIES[label]` is the category's name.

    Raises:
      FileNotFoundError: the files are absent (the message names the Debian package).
      ValueError: an unknown split, or a file that is not a readable PNG.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown clip-art split {split!r}; expected one of {list(SPLITS)}.")
    relpaths, images, labels = load_all(path, cache_dir)
    keep = np.array([split_of(relpath) == split for relpath in relpaths], bool)
    return images[keep], labels[keep]
