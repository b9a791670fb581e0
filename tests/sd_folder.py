"""A tiny random Stable-Diffusion-format folder, written by diffusers/transformers themselves.

Used by the latent-space end-to-end test: unet/ (4 latent channels, cross-attention),
vae/ (2x downscale), text_encoder/ + tokenizer/ (CLIP, a 60-piece BPE vocab), scheduler/.
"""

import json

import torch

from codi_jax.pretrained import architectures


def tiny_clip_tokenizer(path, model_max_length=8):
    """A minimal valid CLIP BPE vocabulary (letters, a few merges, the two special tokens)."""
    return architectures.write_tokenizer(path, model_max_length)


def make_tiny_sd(path, *, prediction_type="epsilon", width=32, seed=0):
    import diffusers
    import transformers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=width,
    )
    unet.save_pretrained(path / "unet")
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(path / "vae")
    vocab = tiny_clip_tokenizer(path / "tokenizer")
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=8,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text.save_pretrained(path / "text_encoder")
    diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    ).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return path
