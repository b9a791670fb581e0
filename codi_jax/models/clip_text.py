"""A Flax CLIP text encoder matching transformers' `CLIPTextModel` (Stable Diffusion's).

SD 1.x: 12 layers, 768 wide, quick_gelu. SD 2.x: 23 layers, 1024 wide, gelu (exact erf).
The network: token + learned position embeddings, pre-LayerNorm transformer layers with
causal self-attention, a final LayerNorm; the pooled output is the final hidden state at
the end-of-text token.

Parameter paths mirror the PyTorch state dict with '_' before list indices:
`text_model.encoder.layers.0.self_attn.q_proj.weight` is
('text_model', 'encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel'). Checkpoints saved
by transformers >= 5 drop the `text_model.` prefix; `pretrained.diffusers_folder.load_text_encoder` accepts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

Dtype = Any

_ACTIVATIONS = ("quick_gelu", "gelu")
# The eos_token_id of configs written before transformers PR #24773; with it, the pooled
# output is taken at the largest token id of each sequence (the original CLIP rule).
_LEGACY_EOS_ID = 2


def clip_text_config_from_transformers(d: dict) -> ml_collections.ConfigDict:
    """Our config from a transformers `text_encoder/config.json` dict."""
    act = d.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"text encoder config: hidden_act={act!r} is not supported (expected one of {_ACTIVATIONS})")
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    )
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"text encoder config: field {missing[0]} is missing")
    if d["hidden_size"] % d["num_attention_heads"]:
        raise ValueError(
            f"text encoder config: hidden_size={d['hidden_size']} is not divisible by "
            f"num_attention_heads={d['num_attention_heads']}"
        )
    return ml_collections.ConfigDict(
        {
            "vocab_size": int(d["vocab_size"]),
            "hidden_size": int(d["hidden_size"]),
            "intermediate_size": int(d["intermediate_size"]),
            "num_hidden_layers": int(d["num_hidden_layers"]),
            "num_attention_heads": int(d["num_attention_heads"]),
            "max_position_embeddings": int(d["max_position_embeddings"]),
            "hidden_act": act,
            "layer_norm_eps": float(d.get("layer_norm_eps", 1e-5)),
            "eos_token_id": int(d.get("eos_token_id", _LEGACY_EOS_ID)),
        }
    )


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, n, width = x.shape
        heads = self.cfg.num_attention_heads
        head_dim = width // heads

        def proj(name):
            return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name=name)

        q = proj("q_proj")(x).reshape(b, n, heads, head_dim)
        k = proj("k_proj")(x).reshape(b, n, heads, head_dim)
        v = proj("v_proj")(x).reshape(b, n, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (head_dim**-0.5)
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, width)
        return proj("out_proj")(out)


class CLIPMLP(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.cfg.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc1")(x)
        h = _activation(self.cfg.hidden_act)(h)
        return nn.Dense(self.cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(h)


def _layer_norm(cfg, dtype, name):
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CLIPEncoderLayer(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        x = x + CLIPAttention(self.cfg, self.dtype, name="self_attn")(
            _layer_norm(self.cfg, self.dtype, "layer_norm1")(x), mask
        )
        x = x + CLIPMLP(self.cfg, self.dtype, name="mlp")(_layer_norm(self.cfg, self.dtype, "layer_norm2")(x))
        return x


class CLIPEncoder(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        for i in range(self.cfg.num_hidden_layers):
            x = CLIPEncoderLayer(self.cfg, self.dtype, name=f"layers_{i}")(x, mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        n = input_ids.shape[-1]
        if n > self.cfg.max_position_embeddings:
            raise ValueError(
                f"text encoder: sequence length {n} exceeds max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        tok = nn.Embed(
            self.cfg.vocab_size, self.cfg.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="token_embedding"
        )(input_ids)
        pos = nn.Embed(
            self.cfg.max_position_embeddings,
            self.cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="position_embedding",
        )(jnp.arange(n))
        return tok + pos[None]


class CLIPTextTransformer(nn.Module):
    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        x = CLIPTextEmbeddings(self.cfg, self.dtype, name="embeddings")(input_ids)
        n = input_ids.shape[-1]
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None]  # (1, 1, q, k)
        x = CLIPEncoder(self.cfg, self.dtype, name="encoder")(x, causal)
        x = _layer_norm(self.cfg, self.dtype, "final_layer_norm")(x)
        if self.cfg.eos_token_id == _LEGACY_EOS_ID:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # The first end-of-text token (padding may repeat it); 0 when there is none, as in transformers.
            eos_pos = jnp.argmax(input_ids == self.cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return x, pooled


class CLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`. `dtype` is the compute dtype; the parameters are float32.

    __call__(input_ids (batch, seq) int) -> (last_hidden_state (batch, seq, width), pooled (batch, width)).
    """

    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        shape = input_ids.shape
        input_ids = input_ids.reshape(-1, shape[-1])
        last, pooled = CLIPTextTransformer(self.cfg, self.dtype, name="text_model")(input_ids)
        return last.reshape(*shape, -1), pooled.reshape(*shape[:-1], -1)


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids (len(prompts), max_length) int32, padded with the tokenizer's pad token and
    truncated (keeping the end-of-text token) to `max_length` (default the tokenizer's
    `model_max_length`). A prompt that is cut is logged with its index and token count."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length > 1_000_000:
            raise ValueError("encode_prompts: the tokenizer has no model_max_length; pass max_length")
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, ids in enumerate(full):
        if len(ids) > max_length:
            logging.warning(
                "prompt %d has %d tokens (with start/end tokens), more than the limit %d: truncated",
                i,
                len(ids),
                max_length,
            )
    out = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return np.asarray(out, dtype=np.int32)
