"""Stable Diffusion architectures without their weights: what the memory planner compiles.

`abstract(source)` gives a `stable_diffusion.Pretrained` whose U-Net params are shapes only
(ShapeDtypeStructs: nothing is allocated) and whose VAE params are zeros (the latent loss reads them as
frozen arguments; 84M floats). `source` is a preset name below, or a diffusers folder: only its
config files are read (unet/config.json, vae/config.json, scheduler/scheduler_config.json,
text_encoder/config.json), never its weights.

The presets restate the public diffusers configs of those models (sizes, prediction type, schedule).
`write_random_folder` writes a preset as a diffusers folder with random weights (diffusers' and
transformers' own classes; the SD-size job benchmark, codi_jax/benchmarks/sd_job.py).
"""

from __future__ import annotations

import json
import os

import numpy as np

from codi_jax.models import vae as vae_lib
from codi_jax.pretrained import diffusers_folder, stable_diffusion, text_encoder

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
_SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
_SD1_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    use_linear_projection=False,
)
_SD2_UNET = dict(_SD1_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)

# name: (unet config, vae config, scheduler config, text encoder (width, tokens), native resolution)
PRESETS = {
    "sd15": (_SD1_UNET, _SD_VAE, dict(_SD_SCHEDULER, prediction_type="epsilon"), (768, 77), 512),
    "sd21-base": (_SD2_UNET, _SD_VAE, dict(_SD_SCHEDULER, prediction_type="epsilon"), (1024, 77), 512),
    "sd21": (_SD2_UNET, _SD_VAE, dict(_SD_SCHEDULER, prediction_type="v_prediction"), (1024, 77), 768),
}


def _configs(source: str):
    if source in PRESETS:
        unet, vae, sched, text, _ = PRESETS[source]
        return unet, vae, sched, text
    if not os.path.isdir(source):
        raise ValueError(f"architecture {source!r} is neither a preset ({', '.join(PRESETS)}) nor a diffusers folder")
    read = lambda *p: diffusers_folder.read_json(os.path.join(source, *p))
    text = read("text_encoder", "config.json")
    return (
        read("unet", "config.json"),
        read("vae", "config.json"),
        read("scheduler", "scheduler_config.json"),
        (int(text["hidden_size"]), int(text.get("max_position_embeddings", 77))),
    )


def abstract(source: str) -> stable_diffusion.Pretrained:
    """The `Pretrained` of a preset or a diffusers folder's configs, with shape-only U-Net params."""
    unet_d, vae_d, sched_d, (width, tokens) = _configs(source)
    unet_cfg = diffusers_folder.unet_config_from_diffusers(unet_d)
    _, unet_shapes = diffusers_folder.unet_param_shapes(unet_cfg)
    vae_cfg = vae_lib.vae_config_from_diffusers(vae_d)
    vae_module = vae_lib.AutoencoderKL(vae_cfg)
    vae_params = _zeros(vae_lib.init_shapes(vae_module, vae_cfg))
    schedule_cfg, prediction = diffusers_folder.schedule_config_from_diffusers(sched_d)
    context = np.zeros((1, tokens, width), np.float32)
    return stable_diffusion.Pretrained(
        unet_cfg, unet_shapes, vae_module, vae_params, vae_cfg, schedule_cfg, prediction, context
    )


def _zeros(shapes):
    import jax

    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def write_tokenizer(path: str, model_max_length: int) -> dict:
    """A minimal valid CLIP BPE tokenizer folder (letters, 'cat' and 'dog' whole, the special tokens); its
    vocab. The random SD folders and the tests' tiny ones. No digits: with them the tiny CLIP model of
    tests/test_clip_score.py scored every prompt 0 (2026-12-03; the cause was not traced)."""
    text_encoder.tiny_tokenizer_folder(str(path), ["cat", "dog"], model_max_length, digits=False)
    with open(os.path.join(path, "vocab.json")) as f:
        return json.load(f)


def write_random_folder(arch: str, path: str, seed: int = 0) -> str:
    """A diffusers-format folder of preset `arch` with random weights (safetensors)."""
    import diffusers
    import torch
    import transformers

    unet_d, vae_d, sched_d, (width, tokens), res = PRESETS[arch]
    torch.manual_seed(seed)
    diffusers.UNet2DConditionModel(**unet_d, sample_size=res // 8).save_pretrained(os.path.join(path, "unet"))
    diffusers.AutoencoderKL(**vae_d, sample_size=res).save_pretrained(os.path.join(path, "vae"))
    vocab = write_tokenizer(os.path.join(path, "tokenizer"), tokens)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=12,
        num_attention_heads=width // 64, max_position_embeddings=tokens, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    transformers.CLIPTextModel(text_config).save_pretrained(os.path.join(path, "text_encoder"))
    diffusers.DDPMScheduler(**sched_d).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline"}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f)
    return path
