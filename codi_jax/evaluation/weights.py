"""Reading the metric networks' weight files (FID's Inception, LPIPS), shared by both."""

from __future__ import annotations

import os

import jax


def read_state_dict(path: str, what: str, help_text: str) -> dict:
    """name -> numpy array from a `.pth` (torch, weights only) or `.safetensors` file; one-line errors."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what} weights {path!r} not found; {help_text}")
    if path.endswith(".safetensors"):
        from codi_jax.pretrained import safetensors_io

        return safetensors_io.load(path)
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ValueError(f"{what} weights {path}: expected a .pth or .safetensors file")
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch; or convert it once to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise ValueError(f"{what} weights {path}: not a readable torch state dict ({e})") from None
    return {k: v.numpy() for k, v in state.items()}


def check_shapes(variables, want, where: str, hint: str) -> None:
    """Every leaf of `want` (shapes) present in `variables` with its shape, and nothing more."""
    flat = lambda t: {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    want, got = flat(want), flat(variables)
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ValueError(f"{where}: {key} is {got.get(key)}, the network needs {want.get(key)}; {hint}")
