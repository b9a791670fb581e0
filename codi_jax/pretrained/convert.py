"""PyTorch state dicts <-> our Flax parameter trees, by name.

Our modules name their parameters after the PyTorch ones, with '_' before list indices
(`down_blocks_0/resnets_1/conv1/kernel` is `down_blocks.0.resnets.1.conv1.weight`). The
mapping of one leaf:
  kernel, 4-D   conv weight   torch (O, I, kh, kw)  <-> flax (kh, kw, I, O)
  kernel, 2-D   linear weight torch (O, I)          <-> flax (I, O)
  scale         norm weight
  embedding     embedding weight
  bias          bias
A PyTorch 1x1 conv weight may stand where we have a linear layer (and back): the
reshape is made when the shapes say so (old VAE attention, SD 1.x vs 2.x projections).
"""

from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

_INDEXED = re.compile(r"^(.*)_(\d+)$")
# Module names that are lists in PyTorch (their flax names end in _<index>).
LIST_NAMES = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "to_out",
        "net",
        "layers",
        "blocks",
        "controlnet_down_blocks",
    }
)
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_name(flax_path: tuple[str, ...]) -> str:
    """'down_blocks_0/resnets_1/conv1/kernel' -> 'down_blocks.0.resnets.1.conv1.weight'."""
    parts = []
    for seg in flax_path[:-1]:
        m = _INDEXED.match(seg)
        if m and m.group(1) in LIST_NAMES:
            parts += [m.group(1), m.group(2)]
        else:
            parts.append(seg)
    leaf = flax_path[-1]
    parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
    return ".".join(parts)


def _to_flax_leaf(leaf: str, w: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel":
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        elif w.ndim == 2:
            w = w.T
        if w.shape != tuple(want) and w.size == int(np.prod(want)):
            w = w.reshape(want)  # 1x1 conv <-> linear
    return w


def _to_torch_leaf(leaf: str, w: np.ndarray, torch_shape: tuple[int, ...] | None) -> np.ndarray:
    if leaf == "kernel":
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)
        elif w.ndim == 2:
            w = w.T
        if torch_shape is not None and w.shape != tuple(torch_shape) and w.size == int(np.prod(torch_shape)):
            w = w.reshape(torch_shape)
    return w


class ConversionError(ValueError):
    pass


def torch_to_flax(
    state: dict[str, np.ndarray],
    target,
    *,
    what: str,
    dtype=np.float32,
    rename: dict[str, str] | None = None,
    ignore=(),
):
    """Fill the tree `target` (arrays or ShapeDtypeStructs) from a PyTorch-named `state`.

    `rename` maps alternative checkpoint names to ours (old formats); checkpoint keys that
    start with a prefix in `ignore` are dropped. Every target leaf must be found with its
    shape, and every checkpoint tensor used: otherwise a one-line ConversionError names the
    parameter (and both shapes).
    """
    if rename:
        state = {_apply_rename(k, rename): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))}
    flat = traverse_util.flatten_dict(target)
    out, used = {}, set()
    for path, ref in flat.items():
        name = torch_name(path)
        if name not in state:
            raise ConversionError(
                f"{what}: the checkpoint has no parameter {name} (model expects shape {tuple(ref.shape)})"
            )
        w = _to_flax_leaf(path[-1], np.asarray(state[name]), tuple(ref.shape))
        if w.shape != tuple(ref.shape):
            raise ConversionError(
                f"{what}: parameter {name} has shape {tuple(state[name].shape)} in the checkpoint "
                f"but the model config expects {_torch_shape(path[-1], tuple(ref.shape))}"
            )
        out[path] = w.astype(dtype)
        used.add(name)
    extra = sorted(set(state) - used)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(
            f"{what}: the checkpoint has parameter {extra[0]}{more} that the model config does not have"
        )
    return traverse_util.unflatten_dict(out)


def flax_to_torch(
    params, dtype=np.float32, torch_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Our tree -> a PyTorch-named flat dict (for writing safetensors). `torch_shapes`
    disambiguates 1x1 convs that we hold as linear layers."""
    out = {}
    for path, w in traverse_util.flatten_dict(params).items():
        name = torch_name(path)
        shape = (torch_shapes or {}).get(name)
        out[name] = np.ascontiguousarray(_to_torch_leaf(path[-1], np.asarray(w, np.float32), shape)).astype(dtype)
    return out


def _torch_shape(leaf, shape):
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _apply_rename(key: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        key = re.sub(old, new, key)
    return key
