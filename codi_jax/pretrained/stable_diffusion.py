"""A Stable-Diffusion-class teacher from a diffusers-format folder, ready for CoDi.

`load(folder)` reads the U-Net (the backbone to adapt), the VAE (the latent space), the
scheduler (betas and prediction type for the math module), and computes the text
embedding of the training prompt (empty by default) once with the CLIP text encoder,
caching it as a .npy file in the job's workdir so that a resumed job does not load CLIP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from typing import Any

import numpy as np
from absl import logging

from codi_jax import storage
from codi_jax.models import clip_text
from codi_jax.pretrained import diffusers_folder

COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")


@dataclasses.dataclass
class Pretrained:
    unet_cfg: Any
    unet_params: Any
    vae_module: Any
    vae_params: Any
    vae_cfg: Any
    schedule_cfg: Any
    prediction: str
    context: np.ndarray  # [1, tokens, width]: the prompt embedding (cross-attention context)


def prompt_embedding(folder: str, prompt: str, cache_dir: str | None, *, allow_pickle: bool = False) -> np.ndarray:
    """last_hidden_state of the text encoder for `prompt`, [1, max_length, width], cached by content."""
    key = hashlib.sha1(f"{os.path.abspath(folder)}\n{prompt}".encode()).hexdigest()[:16]
    path = storage.join(cache_dir, f"prompt_{key}.npy") if cache_dir else None
    if path and storage.isfile(path):
        return np.load(io.BytesIO(storage.read_bytes(path)))
    tokenizer = diffusers_folder.load_tokenizer(os.path.join(folder, "tokenizer"))
    module, params, cfg = diffusers_folder.load_text_encoder(
        os.path.join(folder, "text_encoder"), allow_pickle=allow_pickle
    )
    max_length = min(int(cfg.max_position_embeddings), int(tokenizer.model_max_length))
    ids = clip_text.encode_prompts(tokenizer, [prompt], max_length=max_length)
    hidden, _ = module.apply({"params": params}, ids)
    emb = np.asarray(hidden, np.float32)
    if path:
        storage.save_with(path, lambda f: np.save(f, emb))
    logging.info("text embedding of prompt %r: shape %s", prompt, emb.shape)
    return emb


def load(
    folder: str,
    *,
    prompt: str = "",
    cache_dir: str | None = None,
    allow_pickle: bool = False,
    expect_prediction: str | None = None,
) -> Pretrained:
    diffusers_folder.check_folder(folder, COMPONENTS)
    sched = diffusers_folder.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    schedule_cfg, prediction = diffusers_folder.schedule_config_from_diffusers(sched)
    if expect_prediction and expect_prediction != prediction:
        raise ValueError(
            f"config model.prediction={expect_prediction!r} but {folder}/scheduler says the model "
            f"predicts {prediction!r}; remove the override or fix the scheduler config"
        )
    unet_cfg, unet_params = diffusers_folder.load_unet(os.path.join(folder, "unet"), allow_pickle=allow_pickle)
    vae_module, vae_params, vae_cfg = diffusers_folder.load_vae(os.path.join(folder, "vae"), allow_pickle=allow_pickle)
    if vae_cfg.latent_channels != unet_cfg.in_channels:
        raise ValueError(
            f"{folder}: vae latent_channels={vae_cfg.latent_channels} but unet in_channels={unet_cfg.in_channels}"
        )
    context = prompt_embedding(folder, prompt, cache_dir, allow_pickle=allow_pickle)
    if context.shape[-1] != unet_cfg.cross_attention_dim:
        raise ValueError(
            f"{folder}: text encoder width {context.shape[-1]} != unet cross_attention_dim "
            f"{unet_cfg.cross_attention_dim}"
        )
    return Pretrained(unet_cfg, unet_params, vae_module, vae_params, vae_cfg, schedule_cfg, prediction, context)
