"""Depth maps made once by a depth-estimation model from a local folder, and kept as files.

For `data.source='depth_folder'` with `data.depth.model_path` set, every image of images/ without a
map in depth/ gets one: a transformers depth-estimation model (DPT / MiDaS class, e.g.
Intel/dpt-hybrid-midas saved with `save_pretrained`) predicts relative inverse depth, which is resized
to the image, scaled to 0..65535 and written as a 16-bit PNG depth/<stem>.png (near = bright, the
convention the folder layout reads). The maps are the cache: a second run estimates nothing.
The model runs in PyTorch on the CPU (torch must be installed; it is in the test extras).
"""

from __future__ import annotations

import io
import os

import numpy as np
from absl import logging
from PIL import Image

from codi_jax import storage


def estimate_missing(image_files, depth_dir: str, model_path: str) -> list[str]:
    """Write depth/<stem>.png for every image lacking a map; returns the written paths."""
    present = set(storage.listdir(depth_dir))  # one listing (the folder may be a gs:// URL)
    todo = [
        f
        for f in image_files
        if not any(os.path.splitext(storage.basename(f))[0] + ext in present for ext in (".npy", ".png"))
    ]
    if not todo:
        return []
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise FileNotFoundError(
            f"config data.depth.model_path={model_path!r}: no config.json (a transformers depth-estimation folder)"
        )
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"config data.depth.model_path needs PyTorch to run the depth model: {e}") from None
    model = transformers.AutoModelForDepthEstimation.from_pretrained(model_path, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_path, local_files_only=True)
    written = []
    for i, path in enumerate(todo):
        with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
            rgb = im.convert("RGB")
        with torch.no_grad():
            pred = model(**processor(images=rgb, return_tensors="pt")).predicted_depth  # [1, h, w] inverse depth
            pred = torch.nn.functional.interpolate(
                pred[:, None], size=(rgb.height, rgb.width), mode="bicubic", align_corners=False
            )[0, 0].numpy()
        lo, hi = float(pred.min()), float(pred.max())
        scaled = np.round((pred - lo) / max(hi - lo, 1e-12) * 65535.0).astype(np.uint16)
        out = storage.join(depth_dir, os.path.splitext(storage.basename(path))[0] + ".png")
        png = Image.fromarray(scaled)
        storage.save_with(out, lambda f, png=png: png.save(f, format="PNG"))
        written.append(out)
        if (i + 1) % 50 == 0 or i + 1 == len(todo):
            logging.info("depth model: %d/%d maps written to %s", i + 1, len(todo), depth_dir)
    return written
