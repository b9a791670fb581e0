"""`python -m codi_jax.data.examples --output=DIR`: small inputs of every layout `prepare` reads.

Made from the embedded photographs, so the README's data commands, the tests and the data benchmark
work on a machine with nothing downloaded:

  DIR/folder/           photos as PNG and JPEG in two subfolders, a caption beside some (<stem>.txt),
                        plus one undecodable and one empty file (prepare skips and counts them)
  DIR/edits.jsonl       instructed edits: input and edited image paths (DIR/edit_images/) and instructions
  DIR/ip2p/             InstructPix2Pix's layout: <sample>/prompt.json, <seed>_0.jpg, <seed>_1.jpg
  DIR/depth/            images/, depth/<stem>.npy (rendered scenes' exact depth), captions.jsonl
  DIR/webdataset/       tar shards as img2dataset writes them: <key>.jpg, <key>.txt, <key>.json
  DIR/tfds/             a tfds dataset 'codi_example_edits' (InstructPix2Pix's feature names), built
                        without TensorFlow

The edits are the computable ones of the tiny editing task and the depth scenes its rendered ones
(codi_jax/data/tasks.py), so a model trained on them can be checked.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from absl import flags
from PIL import Image

from codi_jax import logging_utils
from codi_jax.data import sources, tasks

PHOTOS = ("astronaut", "rocket", "china", "coffee", "chelsea", "flower", "immunohistochemistry", "retina")
TFDS_NAME = "codi_example_edits"


def photos(n: int, height: int = 96, width: int = 128) -> list[np.ndarray]:
    """n uint8 crops [height, width, 3] of the embedded photographs (several crops of each)."""
    out = []
    for i in range(n):
        img = sources.EmbeddedImageSource([PHOTOS[i % len(PHOTOS)]], downscale_factor=2)[0]
        k = i // len(PHOTOS)
        y = min(k * 17, img.shape[0] - height)
        x = min(k * 23, img.shape[1] - width)
        out.append(np.ascontiguousarray(img[y : y + height, x : x + width]))
    return out


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _save(path: str, arr: np.ndarray, fmt: str = "PNG") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(arr, fmt))
    return path


def _edit(photo: np.ndarray, i: int):
    from configs import data as data_configs  # the tiny editing task's edits (run from the repository root)

    ecfg = data_configs.edits()
    name = ecfg.names[i % len(ecfg.names)]
    instruction = tasks.EDITS[name][0]
    out = tasks.apply_edit(name, photo.astype(np.float32) / 255.0, ecfg)
    return np.round(out * 255).astype(np.uint8), instruction


def write_folder(root: str, n: int = 12) -> str:
    for i, p in enumerate(photos(n)):
        sub = "a" if i % 2 else "b"
        fmt, ext = ("JPEG", ".jpg") if i % 3 == 0 else ("PNG", ".png")
        path = _save(os.path.join(root, sub, f"photo{i:03d}{ext}"), p, fmt)
        if i % 4 == 0:
            with open(os.path.splitext(path)[0] + ".txt", "w") as f:
                f.write(f"photograph number {i}")
    with open(os.path.join(root, "b", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image")
    open(os.path.join(root, "a", "empty.jpg"), "wb").close()
    return root


def write_edit_jsonl(root: str, n: int = 10) -> str:
    lines = []
    for i, p in enumerate(photos(n)):
        out, text = _edit(p, i)
        _save(os.path.join(root, "edit_images", f"in{i:03d}.png"), p)
        _save(os.path.join(root, "edit_images", f"out{i:03d}.png"), out)
        lines.append(
            {"input": f"edit_images/in{i:03d}.png", "edited": f"edit_images/out{i:03d}.png", "instruction": text}
        )
    lines.append({"input": "edit_images/missing.png", "edited": "edit_images/out000.png", "instruction": "x"})
    path = os.path.join(root, "edits.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return path


def write_ip2p(root: str, n: int = 10) -> str:
    for i, p in enumerate(photos(n)):
        out, text = _edit(p, i)
        d = os.path.join(root, f"{i:07d}")
        _save(os.path.join(d, f"{1000 + i}_0.jpg"), p, "JPEG")
        _save(os.path.join(d, f"{1000 + i}_1.jpg"), out, "JPEG")
        with open(os.path.join(d, "prompt.json"), "w") as f:
            json.dump({"input": "a photograph", "edit": text, "output": "an edited photograph"}, f)
    return root


def write_depth(root: str, n: int = 10) -> str:
    from configs import data as data_configs

    dcfg = data_configs.depth_scenes()
    captions = tasks.depth_captions(dcfg)
    texts = tasks.depth_prompts(dcfg)
    os.makedirs(os.path.join(root, "depth"), exist_ok=True)
    lines = []
    for i, p in enumerate(photos(n, 96, 96)):
        k = (5 * i) % len(captions)
        rgb, z, _ = tasks.render_scene(p, np.random.default_rng(i), dcfg, 96, captions[k])
        _save(os.path.join(root, "images", f"scene{i:03d}.png"), np.round(rgb * 255).astype(np.uint8))
        np.save(os.path.join(root, "depth", f"scene{i:03d}.npy"), z)
        lines.append({"file": f"scene{i:03d}.png", "caption": texts[k]})
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
    return root


def write_webdataset(root: str, n: int = 12, per_tar: int = 5) -> str:
    os.makedirs(root, exist_ok=True)
    ps = photos(n)
    for t in range(-(-n // per_tar)):
        with tarfile.open(os.path.join(root, f"{t:05d}.tar"), "w") as tf:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                key = f"{t:05d}{i:04d}"
                members = {
                    f"{key}.jpg": encode(ps[i], "JPEG"),
                    f"{key}.txt": f"a photograph, crop {i}".encode(),
                    f"{key}.json": json.dumps({"key": key, "caption": f"a photograph, crop {i}"}).encode(),
                }
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def build_tfds(data_dir: str, name: str, features: dict, examples: list[dict]) -> str:
    """A tfds dataset in ArrayRecord files, written without TensorFlow (uint8 images as PNG bytes)."""
    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, ex in enumerate(examples):
            yield i, {k: encode(v) if isinstance(v, np.ndarray) and v.dtype == np.uint8 else v for k, v in ex.items()}

    # tfds names a builder after its class (CamelCase -> snake_case) and registers it once per process.
    camel = "".join(w.capitalize() for w in name.split("_"))
    builder = type(
        camel,
        (tfds.core.GeneratorBasedBuilder,),
        dict(
            VERSION=tfds.core.Version("1.0.0"),
            _info=_info,
            _split_generators=_split_generators,
            _generate_examples=_generate_examples,
            # one dotless name: tfds then looks for no code files (it would in a package)
            __module__="codi_example_datasets",
        ),
    )
    builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def write_tfds(data_dir: str, n: int = 10) -> str:
    import tensorflow_datasets as tfds

    rows = []
    for i, p in enumerate(photos(n)):
        out, text = _edit(p, i)
        rows.append({"original_image": p, "edited_image": out, "edit_prompt": text})
    features = {
        "original_image": tfds.features.Image(shape=(None, None, 3)),
        "edited_image": tfds.features.Image(shape=(None, None, 3)),
        "edit_prompt": tfds.features.Text(),
    }
    return build_tfds(data_dir, TFDS_NAME, features, rows)


def write_all(output: str) -> dict:
    """Every layout under `output`; returns {layout: the --input of prepare}."""
    return {
        "folder": write_folder(os.path.join(output, "folder")),
        "edit_jsonl": write_edit_jsonl(output),
        "ip2p_folder": write_ip2p(os.path.join(output, "ip2p")),
        "depth_folder": write_depth(os.path.join(output, "depth")),
        "webdataset": write_webdataset(os.path.join(output, "webdataset")),
        "tfds": write_tfds(os.path.join(output, "tfds")),
    }


def main(argv):
    del argv
    if not flags.FLAGS.output:
        raise ValueError("--output is required")
    for layout, path in write_all(flags.FLAGS.output).items():
        print(f"{layout:13s} {path}")


if __name__ == "__main__":
    flags.DEFINE_string("output", None, "Folder for the example inputs.")
    logging_utils.run_cli(main)
