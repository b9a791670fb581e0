"""Examples of the paper's other tasks: inpainting, text-guided depth-to-image, instructed editing.

Every function takes an RGB uint8 image (a training or held-out photograph) and a numpy
Generator and returns one record of float32 arrays in [-1, 1] (images) plus the task's extras:

  inpaint  image [S,S,3]; cond [S,S,4] = (image with the hole set to 0, mask in [-1, 1]);
           mask [S,S,1] in {0, 1}, 1 = the hole to generate (Palette's convention).
  depth    image [S,S,3] a rendered scene; cond [S,S,1] its exact inverse depth, normalised per image
           to [-1, 1] (near = 1, as MiDaS-style maps); prompt (int) the caption's index in
           `prompts(data_config, 'depth')`; object_mask [S,S,1] the foreground object's pixels.
  edit     image [S,S,3] the edited crop (the target); cond [S,S,3] the input crop; prompt (int) the
           instruction's index in `prompts(data_config, 'edit')`.

The tiny data is made so that the metrics mean something: inpainting compares with the true
pixels under the hole; depth scenes are rendered, so their depth is exact and the caption names
the colours, the one thing the depth map does not give; every edit is a computable function.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from PIL import Image, ImageDraw

from codi_jax.data import catalog, degradation, paired

PROMPT_TASKS = ("depth", "edit")
COND_CHANNELS = {"sr": 3, "inpaint": 4, "depth": 1, "edit": 3}


def _signed(x):
    return np.clip(np.asarray(x, np.float32) * 2.0 - 1.0, -1.0, 1.0)


# ----------------------------------------------------------------------------- inpainting masks


def box_mask(rng: np.random.Generator, size: int, side_range) -> np.ndarray:
    """A random axis-aligned rectangle; each side a fraction in `side_range` of the image side."""
    h, w = (max(1, int(round(size * rng.uniform(*side_range)))) for _ in range(2))
    y, x = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
    m = np.zeros((size, size), np.float32)
    m[y : y + h, x : x + w] = 1.0
    return m


def free_form_mask(rng: np.random.Generator, size: int, mcfg) -> np.ndarray:
    """Brush strokes (the free-form masks of DeepFill v2 that Palette trains with): each stroke
    a polyline of random vertices, angles and lengths, drawn with a round brush."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(mcfg.strokes[0], mcfg.strokes[1] + 1))):
        width = max(1, int(round(size * rng.uniform(*mcfg.brush_width))))
        x, y = rng.uniform(0, size, 2)
        points = [(x, y)]
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(mcfg.vertices[0], mcfg.vertices[1] + 1))):
            angle += rng.uniform(-mcfg.max_turn, mcfg.max_turn)
            length = size * rng.uniform(*mcfg.stroke_length)
            x = float(np.clip(x + length * math.cos(angle), 0, size - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, size - 1))
            points.append((x, y))
        draw.line(points, fill=255, width=width, joint="curve")
        for px, py in points:
            r = width / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return (np.asarray(img) > 127).astype(np.float32)


def random_mask(rng: np.random.Generator, size: int, mcfg) -> np.ndarray:
    """A box or free-form mask (probabilities `mcfg.kind_probs` over `mcfg.kinds`) whose hole covers a
    fraction in `mcfg.hole_ratio` of the image; redrawn up to `mcfg.max_tries` times, then the last
    draw is clipped into range by a box."""
    lo, hi = mcfg.hole_ratio
    m = None
    for _ in range(int(mcfg.max_tries)):
        kind = mcfg.kinds[int(rng.choice(len(mcfg.kinds), p=np.asarray(mcfg.kind_probs) / np.sum(mcfg.kind_probs)))]
        if kind == "box":
            m = box_mask(rng, size, mcfg.box_side)
        elif kind == "free_form":
            m = free_form_mask(rng, size, mcfg)
        else:
            raise ValueError(f"config data.mask.kinds has {kind!r}; kinds are 'box' and 'free_form'")
        if lo <= m.mean() <= hi:
            return m
    side = math.sqrt((lo + hi) / 2)
    return box_mask(rng, size, (side, side))


def check_mask(mask: np.ndarray, image_shape, what: str = "mask") -> np.ndarray:
    """A user's mask as float32 [H, W, 1] in {0, 1} (1 = fill in); clear errors for the wrong size
    or a mask that is not binary (0/1 or 0/255)."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D mask, got shape {np.asarray(mask).shape}")
    if m.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"{what}: mask is {m.shape[0]}x{m.shape[1]} but the image is {image_shape[0]}x{image_shape[1]}"
        )
    values = np.unique(m)
    if set(values.tolist()) <= {0, 1}:
        return m.astype(np.float32)[..., None]
    if set(values.tolist()) <= {0, 255}:
        return (m > 0).astype(np.float32)[..., None]
    raise ValueError(f"{what}: mask is not binary (values {values[:6].tolist()}...); use 0 (keep) and 1 or 255 (fill)")


def inpaint_condition(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """cond = (image with the hole set to 0, mask mapped to [-1, 1]); image in [-1, 1], mask [.., 1] in {0, 1}."""
    return np.concatenate([image * (1.0 - mask), mask * 2.0 - 1.0], axis=-1).astype(np.float32)


def make_inpaint_example(crop: np.ndarray, rng: np.random.Generator, data_config) -> dict:
    image = _signed(crop.astype(np.float32) / 255.0)
    mask = random_mask(rng, crop.shape[0], data_config.mask)[..., None]
    return {"image": image, "cond": inpaint_condition(image, mask), "mask": mask}


# ----------------------------------------------------------------------------- instructed editing


def _gray(x):
    return np.repeat(x @ np.asarray([0.299, 0.587, 0.114], np.float32), 3).reshape(x.shape)


def _blur(x, sigma):
    size = 2 * int(math.ceil(2 * sigma)) + 1
    return degradation.blur(x, degradation.gaussian_kernel(size, sigma))


# name -> (instruction, edit of an RGB float image in [0, 1], given the edit config)
EDITS = {
    "grayscale": ("make it grayscale", lambda x, c: _gray(x)),
    "invert": ("invert the colours", lambda x, c: 1.0 - x),
    "blur": ("blur it", lambda x, c: _blur(x, c.blur_sigma)),
    "flip": ("turn it upside down", lambda x, c: x[::-1]),
    "darken": ("make it darker", lambda x, c: x * c.darken_factor),
}


def edit_instructions(ecfg) -> list[str]:
    unknown = [n for n in ecfg.names if n not in EDITS]
    if unknown or not ecfg.names:
        raise ValueError(f"config data.edit.names has {unknown or 'nothing'}; known edits: {sorted(EDITS)}")
    return [EDITS[n][0] for n in ecfg.names]


def apply_edit(name: str, image01: np.ndarray, ecfg) -> np.ndarray:
    return np.clip(EDITS[name][1](np.asarray(image01, np.float32), ecfg), 0.0, 1.0).astype(np.float32)


def make_edit_example(crop: np.ndarray, rng: np.random.Generator, data_config) -> dict:
    ecfg = data_config.edit
    k = int(rng.integers(len(ecfg.names)))
    src = crop.astype(np.float32) / 255.0
    return {"image": _signed(apply_edit(ecfg.names[k], src, ecfg)), "cond": _signed(src), "prompt": np.int32(k)}


# ----------------------------------------------------------------------------- depth scenes


def depth_captions(dcfg) -> list[tuple[str, str, str]]:
    """(object colour, shape, wall colour) of every caption, in prompt-index order."""
    return list(itertools.product(dcfg.colours, dcfg.shapes, dcfg.colours))


def depth_prompts(dcfg) -> list[str]:
    return [f"a {c1} {shape} in front of a {c2} wall" for c1, shape, c2 in depth_captions(dcfg)]


def render_scene(texture: np.ndarray, rng: np.random.Generator, dcfg, size: int, caption):
    """Ray-cast one scene, orthographic camera along +z: a tilted wall (z = z0 + a x + b y) behind a
    sphere (Lambert-shaded) or an axis-aligned box seen face-on with a bevel-free flat front.
    Surfaces take the caption's colours, modulated by the texture's luminance (range
    `dcfg.texture_strength`) so that scenes carry the photographs' detail.
    Returns (rgb [S,S,3] in [0, 1], z [S,S] depth, object mask [S,S] bool)."""
    obj_colour, shape, wall_colour = caption
    palette = {k: np.asarray(v, np.float32) for k, v in dcfg.palette.items()}
    u = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0  # [-1, 1] image-plane coords
    yy, xx = np.meshgrid(u, u, indexing="ij")
    z0 = rng.uniform(*dcfg.wall_depth)
    a, b = rng.uniform(-dcfg.wall_tilt, dcfg.wall_tilt, 2)
    z_wall = z0 + a * xx + b * yy
    cx, cy = rng.uniform(-0.4, 0.4, 2)
    r = rng.uniform(*dcfg.object_radius)
    zc = z0 - rng.uniform(1.0, 1.5)
    d2 = (xx - cx) ** 2 + (yy - cy) ** 2
    if shape == "sphere":
        inside = d2 < r * r
        h = np.sqrt(np.maximum(r * r - d2, 0.0))
        z_obj = np.where(inside, zc - h, np.inf)
        normal = np.stack([xx - cx, yy - cy, -h], -1) / r
        light = np.asarray(dcfg.light, np.float32)
        shade = np.clip(normal @ (light / np.linalg.norm(light)), 0.0, 1.0) * 0.7 + 0.3
    elif shape == "box":
        inside = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
        z_obj = np.where(inside, zc - r + 0.15 * (xx - cx), np.inf)  # a slightly turned front face
        shade = np.full_like(xx, 0.85)
    else:
        raise ValueError(f"config data.depth.shapes has {shape!r}; shapes are 'sphere' and 'box'")
    obj = inside & (z_obj < z_wall)
    z = np.where(obj, z_obj, z_wall)
    lum = texture.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32) / 255.0
    lo, hi = dcfg.texture_strength
    lum = lo + (hi - lo) * lum
    colour = np.where(obj[..., None], palette[obj_colour] * shade[..., None], palette[wall_colour])
    rgb = np.clip(colour * lum[..., None], 0.0, 1.0)
    return rgb.astype(np.float32), z.astype(np.float32), obj


def inverse_depth_condition(inv: np.ndarray) -> np.ndarray:
    """The depth condition: inverse depth [H, W] normalised per image to [-1, 1] (near = 1), [H, W, 1]."""
    lo, hi = float(inv.min()), float(inv.max())
    return (((inv - lo) / max(hi - lo, 1e-6)) * 2.0 - 1.0)[..., None].astype(np.float32)


def depth_condition(z: np.ndarray) -> np.ndarray:
    """The depth condition of a depth map z (larger = farther)."""
    return inverse_depth_condition(1.0 / z)


def make_depth_example(crop: np.ndarray, rng: np.random.Generator, data_config) -> dict:
    dcfg = data_config.depth
    captions = depth_captions(dcfg)
    k = int(rng.integers(len(captions)))
    rgb, z, obj = render_scene(crop, rng, dcfg, crop.shape[0], captions[k])
    return {
        "image": _signed(rgb),
        "cond": depth_condition(z),
        "prompt": np.int32(k),
        "object_mask": obj[..., None].astype(np.float32),
    }


def make_paired_example(
    rec: dict, rng: np.random.Generator, *, task: str, crop_size: int, flip: bool, prompt_of
) -> dict:
    """A record of a paired dataset (codi_jax/data/paired.py, records.py): the same random crop (and
    horizontal flip) of both images; depth's inverse depth normalised per crop to [-1, 1]; 'prompt' =
    prompt_of(the record's text): its index in the prompt list, or its tokens (pipeline.PromptIndex)."""
    a, b = rec["a"], rec["b"]
    h, w = a.shape[:2]
    if min(h, w) < crop_size:
        raise ValueError(f"a record's image is {h}x{w}, smaller than data.crop_size={crop_size}")
    y, x = int(rng.integers(h - crop_size + 1)), int(rng.integers(w - crop_size + 1))
    a, b = a[y : y + crop_size, x : x + crop_size], b[y : y + crop_size, x : x + crop_size]
    if flip and rng.random() < 0.5:
        a, b = a[:, ::-1], b[:, ::-1]
    prompt = prompt_of(rec["text"])
    if task == "edit":
        return {"image": _signed(b / 255.0), "cond": _signed(a / 255.0), "prompt": prompt}
    if task == "depth":
        return {"image": _signed(a / 255.0), "cond": inverse_depth_condition(b), "prompt": prompt}
    raise ValueError(f"task {task!r} has no paired datasets (data.source is for 'edit' or 'depth')")


def prompts(data_config, task: str) -> list[str]:
    """The task's prompt list; a record's 'prompt' is an index into it."""
    if data_config.source in paired.PAIRED_SOURCES:
        return paired.dataset_prompts(data_config, task)
    if data_config.source == "array_record" and task in PROMPT_TASKS and catalog.record_kind(data_config) != "image":
        return catalog.record_prompts(data_config)
    if task == "edit":
        return edit_instructions(data_config.edit)
    if task == "depth":
        return depth_prompts(data_config.depth)
    return []


MAKERS = {"inpaint": make_inpaint_example, "edit": make_edit_example, "depth": make_depth_example}
