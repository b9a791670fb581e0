"""Which source a data config names: the embedded images, an image folder, or a paired dataset."""

from __future__ import annotations

from codi_jax.data import paired, sources


def make_source(data_config, split: str, task: str = ""):
    """Builds the train or eval source described by `data_config`."""
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
    if data_config.source in paired.PAIRED_SOURCES:
        return paired.PairedSource(data_config, split, task)
    raise ValueError(
        f"data.source must be 'embedded', 'folder' or one of {paired.PAIRED_SOURCES}, got {data_config.source!r}."
    )
