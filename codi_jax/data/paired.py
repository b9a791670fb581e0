"""Paired datasets on disk: instructed-editing triplets and images with depth maps and captions.

`data.source` (configs/data.py):
  'edit_jsonl'   `data.pairs_file`: a JSONL file, one edit a line: {"input": PATH, "edited": PATH,
                 "instruction": TEXT}; InstructPix2Pix's column names (original_image, edited_image,
                 edit_prompt) are accepted too. Paths are relative to the file's folder.
  'ip2p_folder'  InstructPix2Pix's released layout: `data.folder`/<sample>/prompt.json ({"edit": TEXT, ...})
                 beside <seed>_0.jpg (input) and <seed>_1.jpg (edited); the first seed of each sample.
  'depth_folder' `data.folder`/images/<stem>.<ext>, `data.folder`/depth/<stem>.npy (depth, larger =
                 farther) or <stem>.png (inverse depth, near = bright, as MiDaS/DPT write it), and
                 `data.folder`/captions.jsonl: {"file": "<image file name>", "caption": TEXT} per image.
                 With `data.depth.model_path`, missing maps are made once by a depth model and written
                 to depth/ (codi_jax/data/depth_model.py).
  'tfds'         a TensorFlow Datasets dataset (`data.tfds.name` in `data.tfds.data_dir`, read with
                 `tfds.data_source`: ArrayRecord files, no TensorFlow needed); features named by
                 `data.tfds.features`: editing input / edited / instruction, depth image / depth / caption
                 (a float depth feature is depth, larger = farther; an integer one inverse depth, near = bright).
                 Splits `data.tfds.train_split` and `data.tfds.eval_split` ('' = hold out of the train split).
Records are dicts: 'a' uint8 [H, W, 3] (the input / the image), 'b' uint8 [H, W, 3] (the edited image) or
float32 [H, W] (inverse depth), 'text' str (the caption or instruction; the pipeline makes it a prompt). Only the
rows (paths and texts) or the tfds index live in memory; a record is decoded when it is read. For
datasets of millions of records, prepare ArrayRecord shards (`source='array_record'`, docs/data.md).
The last ceil(`data.eval_fraction` * N) records (sorted by name) are held out for evaluation.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os

import numpy as np
from PIL import Image, ImageOps

from codi_jax import storage
from codi_jax.data import sources

PAIRED_SOURCES = ("edit_jsonl", "ip2p_folder", "depth_folder", "tfds")


def _image(path: str, factor: float, what: str) -> np.ndarray:
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = sources.to_rgb_uint8(ImageOps.exif_transpose(im))
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not a decodable image ({e})") from None
    return sources.downscale(arr, factor)


def _inverse_depth(path: str, shape, factor: float) -> np.ndarray:
    if path.endswith(".npy"):
        z = np.load(io.BytesIO(storage.read_bytes(path))).astype(np.float32)
        if z.ndim == 3:
            z = z[..., 0]
        if np.any(z <= 0):
            raise ValueError(f"depth map {path}: depth must be > 0 (larger = farther)")
        inv = 1.0 / z
    else:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
            inv = np.asarray(im).astype(np.float32)
        if inv.ndim == 3:
            inv = inv[..., 0]
    full = (int(shape[0] * factor), int(shape[1] * factor)) if factor != 1 else tuple(shape[:2])
    if inv.shape != full:
        raise ValueError(f"depth map {path} is {inv.shape[0]}x{inv.shape[1]} but its image is {full[0]}x{full[1]}")
    if factor != 1:
        inv = np.asarray(Image.fromarray(inv).resize((shape[1], shape[0]), Image.Resampling.BOX))
    return inv


def _edit_rows(data_config) -> list[tuple[str, str, str, str]]:
    """(key, input path, edited path, instruction) of every edit."""
    rows = []
    if data_config.source == "edit_jsonl":
        path = data_config.pairs_file
        if not storage.isfile(path):
            raise FileNotFoundError(f"data.pairs_file={path!r} does not exist")
        root = storage.dirname(storage.absolute(path))
        for i, line in enumerate(storage.read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            d = json.loads(line)
            src = d.get("input", d.get("original_image"))
            dst = d.get("edited", d.get("edited_image"))
            text = d.get("instruction", d.get("edit_prompt"))
            if not src or not dst:
                raise ValueError(f"{path} line {i}: needs 'input' and 'edited' image paths")
            if not text or not str(text).strip():
                raise ValueError(f"{path} line {i}: the edit has no instruction")
            rows.append((f"{i:08d}", storage.join(root, src), storage.join(root, dst), str(text).strip()))
    else:
        folder = data_config.folder
        if not storage.isdir(folder):
            raise FileNotFoundError(f"data.folder={folder!r} does not exist")
        for sample in storage.subfolders(folder):
            d = storage.join(folder, sample)
            meta = storage.join(d, "prompt.json")
            try:
                text = storage.read_json(meta).get("edit", "")
            except FileNotFoundError:
                continue
            if not text.strip():
                raise ValueError(f"{meta}: the edit has no instruction ('edit')")
            firsts = storage.glob(storage.join(d, "*_0.*"))
            if not firsts:
                raise FileNotFoundError(f"{d}: no <seed>_0 input image")
            stem, ext = firsts[0][: -len("_0" + os.path.splitext(firsts[0])[1])], os.path.splitext(firsts[0])[1]
            rows.append((sample, firsts[0], f"{stem}_1{ext}", text.strip()))
    if not rows:
        raise ValueError(f"data.source={data_config.source!r}: no edits found")
    return rows


def _depth_rows(data_config) -> list[tuple[str, str, str, str]]:
    """(key, image path, depth path, caption) of every image."""
    root = data_config.folder
    images = sources.list_image_files(storage.join(root, "images"), "data.folder/images")
    cap_path = storage.join(root, "captions.jsonl")
    if not storage.isfile(cap_path):
        raise FileNotFoundError(f"data.folder: {cap_path} does not exist (one caption per image)")
    if data_config.depth_model_path:  # maps made once by a depth model (codi_jax/data/depth_model.py)
        from codi_jax.data import depth_model

        depth_model.estimate_missing(images, storage.join(root, "depth"), data_config.depth_model_path)
    captions = {}
    for line in storage.read_text(cap_path).splitlines():
        if line.strip():
            d = json.loads(line)
            captions[d["file"]] = str(d.get("caption", "")).strip()
    present = set(storage.listdir(storage.join(root, "depth")))
    rows = []
    for img in images:
        name = storage.basename(img)
        stem = os.path.splitext(name)[0]
        depth = [storage.join(root, "depth", stem + ext) for ext in (".npy", ".png") if stem + ext in present]
        if not depth:
            raise FileNotFoundError(f"data.folder: no depth map depth/{stem}.npy or .png for images/{name}")
        if not captions.get(name):
            raise ValueError(f"{cap_path}: no caption for {name}")
        rows.append((name, img, depth[0], captions[name]))
    return rows


@functools.lru_cache(maxsize=8)
def _rows(data_config_json: str):
    from ml_collections import ConfigDict

    dc = ConfigDict(json.loads(data_config_json))
    rows = _depth_rows(dc) if dc.source == "depth_folder" else _edit_rows(dc)
    return sorted(rows), sorted({r[3] for r in rows})


def _text(x) -> str:
    return (x.decode() if isinstance(x, bytes) else str(x)).strip()


def _tfds_split(data_config, split: str, skip_images: bool = False):
    """The `tfds.data_source` of `split` (records read one at a time, nothing materialised)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"data.source='tfds' needs tensorflow-datasets: {e}") from None
    t = data_config.tfds
    name = t.eval_split if split == "eval" and t.eval_split else t.train_split
    try:
        decoders = None
        if skip_images:  # reading the texts only: leave the images undecoded
            info = tfds.builder(t.name, data_dir=t.data_dir or None).info
            decoders = {
                k: tfds.decode.SkipDecoding() for k, f in info.features.items() if isinstance(f, tfds.features.Image)
            }
        return tfds.data_source(t.name, split=name, data_dir=t.data_dir or None, download=False, decoders=decoders)
    except Exception as e:  # tfds raises many kinds for a missing dataset / split
        raise FileNotFoundError(
            f"data.tfds: cannot open {t.name!r} split {name!r} in {t.data_dir!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _tfds_roles(dc, task: str):
    keys = dc.tfds.features
    return (keys.input, keys.edited, keys.instruction) if task == "edit" else (keys.image, keys.depth, keys.caption)


@functools.lru_cache(maxsize=4)
def _tfds_prompts(data_config_json: str, task: str):
    """The distinct texts of the dataset's splits, sorted (one pass over the text feature)."""
    from ml_collections import ConfigDict

    dc = ConfigDict(json.loads(data_config_json))
    a_key, b_key, text_key = _tfds_roles(dc, task)
    texts = set()
    for split in ("train", "eval") if dc.tfds.eval_split else ("train",):
        ds = _tfds_split(dc, split, skip_images=True)
        for i in range(len(ds)):
            r = ds[i]
            missing = [k for k in (a_key, b_key, text_key) if k not in r]
            if missing:
                raise ValueError(f"data.tfds: {dc.tfds.name} has no feature {missing[0]!r} (data.tfds.features)")
            text = _text(r[text_key])
            if not text:
                raise ValueError(f"data.tfds: {dc.tfds.name} {split} example {i} has an empty {text_key!r}")
            texts.add(text)
    return sorted(texts)


def _tfds_record(r, roles, task: str, where: str):
    """One tfds example as a paired record's (a, b, text)."""
    a_key, b_key, text_key = roles
    a = sources.to_rgb_uint8(np.asarray(r[a_key]))
    b = np.asarray(r[b_key])
    if task == "depth":
        b = b[..., 0] if b.ndim == 3 else b
        b = (
            1.0 / np.maximum(b.astype(np.float32), 1e-6)
            if np.issubdtype(b.dtype, np.floating)
            else b.astype(np.float32)
        )
    else:
        b = sources.to_rgb_uint8(b)
    if b.shape[:2] != a.shape[:2]:
        raise ValueError(f"{where}: {b_key} is {b.shape[:2]}, {a_key} {a.shape[:2]}")
    return a, b, _text(r[text_key])


def _tfds_key(data_config) -> str:
    return json.dumps({"tfds": data_config.tfds.to_dict(), "image_downscale": data_config.image_downscale})


def _rows_of(data_config):
    keys = {
        "source": data_config.source,
        "folder": data_config.folder,
        "pairs_file": data_config.pairs_file,
        "depth_model_path": data_config.depth.model_path,
    }
    return _rows(json.dumps(keys))


def dataset_prompts(data_config, task: str = "edit") -> list[str]:
    if data_config.source == "tfds":
        return list(_tfds_prompts(_tfds_key(data_config), task))
    return list(_rows_of(data_config)[1])


def _hold_out(n: int, fraction: float, split: str, what: str) -> range:
    """The train indices, or the last ceil(fraction * n) held out for evaluation."""
    k = math.ceil(fraction * n)
    if k < 1 or k >= n:
        raise ValueError(
            f"{what} has {n} records; data.eval_fraction={fraction} must leave at least one "
            "for eval and one for training"
        )
    return range(n - k) if split == "train" else range(n - k, n)


class PairedSource:
    """Records of a paired dataset split, decoded when read (grain RandomAccessDataSource): only the
    rows (paths and texts) or the tfds index are held. A record that does not decode reads as a
    `sources.Corrupt` marker, which the training pipeline skips and counts."""

    def __init__(self, data_config, split: str, task: str = "edit"):
        self.source, self.task, self.factor = data_config.source, task, data_config.image_downscale
        if data_config.source == "tfds":
            self._ds = _tfds_split(data_config, split)
            self._roles = _tfds_roles(data_config, task)
            if data_config.tfds.eval_split:
                self._ids = range(len(self._ds))
            else:  # no eval split: hold out the last records of the train split
                what = "data.tfds (or set data.tfds.eval_split)"
                self._ids = _hold_out(len(self._ds), data_config.eval_fraction, split, what)
            self._repr = f"PairedSource('tfds', {data_config.tfds.name!r}, {split!r}, {self._ids!r})"
            return
        rows, _ = _rows_of(data_config)
        ids = _hold_out(len(rows), data_config.eval_fraction, split, f"data.source={data_config.source!r}")
        self._rows = [rows[i] for i in ids]
        self._ids = range(len(self._rows))
        digest = hashlib.sha1(json.dumps([r[0] for r in self._rows]).encode()).hexdigest()[:12]
        self._repr = f"PairedSource({data_config.source!r}, {split!r}, {len(self._rows)} records sha1={digest})"

    def _read(self, i: int) -> dict:
        factor = self.factor
        if self.source == "tfds":
            j = self._ids[i]
            a, b, text = _tfds_record(self._ds[j], self._roles, self.task, f"data.tfds example {j}")
            if factor != 1:
                a = sources.downscale(a, factor)
                b = (
                    sources.downscale(b, factor)
                    if b.dtype == np.uint8
                    else np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BOX))
                )
            return {"a": a, "b": b, "text": text}
        key, a_path, b_path, text = self._rows[i]
        a = _image(a_path, factor, f"record {key}")
        if self.source == "depth_folder":
            b = _inverse_depth(b_path, a.shape, factor)
        else:
            b = _image(b_path, factor, f"record {key}")
            if b.shape != a.shape:
                raise ValueError(f"record {key}: edited image {b.shape[:2]} and input {a.shape[:2]} differ in size")
        return {"a": a, "b": b, "text": text}

    def __len__(self):
        return len(self._ids)

    def __getitem__(self, i):
        try:
            return self._read(int(i))
        except (OSError, ValueError, KeyError) as e:
            return sources.Corrupt(f"{self._repr} [{i}]", f"{type(e).__name__}: {e}")

    def __repr__(self):
        return self._repr
