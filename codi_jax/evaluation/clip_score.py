"""CLIP score (Table 2's text-task column): 100 * max(cos(E_image, E_text), 0), as torchmetrics' CLIPScore.

The networks are transformers' `CLIPModel` in Flax: the text tower is `models.clip_text`'s (the one
Stable Diffusion uses), the vision tower is a ViT (class token + patch embedding, pre-LayerNorm
encoder, post-LayerNorm on the class token), each followed by its linear projection. Weights come
from a local transformers CLIP folder (`config.json` + `model.safetensors`, e.g. openai/clip-vit-large-patch14
saved with `save_pretrained`); the tokenizer from the same folder.

Images in [-1, 1] are resized (bicubic, antialiased) so the short side is the model's image size,
centre-cropped, and normalised with CLIP's mean and std, as CLIPImageProcessor does (it resizes with
PIL, so pixel values differ slightly; the networks are what the parity test pins down).
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from codi_jax.models import clip_text
from codi_jax.pretrained import convert, diffusers_folder

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def vision_config_from_transformers(d: dict) -> ml_collections.ConfigDict:
    act = d.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"CLIP vision config: hidden_act={act!r} is not supported")
    return ml_collections.ConfigDict(
        dict(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            num_channels=int(d.get("num_channels", 3)),
            hidden_act=act,
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
        )
    )


class CLIPVisionTransformer(nn.Module):
    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, pixel_values):  # NHWC, normalised
        cfg = self.cfg
        emb = EmbeddingsBlock(cfg, name="embeddings")(pixel_values)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="pre_layrnorm")(emb)  # transformers' spelling
        n = x.shape[1]
        x = clip_text.CLIPEncoder(cfg, name="encoder")(x, jnp.ones((1, 1, n, n), jnp.bool_))
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])


class EmbeddingsBlock(nn.Module):
    cfg: ml_collections.ConfigDict

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.cfg
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False, name="patch_embedding")(
            pixel_values
        )
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.hidden_size)), patches], axis=1)
        pos = nn.Embed((cfg.image_size // p) ** 2 + 1, cfg.hidden_size, name="position_embedding")(
            jnp.arange(x.shape[1])
        )
        return x + pos[None]


class CLIPEmbedder(nn.Module):
    """(pixel_values NHWC, input_ids) -> (image_embeds, text_embeds), both projected, not normalised."""

    text_cfg: ml_collections.ConfigDict
    vision_cfg: ml_collections.ConfigDict
    projection_dim: int

    def setup(self):
        self.text_model = clip_text.CLIPTextTransformer(self.text_cfg)
        self.vision_model = CLIPVisionTransformer(self.vision_cfg)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False)

    def __call__(self, pixel_values, input_ids):
        return self.embed_images(pixel_values), self.embed_text(input_ids)

    def embed_images(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))

    def embed_text(self, input_ids):
        return self.text_projection(self.text_model(jnp.asarray(input_ids, jnp.int32))[1])


def preprocess(images, image_size: int):
    """[-1, 1] NHWC -> CLIP pixel values (short side resized to image_size, centre crop, normalised)."""
    x = (jnp.clip(jnp.asarray(images, jnp.float32), -1, 1) + 1) / 2
    n, h, w, c = x.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    x = jax.image.resize(x, (n, nh, nw, c), "bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    return (x - CLIP_MEAN) / CLIP_STD


class CLIPScorer:
    """Loads a local transformers CLIP folder once; `score(images, prompts)` -> per-image CLIP scores."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"CLIP folder {folder!r}: no config.json (a transformers CLIPModel folder, e.g. "
                "openai/clip-vit-large-patch14 saved with save_pretrained)"
            )
        with open(path) as f:
            d = json.load(f)
        if "vision_config" not in d or "text_config" not in d:
            raise ValueError(f"CLIP folder {folder}: config.json is not a CLIPModel's (no vision_config/text_config)")
        self.text_cfg = clip_text.clip_text_config_from_transformers(d["text_config"])
        self.vision_cfg = vision_config_from_transformers(d["vision_config"])
        self.module = CLIPEmbedder(self.text_cfg, self.vision_cfg, int(d.get("projection_dim", 512)))
        state = diffusers_folder.load_weights(diffusers_folder.weights_path(folder, "model"))
        size = self.vision_cfg.image_size
        target = jax.eval_shape(
            lambda: self.module.init(
                jax.random.PRNGKey(0),
                jnp.zeros((1, size, size, 3)),
                jnp.zeros((1, self.text_cfg.max_position_embeddings), jnp.int32),
            )
        )["params"]
        params = convert.torch_to_flax(
            state,
            target,
            what="CLIP",
            ignore=("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"),
        )
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.tokenizer = diffusers_folder.load_tokenizer(folder)
        self._images = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method=CLIPEmbedder.embed_images))
        self._text = jax.jit(lambda p, t: self.module.apply({"params": p}, t, method=CLIPEmbedder.embed_text))

    def score_embeddings(self, image_embeds, text_embeds):
        a = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
        b = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
        return 100.0 * jnp.maximum(jnp.sum(a * b, axis=-1), 0.0)

    def score(self, images, prompts) -> np.ndarray:
        ids = clip_text.encode_prompts(self.tokenizer, prompts, self.text_cfg.max_position_embeddings)
        img = self._images(self.params, preprocess(images, self.vision_cfg.image_size))
        return np.asarray(self.score_embeddings(img, self._text(self.params, ids)))
