"""`python -m codi_jax.pretrained.record_cache --input=PREPARED --output=DIR --pretrained_path=SD_FOLDER`:
a prepared dataset with the frozen encoders' outputs written into its records (MaxDiffusion's latent and
text caching).

Every record of the input folder (what `codi_jax.data.prepare` wrote) is copied with, added:
  crop           the centre crop of side --crop_size of its image (after --image_downscale),
  latent_mean,   the VAE posterior of that crop's target image (the edited image of an edit record, the
  latent_logvar  image otherwise), from SD_FOLDER/vae,
  context        the text encoder's last hidden state of the record's text, from SD_FOLDER's (or
                 --text_encoder's) tokenizer/ and text_encoder/ (records with texts; --text).
The manifest gains a 'cache' section: crop size, downscale, dtype, shapes, and a digest of each
encoder's weights, which the trainer compares with its own before it uses the cache (build.cache_fields).
A training job on the cached folder then skips the VAE encoder (and the text encoder) in its step; the
pixels still travel, for the condition and eq 15's signal-space loss.

The crop is fixed: a cached record trains on one crop, unflipped (data.random_flip must be False), where
the pixel path draws a random crop and flip each epoch (docs/data.md, docs/design-choices.md).
Records smaller than the crop are skipped and listed in skipped.log. Output shard j is input shard j;
the work is split over processes (shard j by process j % --process_count) and resumable, as prepare's.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from absl import flags, logging

from codi_jax import logging_utils, storage
from codi_jax.data import pipeline, prepare, records, sources
from codi_jax.models import clip_text
from codi_jax.models import vae as vae_lib
from codi_jax.pretrained import diffusers_folder, text_encoder

DTYPES = ("float16", "float32")


def param_digest(params) -> str:
    """sha256 of a param tree (names, shapes, dtypes, values): which weights made a cache."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{x.dtype}:{x.shape};".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def centre_box(h: int, w: int, size: int) -> tuple[int, int]:
    return (h - size) // 2, (w - size) // 2


class Encoders:
    """The frozen VAE encoder and text encoder of a diffusers folder, jitted for fixed batches."""

    def __init__(self, pretrained_path: str, text_folder: str | None, allow_pickle: bool = False):
        self.vae, self.vae_params, self.vae_cfg = diffusers_folder.load_vae(
            os.path.join(pretrained_path, "vae"), allow_pickle=allow_pickle
        )
        self.vae_digest = param_digest(self.vae_params)
        self._moments = jax.jit(lambda p, x: self.vae.apply({"params": p}, x, method=self.vae.encode))
        self.text = None if text_folder is None else text_encoder.folder_encoder(text_folder, allow_pickle)
        self.text_digest = None if self.text is None else param_digest(self.text.params)

    def moments(self, images: np.ndarray):
        mean, logvar = self._moments(self.vae_params, images)
        return np.asarray(mean), np.asarray(logvar)

    def contexts(self, texts) -> np.ndarray:
        ids = clip_text.encode_prompts(self.text.tokenizer, list(texts), max_length=self.text.max_length)
        return self.text.embed_tokens(ids)


def _padded(rows: list, n: int) -> np.ndarray:
    """Rows stacked and padded to n by repeating the last (one compiled batch shape)."""
    return np.stack(rows + [rows[-1]] * (n - len(rows)))


def cache_shard(src_path: str, dst_path: str, kind: str, enc: Encoders, opts: dict, progress, done: int) -> dict:
    """Copy one shard, each record with its cache fields (module docstring); its statistics."""
    import grain

    src = grain.sources.ArrayRecordDataSource([src_path])
    shard = prepare.ShardWriter(dst_path)
    size, bs, dtype = opts["crop_size"], opts["batch_size"], opts["dtype"]
    pending: list[tuple[dict, np.ndarray]] = []

    def flush():
        if not pending:
            return
        crops = _padded([c for _, c in pending], bs)
        mean, logvar = enc.moments(crops)
        ctx = enc.contexts([f.get("text", "") for f, _ in pending] + [""] * (bs - len(pending))) if enc.text else None
        for i, (fields, _) in enumerate(pending):
            out = dict(fields)
            out["latent_mean"] = records.array_bytes(mean[i], dtype)
            out["latent_logvar"] = records.array_bytes(logvar[i], dtype)
            if ctx is not None:
                out["context"] = records.array_bytes(ctx[i], dtype)
            shard.add(out)
        pending.clear()

    for i in range(len(src)):
        fields = records.decode_fields(src[i])
        name = f"{storage.basename(src_path)}[{i}] {fields.get('key', '')}"
        target = records.decode_rgb(fields["edited"] if kind == "edit" else fields["image"])
        target = sources.downscale(target, opts["image_downscale"], opts["downscale_resample"])
        h, w = target.shape[:2]
        if min(h, w) < size:
            shard.skip(name, f"{h}x{w} after --image_downscale is smaller than --crop_size={size}")
        else:
            y, x = centre_box(h, w, size)
            fields["crop"] = [y, x]
            pending.append((fields, pipeline.to_signed(target[y : y + size, x : x + size])))
            if len(pending) == bs:
                flush()
        progress.update(done + i + 1)
    flush()
    return shard.close()


def cache_records(
    input_path: str,
    output: str,
    pretrained_path: str,
    *,
    crop_size: int = 512,
    image_downscale: float = 1,
    downscale_resample: str = "box",
    text: bool = True,
    text_encoder_path: str = "",
    dtype: str = "float16",
    batch_size: int = 8,
    process_index: int = 0,
    process_count: int = 1,
    allow_pickle: bool = False,
) -> dict | None:
    """Write the cached copy of a prepared folder (module docstring); its manifest, or None while other
    processes still have shards to write."""
    m = records.read_manifest(input_path, "--input")
    records.check_shard_counts(m)
    if m.get("cache"):
        raise ValueError(f"--input={input_path!r} is already a cached set ({records.MANIFEST} has 'cache')")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} must be one of {DTYPES}")
    if crop_size < 1 or batch_size < 1:
        raise ValueError(f"--crop_size={crop_size} and --batch_size={batch_size} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"--process_index={process_index} must be in [0, --process_count={process_count})")
    diffusers_folder.check_folder(pretrained_path, ("vae",))
    with_text = bool(text) and int(m["num_texts"]) > 0
    enc = Encoders(pretrained_path, (text_encoder_path or pretrained_path) if with_text else None, allow_pickle)
    factor = vae_lib.downscale_factor(enc.vae_cfg)
    if crop_size % factor:
        raise ValueError(f"--crop_size={crop_size} is not a multiple of the VAE's factor {factor}")
    side = crop_size // factor
    cache = dict(
        crop_size=int(crop_size),
        image_downscale=image_downscale,
        downscale_resample=downscale_resample,
        dtype=dtype,
        target="edited" if m["kind"] == "edit" else "image",
        latent_shape=[side, side, int(enc.vae_cfg.latent_channels)],
        vae=dict(folder=os.path.abspath(pretrained_path), digest=enc.vae_digest),
        context_shape=None if enc.text is None else [enc.text.max_length, enc.text.width],
        text_encoder=None if enc.text is None else dict(folder=enc.text.name, digest=enc.text_digest),
    )
    shards = m["shards"]
    plan = dict(
        layout="cache",
        input=m["folder"],
        kind=m["kind"],
        num_inputs=int(m["num_records"]),
        num_shards=len(shards),
        inputs_sha256=m["content_hash"],
        cache=cache,
    )
    opts = dict(cache, batch_size=int(batch_size))

    def write(j, path, progress, done):
        return cache_shard(storage.join(m["folder"], shards[j]["file"]), path, m["kind"], enc, opts, progress, done)

    what = f"cache {input_path} ({m['num_records']} records; VAE{' and text encoder' if enc.text else ''})"
    sizes = [int(s["records"]) for s in shards]
    return prepare.run_shards(
        output, plan, sizes, write, process_index=process_index, process_count=process_count, what=what,
        extra=dict(cache=cache),
    )  # fmt: skip


def define_flags() -> None:
    flags.DEFINE_string("input", None, "A prepared folder (codi_jax.data.prepare's --output).")
    flags.DEFINE_string("output", None, "Folder for the cached shards and their manifest.")
    flags.DEFINE_string("pretrained_path", None, "The diffusers folder whose vae/ (and text encoder) to run.")
    flags.DEFINE_integer("crop_size", 512, "Side of the cached centre crop: the run's data.crop_size.")
    flags.DEFINE_float("image_downscale", 1, "Downscale before the crop: the run's data.image_downscale.")
    flags.DEFINE_string("downscale_resample", "box", "The run's data.downscale_resample.")
    flags.DEFINE_bool("text", True, "Also cache the text encoder's outputs of the records' texts.")
    flags.DEFINE_string("text_encoder", "", "A folder with tokenizer/ and text_encoder/ ('' = --pretrained_path's).")
    flags.DEFINE_enum("dtype", "float16", DTYPES, "How the cached arrays are stored.")
    flags.DEFINE_integer("batch_size", 8, "Records encoded together.")
    flags.DEFINE_integer("process_index", 0, "This process's index (split over processes / hosts).")
    flags.DEFINE_integer("process_count", 1, "How many processes share the work.")
    flags.DEFINE_bool("allow_pickle", False, "Read .bin (pickle) weights when no safetensors exist.")


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    F = flags.FLAGS
    for name in ("input", "output", "pretrained_path"):
        if not F[name].value:
            raise ValueError(f"--{name} is required")
    cache_records(
        F.input,
        F.output,
        F.pretrained_path,
        crop_size=F.crop_size,
        image_downscale=F.image_downscale,
        downscale_resample=F.downscale_resample,
        text=F.text,
        text_encoder_path=F.text_encoder,
        dtype=F.dtype,
        batch_size=F.batch_size,
        process_index=F.process_index,
        process_count=F.process_count,
        allow_pickle=F.allow_pickle,
    )


if __name__ == "__main__":
    define_flags()
    logging_utils.run_cli(main)
