"""Labelled comparison grids (e.g. LR input | prediction | ground truth) as PNG.

Layout of `save_grid` (all sizes in pixels, G = GUTTER = 2, white):

    width  = G + sum_over_columns(column_width + G)
    height = G + header_height() + G + rows * (row_height + G)

`row_height` is `upscale_to` if given, else the tallest column's image height;
each column is rescaled (nearest neighbour, aspect ratio kept) to that height,
so a column's width is round(w * row_height / h).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from codi_jax import storage

__all__ = ["GUTTER", "to_uint8", "header_height", "save_grid", "read_cells"]

GUTTER = 2
_HEADER_PAD = 2  # vertical padding above/below the label text


def to_uint8(x) -> np.ndarray:
    """Converts images in [-1, 1] (float) to uint8 [0, 255]; uint8 input is returned unchanged.

    Out-of-range values are clipped; NaNs are treated as 0 (mid-grey, 128).
    """
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    x = np.nan_to_num(x.astype(np.float32), nan=0.0)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def header_height() -> int:
    """Height of the label row (depends on PIL's default font)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Measure glyphs with ascenders and descenders so every label fits.
    bottom = draw.textbbox((0, 0), "Ag|jy", font=_font())[3]
    return bottom + 2 * _HEADER_PAD


def _as_rgb_batch(x) -> np.ndarray:
    x = to_uint8(x)
    if x.ndim == 3:  # NHW -> grayscale batch
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"grid columns must be NHWC (or NHW) batches, got shape {x.shape}")
    c = x.shape[-1]
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    elif c == 4:
        x = x[..., :3]  # drop alpha: the background is white anyway
    elif c != 3:
        raise ValueError(f"unsupported channel count {c}")
    return x


def _resize_nearest(batch: np.ndarray, height: int) -> np.ndarray:
    n, h, w, _ = batch.shape
    if h == height:
        return batch
    if height % h == 0:
        # Integer factor: exact pixel replication, every LR pixel a clean block.
        f = height // h
        return np.repeat(np.repeat(batch, f, axis=1), f, axis=2)
    new_w = max(1, int(round(w * height / h)))
    return np.stack([np.asarray(Image.fromarray(im).resize((new_w, height), Image.Resampling.NEAREST)) for im in batch])


def _fit_label(draw, label: str, width: int, font) -> str:
    if _text_size(draw, label, font)[0] <= width:
        return label
    # Truncate rather than overlap the neighbouring column's label.
    while label and _text_size(draw, label + "..", font)[0] > width:
        label = label[:-1]
    return label + ".." if label else ""


def save_grid(
    path,
    columns: Sequence[tuple[str, np.ndarray]],
    *,
    upscale_to: int | None = None,
) -> str:
    """Writes a labelled image grid PNG and returns its path.

    Args:
      path: output file; parent directories are created.
      columns: (label, images) pairs; images are NHWC batches in [-1, 1]
        (float) or uint8, with 1, 3 or 4 channels. Every column must have the
        same number of images N; row i shows example i of every column.
      upscale_to: row height in pixels. Default: the tallest column's height,
        so smaller columns (e.g. low-resolution inputs) are enlarged with
        nearest-neighbour sampling and their pixels stay visible.
    """
    if not columns:
        raise ValueError("save_grid needs at least one column")
    labels = [str(label) for label, _ in columns]
    batches = [_as_rgb_batch(images) for _, images in columns]
    rows = batches[0].shape[0]
    if any(b.shape[0] != rows for b in batches):
        raise ValueError(f"all columns need the same number of images, got {[b.shape[0] for b in batches]}")
    row_h = int(upscale_to) if upscale_to is not None else max(b.shape[1] for b in batches)
    if row_h < 1:
        raise ValueError("upscale_to must be positive")
    batches = [_resize_nearest(b, row_h) for b in batches]

    head_h = header_height()
    width = GUTTER + sum(b.shape[2] + GUTTER for b in batches)
    height = GUTTER + head_h + GUTTER + rows * (row_h + GUTTER)
    canvas = np.full((height, width, 3), 255, np.uint8)

    x0 = GUTTER
    y_first = GUTTER + head_h + GUTTER
    for b in batches:
        w = b.shape[2]
        for r in range(rows):
            y = y_first + r * (row_h + GUTTER)
            canvas[y : y + row_h, x0 : x0 + w] = b[r]
        x0 += w + GUTTER

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = _font()
    x0 = GUTTER
    for label, b in zip(labels, batches):
        w = b.shape[2]
        text = _fit_label(draw, label, w, font)
        tw, _ = _text_size(draw, text, font)
        draw.text((x0 + max(0, (w - tw) // 2), GUTTER + _HEADER_PAD), text, fill=(0, 0, 0), font=font)
        x0 += w + GUTTER

    return storage.save_with(os.fspath(path), lambda f: image.save(f, format="PNG"))


def read_cells(path, cell: int) -> np.ndarray:
    """The images of a grid that `save_grid` wrote with square cells of side `cell` (its row height),
    as uint8 [columns, rows, cell, cell, 3]: a finished run's pictures, back from its PNG."""
    image = np.asarray(Image.open(io.BytesIO(storage.read_bytes(os.fspath(path)))).convert("RGB"))
    height, width, _ = image.shape
    y_first = GUTTER + header_height() + GUTTER
    cols, extra_w = divmod(width - GUTTER, cell + GUTTER)
    rows, extra_h = divmod(height - y_first, cell + GUTTER)
    if extra_w or extra_h or not cols or not rows:
        raise ValueError(f"{path}: {width}x{height} px is not a grid of {cell} px cells (another crop size?)")
    return np.stack(
        [
            np.stack(
                [
                    image[y_first + r * (cell + GUTTER) :][:cell, GUTTER + c * (cell + GUTTER) :][:, :cell]
                    for r in range(rows)
                ]
            )
            for c in range(cols)
        ]
    )
