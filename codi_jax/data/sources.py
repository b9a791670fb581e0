"""RGB image sources (grain RandomAccessDataSource protocol): the embedded photographs, image folders.

Each record is a read-only uint8 array of shape [H, W, 3]. The embedded photographs (a few dozen)
are decoded once and held in memory; a folder holds only its file list and decodes a file when it
is read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from codi_jax import storage

_RESAMPLE = {
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
}

# File suffixes treated as images in a folder source (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load():
        import skimage.data  # lazy: importing skimage costs ~0.5 s

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


# Name -> loader. skimage's `cat` is the same photo as `chelsea`, so only
# `chelsea` is offered (a held-out image could otherwise leak into training).
_EMBEDDED: dict[str, Callable[[], np.ndarray]] = {
    **{
        n: _skimage(n)
        for n in (
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
            "retina",
            "colorwheel",
            "logo",
            # grayscale, replicated to RGB
            "grass",
            "gravel",
            "brick",
            "camera",
            "moon",
            "coins",
            "clock",
            "cell",
            "page",
            "text",
        )
    },
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
}
EMBEDDED_IMAGE_NAMES = tuple(sorted(_EMBEDDED))


def to_rgb_uint8(img: np.ndarray | Image.Image) -> np.ndarray:
    """Any gray/RGB/RGBA/palette image -> uint8 [H, W, 3] (alpha over white)."""
    if isinstance(img, Image.Image):
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        elif img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img = np.asarray(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):  # assume [0, 1] floats
            arr = np.clip(np.round(arr * 255.0), 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 4:  # composite on white so transparent areas are white
        a = arr[..., 3:].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        arr = np.round(rgb).astype(np.uint8)
    elif arr.shape[-1] == 2:  # gray + alpha
        a = arr[..., 1:].astype(np.float32) / 255.0
        arr = np.round(arr[..., :1] * a + 255.0 * (1.0 - a)).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"Unsupported image shape {arr.shape}.")
    return np.ascontiguousarray(arr)


def downscale(img: np.ndarray, factor: float, resample: str = "box") -> np.ndarray:
    """Shrinks an uint8 RGB image by `factor` (>= 1) with PIL resampling."""
    if factor == 1:
        return img
    if factor < 1:
        raise ValueError(f"data.image_downscale must be >= 1, got {factor}.")
    if resample not in _RESAMPLE:
        raise ValueError(f"data.downscale_resample must be one of {sorted(_RESAMPLE)}, got {resample!r}.")
    h, w = img.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(img).resize(size, _RESAMPLE[resample]))


@dataclasses.dataclass(frozen=True)
class Corrupt:
    """A record that could not be decoded, in place of its array: the pipeline skips and counts it."""

    key: str
    reason: str


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # records are shared; transforms must copy
    return a


@functools.lru_cache(maxsize=64)
def _load_embedded(name: str, factor: float, resample: str) -> np.ndarray:
    # Cached: eval batches and repeated iterator construction reuse the arrays.
    return _readonly(downscale(to_rgb_uint8(_EMBEDDED[name]()), factor, resample))


class _InMemoryImageSource:
    """Random-access source of uint8 [H, W, 3] arrays."""

    _images: list[np.ndarray]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._images[index]

    @property
    def images(self) -> list[np.ndarray]:
        return list(self._images)


class EmbeddedImageSource(_InMemoryImageSource):
    """Images bundled with scikit-image / scikit-learn, selected by name."""

    def __init__(
        self,
        names: Sequence[str],
        *,
        downscale_factor: float = 1,
        resample: str = "box",
        config_key: str = "data.train_images",
    ):
        names = tuple(names)
        unknown = [n for n in names if n not in _EMBEDDED]
        if unknown:
            raise ValueError(
                f"Unknown image name(s) {unknown} in {config_key}; valid names: {', '.join(EMBEDDED_IMAGE_NAMES)}."
            )
        if not names:
            raise ValueError(f"{config_key} is empty.")
        if len(set(names)) != len(names):
            raise ValueError(f"{config_key} lists an image twice: {list(names)}.")
        self.names = names
        self.downscale_factor = downscale_factor
        self.resample = resample
        self.num_skipped = 0
        self._images = [_load_embedded(n, downscale_factor, resample) for n in names]

    @property
    def keys(self) -> tuple[str, ...]:
        """Identities used for the train/eval disjointness check."""
        return self.names

    def __repr__(self) -> str:
        # Stable across runs (no ids): grain checkpoints may record it.
        return (
            f"EmbeddedImageSource(names={list(self.names)!r}, "
            f"downscale_factor={self.downscale_factor!r}, "
            f"resample={self.resample!r})"
        )


def list_image_files(path: str, config_key: str = "data.folder", recursive: bool = False) -> list[str]:
    """Image files inside `path` (and its subfolders if `recursive`; hidden ones left out), sorted by path."""
    if not storage.isdir(path):
        raise FileNotFoundError(f"Image folder not found: {path!r} ({config_key}).")
    names = storage.walk_files(path, recursive)
    return sorted(storage.join(path, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)


def _relative(f: str, folder: str) -> str:
    """`f` relative to `folder` (either may be a gs:// URL)."""
    return os.path.relpath(f, folder) if not storage.is_remote(f) else f[len(str(folder).rstrip("/")) + 1 :]


def _real(f: str) -> str:
    return f if storage.is_remote(f) else os.path.realpath(f)


def file_digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def decode_image_file(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file, fully decoded (truncated files fail here), EXIF orientation applied."""
    with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
        im.load()
        return to_rgb_uint8(ImageOps.exif_transpose(im))


class FolderImageSource:
    """The image files of a folder, recursive (or a given file list), each decoded when it is read.

    Only the sorted file list is built at start. A file that does not decode reads as a
    `Corrupt` marker, which the training pipeline skips and counts.
    """

    def __init__(
        self,
        path: str,
        *,
        files: Sequence[str] | None = None,
        downscale_factor: float = 1,
        resample: str = "box",
        config_key: str = "data.folder",
    ):
        self.path = storage.absolute(path)
        self.files = list(files) if files is not None else list_image_files(self.path, config_key, recursive=True)
        if not self.files:
            raise ValueError(f"No image files in {self.path!r} ({config_key}).")
        self.downscale_factor = downscale_factor
        self.resample = resample
        self._list_digest = hashlib.sha1("\n".join(_relative(f, self.path) for f in self.files).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        f = self.files[index]
        try:
            arr = decode_image_file(f)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return Corrupt(f, f"{type(e).__name__}: {e}")
        return _readonly(downscale(arr, self.downscale_factor, self.resample))

    def __repr__(self) -> str:
        # Stable across runs and short for any folder size (grain checkpoints may record it).
        return (
            f"FolderImageSource(path={self.path!r}, files={len(self.files)} sha1={self._list_digest[:12]}, "
            f"downscale_factor={self.downscale_factor!r}, resample={self.resample!r})"
        )


def folder_split(data_config) -> tuple[list[str], list[str]]:
    """(train files, eval files) for source='folder'."""
    train = list_image_files(data_config.folder, recursive=True)
    if data_config.eval_folder:
        return train, list_image_files(data_config.eval_folder, "data.eval_folder", recursive=True)
    k = math.ceil(data_config.eval_fraction * len(train))
    if k < 1 or k >= len(train):
        raise ValueError(
            f"data.folder {data_config.folder!r} has {len(train)} image files; "
            f"data.eval_fraction={data_config.eval_fraction} must leave at least "
            "one for eval and one for training (or set data.eval_folder)."
        )
    return train[:-k], train[-k:]


def check_disjoint(data_config) -> None:
    """Raises ValueError if any eval image is also a training image."""
    if data_config.source == "embedded":
        overlap = sorted(set(data_config.train_images) & set(data_config.eval_images))
        if overlap:
            raise ValueError(
                f"data.train_images and data.eval_images overlap: {overlap}; eval images must be held out."
            )
        return
    if data_config.source not in ("embedded", "folder"):
        return  # paired datasets: the split is by record, disjoint by construction
    if data_config.source == "folder":
        train, evl = folder_split(data_config)
        if set(map(_real, train)) & set(map(_real, evl)):
            raise ValueError("data.folder and data.eval_folder share image files.")

        # Same content under different names also counts as overlap: the eval files' digests are held,
        # the training files are streamed past them (memory: the eval split's size).
        def digest(f):
            return file_digest(storage.read_bytes(f))

        de = {digest(f): _relative(f, data_config.eval_folder or data_config.folder) for f in evl}
        common = sorted({de[d] for d in map(digest, train) if d in de})
        if common:
            raise ValueError(f"Eval images duplicate training images in data.folder: {common}.")
