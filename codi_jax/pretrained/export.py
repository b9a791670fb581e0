"""Write a distilled model back as diffusers-format folders (safetensors).

  OUT/unet/        UNet2DConditionModel: the distilled backbone (config.json + weights)
  OUT/controlnet/  ControlNetModel: the adapter, for the 'residual' fusion only

The 'mix' fusion of eq 12 cannot be written as a ControlNetModel: its fused skip features
are (1 - mu) h_theta + mu h_eta, which need the backbone's own encoder features, while a
ControlNet only adds residuals computed from its own branch. A mix adapter is written as
OUT/adapter_mix.safetensors (our names, mu included) with the U-Net, and is read back by
`codi_jax` only (see docs/design-choices.md).
"""

from __future__ import annotations

import json
import re

import numpy as np

from codi_jax import storage
from codi_jax.pretrained import convert, diffusers_folder, safetensors_io

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _write_component(folder: str, config: dict, tensors: dict[str, np.ndarray]):
    safetensors_io.save(storage.join(folder, WEIGHTS), tensors, metadata={"format": "pt"})
    storage.write_text(storage.join(folder, "config.json"), json.dumps(config, indent=2, sort_keys=True))


# A U-Net without text cross-attention (model.unet.cross_attention_dim None: the pixel-space ones) goes out
# with zero cross-attention layers of this context width: diffusers' cross-attention blocks always hold one,
# and with its output projection zero it adds nothing, so diffusers' outputs are ours for any
# encoder_hidden_states of shape [batch, tokens, NO_TEXT_CONTEXT_DIM].
NO_TEXT_CONTEXT_DIM = 1


def _context_dim(config: dict) -> dict:
    if config["cross_attention_dim"] is None:
        config = dict(config, cross_attention_dim=NO_TEXT_CONTEXT_DIM)
    return config


def _inert_cross_attention(tensors: dict[str, np.ndarray], unet_cfg) -> dict[str, np.ndarray]:
    """`tensors` with a zero attn2 (and an identity norm2) in every transformer block that lacks one."""
    if unet_cfg.cross_attention_dim is not None:
        return tensors
    out = dict(tensors)
    for name, w in tensors.items():
        block = re.fullmatch(r"(.*\.transformer_blocks\.\d+)\.attn1\.to_q\.weight", name)
        if block is None:
            continue
        p, (inner, dim) = block.group(1), w.shape
        zeros = lambda *shape, dtype=w.dtype: np.zeros(shape, dtype)
        out[f"{p}.norm2.weight"], out[f"{p}.norm2.bias"] = np.ones(dim, w.dtype), zeros(dim)
        out[f"{p}.attn2.to_q.weight"] = zeros(inner, dim)
        out[f"{p}.attn2.to_k.weight"] = out[f"{p}.attn2.to_v.weight"] = zeros(inner, NO_TEXT_CONTEXT_DIM)
        out[f"{p}.attn2.to_out.0.weight"], out[f"{p}.attn2.to_out.0.bias"] = zeros(dim, inner), zeros(dim)
    return out


def controlnet_config(unet_cfg, adapter_cfg) -> dict:
    cfg = diffusers_folder.unet_config_to_diffusers(unet_cfg, sample_size=32)
    for key in ("out_channels", "up_block_types", "center_input_sample", "sample_size"):
        cfg.pop(key, None)
    cfg.update(
        {
            "_class_name": "ControlNetModel",
            "conditioning_channels": int(adapter_cfg.cond_channels),
            "conditioning_embedding_out_channels": list(adapter_cfg.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": "rgb",
            "global_pool_conditions": False,
        }
    )
    return cfg


def export_diffusers(
    out_dir: str, unet_cfg, params, adapter_cfg=None, *, sample_size: int, dtype=np.float32
) -> dict[str, str]:
    """Write params {'unet': ..., 'adapter': ...} under out_dir; returns what was written where."""
    if storage.listdir(out_dir):
        raise FileExistsError(f"export folder {out_dir} exists and is not empty; choose a new one")
    written = {}
    unet_dir = storage.join(out_dir, "unet")
    _write_component(
        unet_dir,
        _context_dim(diffusers_folder.unet_config_to_diffusers(unet_cfg, sample_size)),
        _inert_cross_attention(convert.flax_to_torch(params["unet"], dtype), unet_cfg),
    )
    written["unet"] = unet_dir
    adapter = params.get("adapter")
    if adapter is not None:
        if adapter_cfg is None:
            raise ValueError("export_diffusers: params hold an adapter but no adapter config was given")
        if adapter_cfg.fusion == "residual":
            cn_dir = storage.join(out_dir, "controlnet")
            tensors = _inert_cross_attention(convert.flax_to_torch(adapter, dtype), unet_cfg)
            _write_component(cn_dir, _context_dim(controlnet_config(unet_cfg, adapter_cfg)), tensors)
            written["controlnet"] = cn_dir
        else:
            path = storage.join(out_dir, "adapter_mix.safetensors")
            flat = {"/".join(k): np.asarray(v, dtype) for k, v in _flatten(adapter).items()}
            safetensors_io.save(path, flat, metadata={"fusion": "mix", "format": "codi_jax"})
            written["adapter_mix"] = path
    return written


def _flatten(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)
