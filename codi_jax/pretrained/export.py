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
import os

import numpy as np

from codi_jax.pretrained import convert, diffusers_folder, safetensors_io

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _write_component(folder: str, config: dict, tensors: dict[str, np.ndarray]):
    os.makedirs(folder, exist_ok=True)
    safetensors_io.save(os.path.join(folder, WEIGHTS), tensors, metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


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
    if unet_cfg.cross_attention_dim is None:
        raise ValueError(
            "export to diffusers needs model.unet.cross_attention_dim set: diffusers' U-Net always "
            "has cross-attention (the pixel-space tiny U-Net has none)"
        )
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"export folder {out_dir} exists and is not empty; choose a new one")
    written = {}
    unet_dir = os.path.join(out_dir, "unet")
    _write_component(
        unet_dir,
        diffusers_folder.unet_config_to_diffusers(unet_cfg, sample_size),
        convert.flax_to_torch(params["unet"], dtype),
    )
    written["unet"] = unet_dir
    adapter = params.get("adapter")
    if adapter is not None:
        if adapter_cfg is None:
            raise ValueError("export_diffusers: params hold an adapter but no adapter config was given")
        if adapter_cfg.fusion == "residual":
            cn_dir = os.path.join(out_dir, "controlnet")
            _write_component(cn_dir, controlnet_config(unet_cfg, adapter_cfg), convert.flax_to_torch(adapter, dtype))
            written["controlnet"] = cn_dir
        else:
            path = os.path.join(out_dir, "adapter_mix.safetensors")
            flat = {"/".join(k): np.asarray(v, dtype) for k, v in _flatten(adapter).items()}
            safetensors_io.save(path, flat, metadata={"fusion": "mix", "format": "codi_jax"})
            written["adapter_mix"] = path
    return written


def _flatten(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)
