"""`python -m codi_jax.data.prepare --input=PATH --layout=LAYOUT --output=DIR`: a dataset to ArrayRecord shards.

Layouts (docs/data.md has the details and the commands for DF2K, LSDIR, ImageNet, InstructPix2Pix, LAION):
  folder        image files under PATH, recursive; a caption beside an image (<stem>.txt) is kept as its text
  edit_jsonl    PATH a JSONL file: {"input", "edited", "instruction"} (or InstructPix2Pix's column names)
  ip2p_folder   InstructPix2Pix's released folders: <sample>/prompt.json, <seed>_0.jpg, <seed>_1.jpg
  depth_folder  PATH/images/, PATH/depth/<stem>.npy (depth) or .png (inverse depth), PATH/captions.jsonl
  webdataset    tar shards as img2dataset writes them (<key>.jpg|png|webp + <key>.txt / <key>.json):
                PATH a folder of .tar files or a glob
  tfds          PATH a tfds dataset name in --tfds_data_dir (`--kind`, `--features` say what to read)

The records keep the image files' bytes as they are (records.py has the layout). Inputs that do not
decode, are empty, or miss a part are skipped, counted in the manifest and listed in skipped.log.

The work is planned once (the sorted list of inputs, cut into shards of --records_per_shard inputs) and
recorded in DIR/parts/plan.json. Shard j is written by process j % --process_count, to a temporary file
renamed when complete, with its statistics in DIR/parts/; a rerun after a crash skips complete shards.
The process that completes the last shard writes manifest.json, prompts.json and skipped.log. The shards
are the same for any process count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
from absl import flags, logging

from codi_jax import logging_utils, storage
from codi_jax.data import records, sources

LAYOUTS = ("folder", "edit_jsonl", "ip2p_folder", "depth_folder", "webdataset", "tfds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # webdataset image members


class SkipInput(Exception):
    """An input that cannot become a record: counted, logged, and left out."""


def _read(path: str) -> bytes:
    try:
        data = storage.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError):
        raise SkipInput(f"{path} does not exist") from None
    if not data:
        raise SkipInput(f"{path} is empty")
    return data


def _text(x) -> str:
    return (x.decode() if isinstance(x, bytes) else str(x)).strip()


# ----------------------------------------------------------------------------- layouts
# Each layout: kind, items() -> sorted list of small picklable descriptions, read(item) -> record fields.


class Folder:
    kind = "image"

    def __init__(self, path: str, **_):
        if not storage.isdir(path):
            raise FileNotFoundError(f"--input={path!r} is not a folder (layout 'folder')")
        self.root = storage.absolute(path)

    def items(self):
        files = storage.walk_files(self.root)
        return [f for f in files if os.path.splitext(f)[1].lower() in sources.IMAGE_EXTENSIONS]

    def read(self, rel: str) -> dict:
        path = storage.join(self.root, rel)
        try:
            text = storage.read_text(os.path.splitext(path)[0] + ".txt").strip()
        except FileNotFoundError:
            text = ""
        return {"key": rel, "image": _read(path), "text": text}


class EditJsonl:
    kind = "edit"

    def __init__(self, path: str, **_):
        if not storage.isfile(path):
            raise FileNotFoundError(f"--input={path!r} is not a file (layout 'edit_jsonl': a JSONL file)")
        self.path, self.root = path, storage.dirname(storage.absolute(path))

    def items(self):
        lines = storage.read_text(self.path).splitlines()
        return [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]

    def read(self, item) -> dict:
        i, line = item
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SkipInput(f"line {i} is not JSON ({e})") from None
        src, dst = d.get("input", d.get("original_image")), d.get("edited", d.get("edited_image"))
        text = d.get("instruction", d.get("edit_prompt"))
        if not src or not dst:
            raise SkipInput(f"line {i} needs 'input' and 'edited' image paths")
        if not text or not str(text).strip():
            raise SkipInput(f"line {i}: the edit has no instruction")
        return {
            "key": f"line {i}",
            "image": _read(storage.join(self.root, src)),
            "edited": _read(storage.join(self.root, dst)),
            "text": str(text).strip(),
        }


class Ip2pFolder:
    kind = "edit"

    def __init__(self, path: str, **_):
        if not storage.isdir(path):
            raise FileNotFoundError(f"--input={path!r} is not a folder (layout 'ip2p_folder')")
        self.root = storage.absolute(path)

    def items(self):
        return storage.subfolders(self.root)

    def read(self, sample: str) -> dict:
        d = storage.join(self.root, sample)
        meta = storage.join(d, "prompt.json")
        try:
            text = str(storage.read_json(meta).get("edit", "")).strip()
        except FileNotFoundError:
            raise SkipInput(f"{sample}: no prompt.json") from None
        except (json.JSONDecodeError, AttributeError) as e:
            raise SkipInput(f"{meta} is not a JSON object ({e})") from None
        if not text:
            raise SkipInput(f"{meta}: the edit has no instruction ('edit')")
        firsts = storage.glob(storage.join(d, "*_0.*"))
        if not firsts:
            raise SkipInput(f"{sample}: no <seed>_0 input image")
        stem, ext = os.path.splitext(firsts[0])
        return {"key": sample, "image": _read(firsts[0]), "edited": _read(stem[:-2] + "_1" + ext), "text": text}


class DepthFolder:
    kind = "depth"

    def __init__(self, path: str, **_):
        self.root = storage.absolute(path)
        cap = storage.join(self.root, "captions.jsonl")
        if not storage.isdir(storage.join(self.root, "images")) or not storage.isfile(cap):
            raise FileNotFoundError(f"--input={path!r} needs images/ and captions.jsonl (layout 'depth_folder')")
        self.captions = {}
        for i, line in enumerate(storage.read_text(cap).splitlines(), start=1):
            if line.strip():
                try:
                    d = json.loads(line)
                    self.captions[d["file"]] = str(d.get("caption", "")).strip()
                except (json.JSONDecodeError, KeyError, TypeError):
                    logging.warning("%s line %d: not {'file', 'caption'}; ignored", cap, i)
        self.depth_files = set(storage.listdir(storage.join(self.root, "depth")))  # one listing

    def items(self):
        return [storage.basename(p) for p in sources.list_image_files(storage.join(self.root, "images"), "--input")]

    def read(self, name: str) -> dict:
        stem = os.path.splitext(name)[0]
        image = _read(storage.join(self.root, "images", name))
        npy, png = (storage.join(self.root, "depth", stem + ext) for ext in (".npy", ".png"))
        try:
            if stem + ".npy" in self.depth_files:
                z = np.load(io.BytesIO(storage.read_bytes(npy))).astype(np.float64)
                z = z[..., 0] if z.ndim == 3 else z
                if np.any(z <= 0):
                    raise SkipInput(f"depth/{stem}.npy: depth must be > 0 (larger = farther)")
                inv = 1.0 / z
            elif stem + ".png" in self.depth_files:
                inv = records.decode_depth(_read(png))
                inv = inv[..., 0] if inv.ndim == 3 else inv
            else:
                raise SkipInput(f"no depth map depth/{stem}.npy or .png")
        except (OSError, ValueError) as e:
            raise SkipInput(f"depth map of {name} does not load ({e})") from None
        if not self.captions.get(name):
            raise SkipInput(f"captions.jsonl has no caption for {name}")
        return {"key": name, "image": image, "depth": records.depth_png(inv), "text": self.captions[name]}


class Webdataset:
    kind = "image"

    def __init__(self, path: str, **_):
        tars = storage.glob(storage.join(path, "*.tar")) if storage.isdir(path) else storage.glob(path)
        if not tars:
            raise FileNotFoundError(f"--input={path!r}: no .tar shards (layout 'webdataset')")
        self.tars = [storage.absolute(t) for t in tars]
        self._open = None  # (tar path, its open file)

    def items(self):
        """(tar, key, {suffix: (data offset, size)}) of every sample: members are read by offset (looking
        a name up in a tar of 100k members is a linear search)."""
        out = []
        for tar in self.tars:
            groups: dict[str, dict] = {}
            try:
                with storage.open_file(tar, "rb") as f, tarfile.open(fileobj=f) as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        base = os.path.basename(m.name)
                        key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                        groups.setdefault(key, {})["." + base.split(".", 1)[-1].lower()] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                logging.warning("webdataset shard %s does not read (%s); its samples are skipped", tar, e)
                out.append((tar, "", {}))
                continue
            out += [(tar, key, members) for key, members in sorted(groups.items())]
        return out

    def _member(self, tar: str, where) -> bytes:
        if self._open is None or self._open[0] != tar:
            if self._open is not None:
                self._open[1].close()
            self._open = (tar, storage.open_file(tar, "rb"))
        offset, size = where
        f = self._open[1]
        f.seek(offset)
        data = f.read(size)
        if not data:
            raise SkipInput(f"{tar} at byte {offset}: an empty member")
        return data

    def read(self, item) -> dict:
        tar, key, members = item
        if not key:
            raise SkipInput(f"{tar} is not a readable tar file")
        image = [members[s] for s in IMAGE_SUFFIXES if s in members]
        if not image:
            raise SkipInput(f"{tar}:{key} has no image ({', '.join(IMAGE_SUFFIXES)})")
        text = ""
        if ".txt" in members:
            text = _text(self._member(tar, members[".txt"]))
        elif ".json" in members:
            try:
                text = str(json.loads(self._member(tar, members[".json"])).get("caption") or "").strip()
            except (json.JSONDecodeError, AttributeError):
                text = ""
        return {"key": f"{storage.basename(tar)}:{key}", "image": self._member(tar, image[0]), "text": text}


class Tfds:
    """A tfds dataset read with `tfds.data_source` (ArrayRecord files; no TensorFlow needed)."""

    def __init__(self, path: str, *, kind: str, features: dict, tfds_data_dir: str, tfds_split: str, **_):
        import tensorflow_datasets as tfds

        if kind not in records.KINDS:
            raise ValueError(f"--kind={kind!r} must be one of {records.KINDS} (layout 'tfds')")
        self.kind, self.features = kind, features
        try:
            builder = tfds.builder(path, data_dir=tfds_data_dir or None)
            images = [k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)]
            self.ds = tfds.data_source(
                path,
                split=tfds_split,
                data_dir=tfds_data_dir or None,
                download=False,
                decoders={k: tfds.decode.SkipDecoding() for k in images},
            )
        except Exception as e:  # tfds raises many kinds for a missing dataset / split
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FileNotFoundError(f"--input={path!r} split {tfds_split!r} in {tfds_data_dir!r}: {first}") from None
        wanted = {
            "image": ("image", "caption"),
            "edit": ("input", "edited", "instruction"),
            "depth": ("image", "depth", "caption"),
        }
        have = set(builder.info.features)
        for role in wanted[kind]:
            name = features.get(role, "")
            if name and name not in have:
                raise ValueError(f"--features: {role}={name!r} is not a feature of {path} ({sorted(have)})")
        self.name = path

    def items(self):
        return list(range(len(self.ds)))

    def _image(self, x) -> bytes:
        if isinstance(x, bytes):
            if not x:
                raise SkipInput("empty image")
            return x
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(sources.to_rgb_uint8(np.asarray(x))).save(buf, format="PNG")
        return buf.getvalue()

    def read(self, i: int) -> dict:
        r, f = self.ds[i], self.features
        key = f"{self.name}[{i}]"
        if self.kind == "edit":
            text = _text(r[f["instruction"]])
            if not text:
                raise SkipInput(f"{key}: empty instruction")
            return {
                "key": key,
                "image": self._image(r[f["input"]]),
                "edited": self._image(r[f["edited"]]),
                "text": text,
            }
        out = {
            "key": key,
            "image": self._image(r[f["image"]]),
            "text": _text(r[f["caption"]]) if f.get("caption") else "",
        }
        if self.kind == "depth":
            b = np.asarray(r[f["depth"]])
            b = b[..., 0] if b.ndim == 3 else b
            # a float feature is depth (larger = farther), an integer one inverse depth (near = bright)
            inv = 1.0 / np.maximum(b.astype(np.float64), 1e-6) if np.issubdtype(b.dtype, np.floating) else b
            out["depth"] = records.depth_png(inv)
        return out


READERS = {
    "folder": Folder,
    "edit_jsonl": EditJsonl,
    "ip2p_folder": Ip2pFolder,
    "depth_folder": DepthFolder,
    "webdataset": Webdataset,
    "tfds": Tfds,
}
DEFAULT_FEATURES = {
    "image": {"image": "image", "caption": ""},
    "edit": {"input": "original_image", "edited": "edited_image", "instruction": "edit_prompt"},
    "depth": {"image": "image", "depth": "depth", "caption": "caption"},
}


# ----------------------------------------------------------------------------- one record checked


def _name(item) -> str:
    """An input's name in skipped.log: a path, 'line N', 'shard.tar:key' or a tfds index."""
    if isinstance(item, tuple) and len(item) == 3:
        return f"{storage.basename(item[0])}:{item[1]}"
    if isinstance(item, tuple):
        return f"line {item[0]}"
    return str(item)


def finish_record(fields: dict, kind: str) -> dict:
    """Decode what the trainer will decode: images that do not, or parts that do not fit, skip the input."""
    try:
        a = records.open_image(fields["image"])
        w, h = a.size
        if kind == "edit":
            b = records.open_image(fields["edited"])
            if b.size != a.size:
                raise SkipInput(f"edited image {b.size[1]}x{b.size[0]} and input {h}x{w} differ in size")
        if kind == "depth":
            d = records.decode_depth(fields["depth"])
            if d.shape[:2] != (h, w):
                raise SkipInput(f"depth map {d.shape[0]}x{d.shape[1]} and image {h}x{w} differ in size")
    except SkipInput:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, unknown format, decompression bomb
        raise SkipInput(f"does not decode ({type(e).__name__}: {e})") from None
    return dict(fields, h=int(h), w=int(w))


# ----------------------------------------------------------------------------- the plan and the shards


def plan_of(layout: str, input_path: str, kind: str, items: list, records_per_shard: int) -> dict:
    digest = hashlib.sha256(json.dumps(items, default=str).encode()).hexdigest()
    return dict(
        layout=layout,
        input=storage.absolute(input_path) if layout != "tfds" else input_path,
        kind=kind,
        num_inputs=len(items),
        records_per_shard=int(records_per_shard),
        num_shards=max(1, -(-len(items) // records_per_shard)),
        inputs_sha256=digest,
    )


def write_json(path: str, obj) -> None:
    storage.write_json(path, obj, indent=1)


class ShardWriter:
    """One shard written to a temporary file, renamed by close() (or, for a gs:// shard, written on local
    disk and uploaded: ArrayRecord writes local files only), which returns its statistics for the
    manifest (records, sha256, skipped inputs, texts, image sizes)."""

    def __init__(self, path: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        if storage.is_remote(path):
            self._local = tempfile.mkdtemp(prefix="codi_shard_")
            self._tmp = os.path.join(self._local, storage.basename(path))
        else:
            self._local, self._tmp = "", path + ".tmp"
        self._writer = ArrayRecordWriter(self._tmp, records.WRITER_OPTIONS)
        self.n, self.skipped, self.texts, self.hs, self.ws = 0, [], set(), [], []

    def add(self, fields: dict) -> None:
        self._writer.write(records.encode_record(fields))
        self.n += 1
        self.texts.add(fields.get("text", ""))
        self.hs.append(fields["h"])
        self.ws.append(fields["w"])

    def skip(self, name: str, why: str) -> None:
        self.skipped.append([name, why])

    def close(self) -> dict:
        self._writer.close()
        digest = records.file_sha256(self._tmp)
        if self._local:
            try:
                storage.copy(self._tmp, self.path)  # complete once the part's statistics are written
            finally:
                shutil.rmtree(self._local, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)
        hs, ws = self.hs, self.ws
        return dict(
            file=storage.basename(self.path),
            records=self.n,
            sha256=digest,
            skipped=self.skipped,
            texts=sorted(self.texts),
            h=[min(hs, default=0), max(hs, default=0), int(np.sum(hs))],
            w=[min(ws, default=0), max(ws, default=0), int(np.sum(ws))],
        )


def write_shard(reader, items: list, kind: str, path: str, progress=None, done_before: int = 0) -> dict:
    """Write one shard (via a temporary file); returns its statistics for the manifest."""
    shard = ShardWriter(path)
    for i, item in enumerate(items):
        try:
            shard.add(finish_record(reader.read(item), kind))
        except SkipInput as e:
            shard.skip(_name(item), str(e))
        if progress is not None:
            progress.update(done_before + i + 1)
    return shard.close()


def finalize(output: str, plan: dict, extra: dict | None = None) -> dict | None:
    """manifest.json, prompts.json, skipped.log from the shards' parts, once all are written (`extra`:
    more manifest fields)."""
    parts_dir = storage.join(output, "parts")
    n = plan["num_shards"]
    present = set(storage.listdir(parts_dir))
    if any(records.shard_name(j, n) + ".json" not in present for j in range(n)):
        return None
    parts = [storage.read_json(storage.join(parts_dir, records.shard_name(j, n) + ".json")) for j in range(n)]
    shards = [{k: s[k] for k in ("file", "records", "sha256")} for s in parts if s["records"] > 0]
    total = sum(s["records"] for s in shards)
    skipped = [row for s in parts for row in s["skipped"]]
    storage.write_text(storage.join(output, records.SKIPPED_LOG), "".join(f"{name}\t{why}\n" for name, why in skipped))
    texts = sorted({t for s in parts for t in s["texts"]} - {""})
    write_json(storage.join(output, records.PROMPTS), texts)
    hmin = min((s["h"][0] for s in parts if s["records"]), default=0)
    wmin = min((s["w"][0] for s in parts if s["records"]), default=0)
    manifest = dict(
        format=records.FORMAT,
        version=records.VERSION,
        kind=plan["kind"],
        num_records=total,
        num_skipped=len(skipped),
        shards=shards,
        image_size=dict(
            min_h=hmin,
            max_h=max((s["h"][1] for s in parts), default=0),
            mean_h=sum(s["h"][2] for s in parts) / max(total, 1),
            min_w=wmin,
            max_w=max((s["w"][1] for s in parts), default=0),
            mean_w=sum(s["w"][2] for s in parts) / max(total, 1),
        ),
        num_texts=len(texts),
        source=dict(layout=plan["layout"], input=plan["input"], inputs_sha256=plan["inputs_sha256"]),
        content_hash=records.content_hash(shards),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    )
    write_json(storage.join(output, records.MANIFEST), manifest)
    return manifest


def prepare(
    input_path: str,
    layout: str,
    output: str,
    *,
    records_per_shard: int = 1000,
    process_index: int = 0,
    process_count: int = 1,
    kind: str = "",
    features: dict | None = None,
    tfds_data_dir: str = "",
    tfds_split: str = "train",
) -> dict | None:
    """Convert one dataset (see the module docstring); returns the manifest, or None while other
    processes still have shards to write."""
    if layout not in READERS:
        raise ValueError(f"--layout={layout!r} must be one of {LAYOUTS}")
    if records_per_shard < 1:
        raise ValueError(f"--records_per_shard={records_per_shard} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"--process_index={process_index} must be in [0, --process_count={process_count})")
    kind = kind or ("image" if layout == "tfds" else "")
    feats = dict(DEFAULT_FEATURES.get(kind, {}), **(features or {}))
    reader = READERS[layout](input_path, kind=kind, features=feats, tfds_data_dir=tfds_data_dir, tfds_split=tfds_split)
    items = reader.items()
    plan = plan_of(layout, input_path, reader.kind, items, records_per_shard)
    if not items:
        raise ValueError(f"--input={input_path!r}: no inputs of layout {layout!r}")
    sizes = [len(items[j * records_per_shard : (j + 1) * records_per_shard]) for j in range(plan["num_shards"])]

    def write(j, path, progress, done):
        chunk = items[j * records_per_shard : (j + 1) * records_per_shard]
        return write_shard(reader, chunk, reader.kind, path, progress, done)

    what = f"prepare {input_path} ({layout}, {len(items)} inputs)"
    return run_shards(output, plan, sizes, write, process_index=process_index, process_count=process_count, what=what)


def run_shards(output, plan, sizes, write, *, process_index, process_count, what, extra=None) -> dict | None:
    """The resumable loop over a plan's shards, split over processes: record the plan in DIR/parts
    (a rerun must have the same one), write this process's incomplete shards with
    write(j, path, progress, done_before) -> the shard's statistics, and finalize once all are there.
    `sizes[j]`: shard j's inputs, for the progress bar. Returns the manifest, or None while other
    processes still have shards to write."""
    parts_dir = storage.join(output, "parts")
    storage.makedirs(parts_dir)
    plan_path = storage.join(parts_dir, "plan.json")
    if storage.isfile(plan_path):
        old = storage.read_json(plan_path)
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise ValueError(
                f"--output={output!r} holds a preparation of another plan (differs in {', '.join(changed)}); "
                "use a new --output folder"
            )
    else:
        write_json(plan_path, plan)
    n = plan["num_shards"]
    mine = [j for j in range(n) if j % process_count == process_index]
    present = set(storage.listdir(parts_dir))
    todo = [j for j in mine if records.shard_name(j, n) + ".json" not in present]
    own_inputs = sum(sizes[j] for j in todo)
    logging.info(
        "%s -> %s: %d shards, this process %d of %d writes %d (%d already complete)",
        what, output, n, process_index, process_count, len(todo), len(mine) - len(todo),
    )  # fmt: skip
    progress = logging_utils.Progress(
        own_inputs, every_n_steps=max(1, min(1000, own_inputs // 20)), name="prepare", unit="record"
    )
    done = 0
    for j in todo:
        stats = write(j, storage.join(output, records.shard_name(j, n)), progress, done)
        done += sizes[j]
        write_json(storage.join(parts_dir, records.shard_name(j, n) + ".json"), stats)
    manifest = finalize(output, plan, extra)
    if manifest is None:
        logging.info("prepare: this process's shards are complete; the last process to finish writes the manifest")
        return None
    logging.info(
        "prepare: %d records in %d shards, %d inputs skipped (%s), content hash %s",
        manifest["num_records"], len(manifest["shards"]), manifest["num_skipped"],
        storage.join(output, records.SKIPPED_LOG), manifest["content_hash"][:16],
    )  # fmt: skip
    return manifest


# ----------------------------------------------------------------------------- the command line


def define_flags() -> None:
    """The command line's flags (defined only when run as a command: the module is also a library)."""
    flags.DEFINE_string("input", None, "The dataset: a folder, a JSONL file, tar shards, or a tfds name.")
    flags.DEFINE_enum("layout", None, LAYOUTS, "How the input is laid out (see the module docstring).")
    flags.DEFINE_string("output", None, "Folder for the shards and the manifest.")
    flags.DEFINE_integer("records_per_shard", 1000, "Inputs per shard (about 100-500 MB shards suit GCS).")
    flags.DEFINE_integer("process_index", 0, "This process's index (split over processes / hosts).")
    flags.DEFINE_integer("process_count", 1, "How many processes share the work.")
    flags.DEFINE_enum("kind", "", ("", *records.KINDS), "layout 'tfds': image, edit or depth records.")
    flags.DEFINE_list(
        "features", [], "layout 'tfds': role=feature pairs, e.g. image=image,caption=text (defaults: docs/data.md)."
    )
    flags.DEFINE_string("tfds_data_dir", "", "layout 'tfds': the data_dir ('' = tfds' default).")
    flags.DEFINE_string("tfds_split", "train", "layout 'tfds': the split.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    F = flags.FLAGS
    for name in ("input", "layout", "output"):
        if not F[name].value:
            raise ValueError(f"--{name} is required")
    features = {}
    for pair in F.features:
        role, sep, name = pair.partition("=")
        if not sep:
            raise ValueError(f"--features: {pair!r} is not role=feature")
        features[role.strip()] = name.strip()
    prepare(
        F.input,
        F.layout,
        F.output,
        records_per_shard=F.records_per_shard,
        process_index=F.process_index,
        process_count=F.process_count,
        kind=F.kind,
        features=features,
        tfds_data_dir=F.tfds_data_dir,
        tfds_split=F.tfds_split,
    )


if __name__ == "__main__":
    define_flags()
    logging_utils.run_cli(main)
