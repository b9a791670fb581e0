"""Our record layout in ArrayRecord shards, and the streaming source that reads it.

A prepared dataset is a folder (`python -m codi_jax.data.prepare` writes it; docs/data.md):

  manifest.json                      format, version, kind, record count, shards (file, records, sha256),
                                     image size statistics, source, content hash, skipped inputs
  records-00000-of-00012.array_record ...   the shards (ArrayRecord, group_size 1: random access)
  prompts.json                       the distinct texts, sorted (the prompt table of tasks with prompts)
  skipped.log                        one line per input that could not be read, and why

One record is a msgpack map (format version 1):

  key     str    the input's name (file path relative to the input, tar member, tfds index)
  image   bytes  the image file's bytes as they were (JPEG, PNG, WebP...: never re-encoded), or PNG bytes
                 where the input held decoded pixels (tfds); for 'edit' the input image
  edited  bytes  'edit' only: the edited image
  depth   bytes  'depth' only: inverse depth (near = bright) as a 16-bit grayscale PNG, scaled per image to
                 0..65535 (the condition is normalised per crop, so the scale is free; docs/data.md)
  text    str    the caption or instruction ('' when the input has none)
  h, w    int    the image's size after its EXIF orientation

The cache pass (`python -m codi_jax.pretrained.record_cache`, docs/data.md) adds, to every record, what
the frozen VAE encoder and text encoder make of it; the manifest's 'cache' section gives their shapes,
dtype and the weights' digests:

  crop          [y, x]  top-left corner of the cached crop (side cache.crop_size, in the image after
                        cache.image_downscale)
  latent_mean   bytes   the VAE posterior's mean of the crop's target image, cache.latent_shape [h, w, C]
  latent_logvar bytes   its log-variance (the step draws z = mean + exp(logvar / 2) * noise as it would)
  context       bytes   the text encoder's last hidden state of the record's text, cache.context_shape [L, D]

Fields a reader does not know are ignored, so a cached set also trains without its cache.

Kinds: 'image' (folders, webdataset, tfds images), 'edit' (edit_jsonl, ip2p_folder, tfds edits), 'depth'
(depth_folder, tfds depth). Decoding happens when the pipeline asks for a record; a record that does not
decode becomes a `Corrupt` marker, which the pipeline drops and counts (pipeline.SkipAndBatch).
"""

from __future__ import annotations

import hashlib
import io
import math

import msgpack
import numpy as np
from PIL import Image, ImageOps

from codi_jax import storage
from codi_jax.data import sources
from codi_jax.data.sources import Corrupt

FORMAT = "codi-jax-records"
VERSION = 1
KINDS = ("image", "edit", "depth")
MANIFEST = "manifest.json"
PROMPTS = "prompts.json"
SKIPPED_LOG = "skipped.log"
SHARD_SUFFIX = ".array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access costs one chunk read


def shard_name(index: int, count: int) -> str:
    return f"records-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


# ----------------------------------------------------------------------------- one record


def encode_record(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def decode_fields(raw: bytes) -> dict:
    d = msgpack.unpackb(raw, raw=False)
    if not isinstance(d, dict) or "image" not in d:
        raise ValueError("not a codi-jax record (no 'image' field)")
    return d


def open_image(data: bytes) -> Image.Image:
    """A fully decoded PIL image (truncated files fail here), EXIF orientation applied."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return ImageOps.exif_transpose(im)


def decode_rgb(data: bytes) -> np.ndarray:
    return sources.to_rgb_uint8(open_image(data))


def depth_png(inverse_depth: np.ndarray) -> bytes:
    """Inverse depth [H, W] (near = large) -> 16-bit grayscale PNG bytes, min..max scaled to 0..65535."""
    inv = np.asarray(inverse_depth, np.float64)
    if inv.ndim != 2 or not np.all(np.isfinite(inv)):
        raise ValueError(f"inverse depth must be a finite 2-D map, got shape {inv.shape}")
    lo, hi = float(inv.min()), float(inv.max())
    q = np.round((inv - lo) / max(hi - lo, 1e-12) * 65535.0).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="PNG")
    return buf.getvalue()


def decode_depth(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.float32)


# ----------------------------------------------------------------------------- a prepared folder


def read_manifest(path: str, config_key: str = "data.path") -> dict:
    """The manifest of a prepared folder, checked against the shards on disk (one-line errors)."""
    folder = storage.absolute(path)
    mpath = storage.join(folder, MANIFEST)
    if not storage.isdir(folder):
        raise FileNotFoundError(f"{config_key}={path!r}: no such folder (prepare it with codi_jax.data.prepare)")
    if not storage.isfile(mpath):
        raise FileNotFoundError(
            f"{config_key}={path!r} has no {MANIFEST}: not a prepared dataset, or its preparation has not finished"
        )
    m = storage.read_json(mpath)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(
            f"{mpath}: format {m.get('format')!r} version {m.get('version')!r}; expected {FORMAT} {VERSION}"
        )
    if m.get("kind") not in KINDS:
        raise ValueError(f"{mpath}: field 'kind' is {m.get('kind')!r}, not one of {KINDS}")
    present = set(storage.listdir(folder))  # one listing, not a request per shard
    total = 0
    for s in m["shards"]:
        if s["file"] not in present:
            shard = storage.join(folder, s["file"])
            raise FileNotFoundError(f"{config_key}: shard {shard} listed in {MANIFEST} is missing")
        total += int(s["records"])
    if total != int(m["num_records"]):
        raise ValueError(f"{mpath}: field 'num_records' is {m['num_records']} but its shards hold {total}")
    if total == 0:
        raise ValueError(f"{mpath}: the dataset has no records")
    m["folder"] = folder
    return m


def check_shard_counts(manifest: dict) -> None:
    """Open every shard and compare its record count with the manifest's (reads only the footers)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for s in manifest["shards"]:
        path = storage.join(manifest["folder"], s["file"])
        try:
            reader = ArrayRecordReader(path)
        except Exception as e:  # array_record raises RuntimeError/ValueError with a long status text
            raise ValueError(f"shard {path} is not a readable ArrayRecord file ({str(e).splitlines()[0]})") from None
        n = reader.num_records()
        reader.close()
        if n != int(s["records"]):
            raise ValueError(f"shard {path} holds {n} records but {MANIFEST} says {s['records']} (field 'records')")


def read_prompts(folder: str) -> list[str]:
    path = storage.join(folder, PROMPTS)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path} is missing (written by codi_jax.data.prepare beside the manifest)")
    return list(storage.read_json(path))


def content_hash(shards: list[dict]) -> str:
    """One digest of the whole dataset: the shards' sha256 in order."""
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the cache's fields

# What a record's cache gives the pipeline: 'latent' (latent_mean and latent_logvar) and 'context'.
CACHE_FIELDS = ("latent", "context")


def array_bytes(x: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _array(d: dict, field: str, shape, dtype: str) -> np.ndarray:
    raw = d.get(field)
    if raw is None:
        raise KeyError(f"record has no {field!r} field (the manifest's cache says every record has)")
    x = np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))
    if x.size != math.prod(shape):
        raise ValueError(f"field {field!r} holds {x.size} values, not the manifest's cache shape {list(shape)}")
    return x.reshape(shape).astype(np.float32)


def cache_arrays(d: dict, cache: dict, fields) -> dict:
    """A record's cached arrays (float32), under the batch keys the loss reads (methods/latent.py, text.py)."""
    out = {}
    if "latent" in fields:
        for key in ("latent_mean", "latent_logvar"):
            out[key] = _array(d, key, cache["latent_shape"], cache["dtype"])
    if "context" in fields:
        out["context"] = _array(d, "context", cache["context_shape"], cache["dtype"])
    return out


# ----------------------------------------------------------------------------- the streaming source


def hold_out(n: int, fraction: float, what: str) -> int:
    """How many of n records the last ceil(fraction * n) are (the held-out eval records)."""
    k = math.ceil(fraction * n)
    if k < 1 or k >= n:
        raise ValueError(
            f"{what} has {n} records; data.eval_fraction={fraction} must leave at least one for eval and one "
            "for training (or set data.eval_path)"
        )
    return k


class RecordSource:
    """Records [start, stop) of a prepared folder, decoded on read (grain RandomAccessDataSource).

    kind 'image' gives uint8 [H, W, 3]; 'edit' / 'depth' give {'a', 'b', 'text'} like the paired
    sources (the pipeline turns the text into a prompt index or tokens). Only the shards' indices are
    held in memory.
    """

    def __init__(
        self,
        manifest: dict,
        *,
        start: int = 0,
        stop: int | None = None,
        downscale_factor: float = 1,
        resample: str = "box",
        cache_fields: tuple = (),
    ):
        import grain

        self.manifest = manifest
        self.kind = manifest["kind"]
        paths = [storage.join(manifest["folder"], s["file"]) for s in manifest["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(paths)
        n = len(self._source)
        self.start, self.stop = int(start), int(n if stop is None else stop)
        if not 0 <= self.start < self.stop <= n:
            raise ValueError(f"records [{self.start}, {self.stop}) outside the dataset's {n}")
        self.downscale_factor, self.resample = downscale_factor, resample
        self.cache_fields = tuple(cache_fields)
        for name in self.cache_fields:
            if name not in CACHE_FIELDS:
                raise ValueError(f"cache field {name!r} is not one of {CACHE_FIELDS}")
        if self.cache_fields and not manifest.get("cache"):
            raise ValueError(f"{manifest['folder']}: the records carry no cache (manifest has no 'cache' section)")

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        raw = self._source[self.start + int(index)]
        key = f"{self.manifest['folder']}[{self.start + int(index)}]"
        try:
            return self._decode(decode_fields(raw))
        except (OSError, ValueError, KeyError, SyntaxError, msgpack.UnpackException, Image.DecompressionBombError) as e:
            return Corrupt(key, f"{type(e).__name__}: {e}")

    def _decode(self, d: dict):
        out = self._decode_pixels(d)
        if not self.cache_fields:
            return out
        # The cached crop, and what the frozen encoders made of it: the pipeline crops nothing more.
        y, x = (int(v) for v in d["crop"])
        s = int(self.manifest["cache"]["crop_size"])
        cut = lambda im: np.ascontiguousarray(im[y : y + s, x : x + s])
        pixels = cut(out) if self.kind == "image" else dict(out, a=cut(out["a"]), b=cut(out["b"]))
        return {"pixels": pixels, "cache": cache_arrays(d, self.manifest["cache"], self.cache_fields)}

    def _decode_pixels(self, d: dict):
        f, rs = self.downscale_factor, self.resample
        a = sources.downscale(decode_rgb(d["image"]), f, rs)
        if self.kind == "image":
            a.setflags(write=False)
            return a
        if self.kind == "edit":
            b = sources.downscale(decode_rgb(d["edited"]), f, rs)
            if b.shape != a.shape:
                raise ValueError(f"edited image {b.shape[:2]} and input {a.shape[:2]} differ in size")
        else:
            b = decode_depth(d["depth"])
            if b.shape != (int(d["h"]), int(d["w"])):
                raise ValueError(f"depth map {b.shape} and image {(d['h'], d['w'])} differ in size")
            if f != 1:
                b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BOX))
        return {"a": a, "b": b, "text": d.get("text", "")}

    def __repr__(self) -> str:
        # Stable across runs: grain checkpoints may record it.
        return (
            f"RecordSource({self.manifest['folder']!r}, [{self.start}, {self.stop}), {self.manifest['content_hash']})"
        )
