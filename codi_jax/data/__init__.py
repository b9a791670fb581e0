"""Data: embedded/folder image sources, Real-ESRGAN degradation, grain input."""

from codi_jax.data.catalog import make_source
from codi_jax.data.degradation import bicubic_upsample, degrade
from codi_jax.data.pipeline import make_eval_batch, make_train_iterator
from codi_jax.data.sources import EMBEDDED_IMAGE_NAMES, EmbeddedImageSource, FolderImageSource

__all__ = [
    "EMBEDDED_IMAGE_NAMES",
    "EmbeddedImageSource",
    "FolderImageSource",
    "bicubic_upsample",
    "degrade",
    "make_eval_batch",
    "make_source",
    "make_train_iterator",
]
