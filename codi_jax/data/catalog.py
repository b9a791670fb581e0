"""Which source a data config names: the embedded images, an image folder, prepared shards, or a paired dataset."""

from __future__ import annotations

from codi_jax.data import paired, records, sources

SOURCES = ("embedded", "folder", "array_record", *paired.PAIRED_SOURCES)
# The tasks each kind of prepared record serves: images feed every task (edit and depth make their tiny
# computable examples from photographs), pairs only their own.
KIND_TASKS = {"image": ("uncond", "sr", "inpaint", "edit", "depth"), "edit": ("edit",), "depth": ("depth",)}


def record_kind(data_config) -> str:
    return records.read_manifest(data_config.path, "data.path")["kind"]


def record_text_count(data_config) -> int:
    """Distinct texts of the prepared train (and eval) folders, from their manifests (an upper bound of
    the union's size; nothing else is read)."""
    paths = [("data.path", data_config.path)] + (
        [("data.eval_path", data_config.eval_path)] if data_config.eval_path else []
    )
    return sum(int(records.read_manifest(path, key)["num_texts"]) for key, path in paths)


def record_prompts(data_config) -> list[str]:
    """The distinct texts of the prepared train (and eval) folders, sorted: one prompt list for both splits."""
    paths = [("data.path", data_config.path)] + (
        [("data.eval_path", data_config.eval_path)] if data_config.eval_path else []
    )
    texts = set()
    for key, path in paths:
        texts.update(records.read_prompts(records.read_manifest(path, key)["folder"]))
    return sorted(texts)


def record_cache(data_config) -> dict | None:
    """The 'cache' section of the prepared train folder's manifest (codi_jax.pretrained.record_cache), or None."""
    if data_config.source != "array_record" or not data_config.path:
        return None
    return records.read_manifest(data_config.path, "data.path").get("cache")


def record_source(data_config, split: str, task: str = "", cache_fields: tuple = ()):
    """The train or eval records of a prepared folder (source='array_record'); the training records with
    the cache arrays `cache_fields` (the eval batch is computed from pixels and texts)."""
    if not data_config.path:
        raise ValueError("data.path must be set when data.source='array_record' (a folder codi_jax.data.prepare wrote)")
    use_eval = split == "eval" and data_config.eval_path
    if data_config.eval_path:
        train_m, eval_m = (
            records.read_manifest(p, k)
            for p, k in ((data_config.path, "data.path"), (data_config.eval_path, "data.eval_path"))
        )
        if train_m["content_hash"] == eval_m["content_hash"]:
            raise ValueError("data.path and data.eval_path hold the same records; eval records must be held out")
    key = "data.eval_path" if use_eval else "data.path"
    m = records.read_manifest(data_config.eval_path if use_eval else data_config.path, key)
    records.check_shard_counts(m)
    if task and task not in KIND_TASKS[m["kind"]]:
        raise ValueError(f"{key}: records of kind {m['kind']!r} serve tasks {KIND_TASKS[m['kind']]}, not {task!r}")
    if m["kind"] != "image":
        factor = data_config.image_downscale
        side = min(m["image_size"]["min_h"], m["image_size"]["min_w"])
        if side < data_config.crop_size * factor:
            raise ValueError(
                f"{key}: the smallest image is {side} px (manifest image_size), smaller than data.crop_size="
                f"{data_config.crop_size} x data.image_downscale={factor}"
            )
    kw = dict(downscale_factor=data_config.image_downscale, resample=data_config.downscale_resample)
    n = m["num_records"]
    if use_eval:
        return records.RecordSource(m, **kw)
    k = records.hold_out(n, data_config.eval_fraction, key) if not data_config.eval_path else 0
    if split == "train":
        return records.RecordSource(m, stop=n - k, cache_fields=cache_fields, **kw)
    return records.RecordSource(m, start=n - k, **kw)


def make_source(data_config, split: str, task: str = "", cache_fields: tuple = ()):
    """Builds the train or eval source described by `data_config` (`cache_fields`: record_source)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    kw = dict(downscale_factor=data_config.image_downscale, resample=data_config.downscale_resample)
    if data_config.source == "embedded":
        key = f"data.{split}_images"
        names = data_config.train_images if split == "train" else (data_config.eval_images)
        return sources.EmbeddedImageSource(names, config_key=key, **kw)
    if data_config.source == "folder":
        if not data_config.folder:
            raise ValueError("data.folder must be set when data.source='folder'.")
        train, evl = sources.folder_split(data_config)
        if split == "train":
            return sources.FolderImageSource(data_config.folder, files=train, **kw)
        path = data_config.eval_folder or data_config.folder
        key = "data.eval_folder" if data_config.eval_folder else "data.folder"
        return sources.FolderImageSource(path, files=evl, config_key=key, **kw)
    if data_config.source == "array_record":
        return record_source(data_config, split, task, cache_fields)
    if data_config.source in paired.PAIRED_SOURCES:
        return paired.PairedSource(data_config, split, task)
    raise ValueError(f"data.source must be one of {SOURCES}, got {data_config.source!r}.")
