"""A Flax U-Net whose blocks and parameter names follow diffusers' `UNet2DConditionModel`.

Parameter paths mirror the PyTorch state dict with '.' for nesting and '_' before list
indices (`down_blocks_0/resnets_1/conv1`, `.../attn1/to_out_0`), as diffusers' former
Flax classes did, so real checkpoints convert by name. Images are NHWC.

The U-Net is split into `encode` (conv_in, time embedding, down blocks, mid block) and
`decode` (up blocks, output head) so that the conditional encoder of eq 12 can fuse its
features between the two.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax import sharding
from codi_jax.models import layers, splash

Dtype = Any


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
    """Sinusoidal timestep features, as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def conv3x3(features, name, dtype, stride=1, zero=False):
    return layers.conv(features, 3, name, dtype, strides=stride, padding=((1, 1), (1, 1)), zero=zero)


def conv1x1(features, name, dtype, zero=False):
    return layers.conv(features, 1, name, dtype, padding="VALID", zero=zero)


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.dim, "linear_1", self.dtype)(x)
        return layers.dense(self.dim, "linear_2", self.dtype, names=layers.DENSE_OUT)(nn.silu(x))


class ResnetBlock2D(nn.Module):
    out_channels: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x))
        h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
        t = layers.dense(self.out_channels, "time_emb_proj", self.dtype, names=layers.DENSE_OUT)(nn.silu(temb))
        h = h + t[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h))
        h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, "conv_shortcut", self.dtype)(x)
        return x + h


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def attention_backend(setting: str, dtype, head_dim: int, q_len: int = 2, kv_len: int = 2) -> str:
    """`unet.attention`: 'xla' (materialises the score matrix), 'cudnn' (fused flash attention,
    GPUs with fp16/bf16), 'splash' (Pallas flash attention for TPUs, models/splash.py, where both lengths
    are multiples of 128; XLA for the others, e.g. CLIP's 77 tokens), or 'auto': cudnn where it applies
    (GPU, half-precision compute, head_dim a multiple of 8 and at most 128, even query and key lengths),
    splash where it applies on a TPU (inside the sharded train step, or on a single TPU), else xla.
    The platform is the traced program's (sharding.active_platform): a TPU topology compiled for ahead of
    time from a CPU host gets the TPU's choice.

    The lengths: on an H200 (jax 0.11.2) cuDNN's flash attention rejected SD's cross-attention in
    the train step ("Unsupported sequence length Q 4096, KV 77"); CLIP's 77 tokens therefore take
    XLA, whose score matrix is small there (4096 x 77)."""
    if setting not in ATTENTION_IMPLS:
        raise ValueError(f"config model.unet.attention={setting!r} is not one of {ATTENTION_IMPLS}")
    if setting == "splash":
        return "splash" if splash.supports(q_len, kv_len) else "xla"
    if setting != "auto":
        return setting
    platform = sharding.active_platform()
    if platform == "tpu":
        whole_program = sharding.active() is not None or jax.device_count() == 1  # a kernel is per device
        return "splash" if whole_program and splash.supports(q_len, kv_len) else "xla"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim % 8 == 0 and head_dim <= 128 and q_len % 2 == 0 and kv_len % 2 == 0
    return "cudnn" if platform == "gpu" and half and fits else "xla"


class Attention(nn.Module):
    """diffusers `Attention`: to_q/to_k/to_v without bias, to_out_0 with bias."""

    heads: int
    dim: int
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        head_dim = self.dim // self.heads
        q = layers.dense(self.dim, "to_q", self.dtype, names=layers.QKV, use_bias=False)(x)
        k = layers.dense(self.dim, "to_k", self.dtype, names=layers.QKV, use_bias=False)(context)
        v = layers.dense(self.dim, "to_v", self.dtype, names=layers.QKV, use_bias=False)(context)
        split = lambda a: a.reshape(a.shape[:2] + (self.heads, head_dim))
        # Fused attention where the backend has it; never a user-visible fp32 score matrix.
        impl = attention_backend(self.impl, self.dtype, head_dim, q.shape[1], k.shape[1])
        if impl == "splash":
            o = splash.attention(split(q), split(k), split(v))
        else:
            o = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=impl)
        o = o.reshape(o.shape[:2] + (self.dim,))
        return layers.dense(self.dim, "to_out_0", self.dtype, names=layers.ATTN_OUT)(o)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU: net_0.proj -> h * gelu(gate) -> net_2."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        inner = self.dim * self.mult
        # net_0 is a GEGLU module holding `proj`; mirror that nesting.
        h, gate = jnp.split(GEGLUProj(inner * 2, dtype=self.dtype, name="net_0")(x), 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        return layers.dense(self.dim, "net_2", self.dtype, names=layers.DENSE_OUT)(h)


class GEGLUProj(nn.Module):
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return layers.dense(self.features, "proj", self.dtype)(x)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    cross_attention: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim, self.dtype, self.attention, name=name)
        x = x + attn("attn1")(ln("norm1")(x))
        if self.cross_attention:
            x = x + attn("attn2")(ln("norm2")(x), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
    channels: int
    heads: int
    groups: int
    use_linear_projection: bool
    cross_attention: bool
    num_layers: int = 1
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        b, hgt, wid, c = x.shape
        residual = x
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = layers.dense(self.channels, "proj_in", self.dtype)(h.reshape(b, hgt * wid, c))
        else:
            h = conv1x1(self.channels, "proj_in", self.dtype)(h).reshape(b, hgt * wid, self.channels)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.channels,
                self.heads,
                self.cross_attention,
                self.dtype,
                self.attention,
                name=f"transformer_blocks_{i}",
            )(h, context)
        if self.use_linear_projection:
            h = layers.dense(c, "proj_out", self.dtype, names=layers.DENSE_OUT)(h).reshape(b, hgt, wid, c)
        else:
            h = conv1x1(c, "proj_out", self.dtype)(h.reshape(b, hgt, wid, self.channels))
        return h + residual


class Downsample2D(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv3x3(self.channels, "conv", self.dtype, stride=2)(x)


class Upsample2D(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, h * 2, w * 2, c), method="nearest")
        return conv3x3(self.channels, "conv", self.dtype)(x)


def _heads(cfg, n_blocks):
    """Heads per down block. diffusers' `attention_head_dim` means the number of heads in SD."""
    heads = cfg.num_attention_heads or cfg.attention_head_dim
    if isinstance(heads, int):
        return [heads] * n_blocks
    heads = list(heads)
    if len(heads) != n_blocks:
        raise ValueError(f"unet attention_head_dim has {len(heads)} entries for {n_blocks} blocks")
    return heads


def _resnet_attention(cfg, channels, heads, dtype, i, x, temb, context):
    """`resnets_i` then, when heads > 0, `attentions_i`: the layer pair of diffusers' blocks.

    Called inside a compact `__call__`, so the submodules belong to the calling block.
    """
    resnet, transformer = _maybe_remat(cfg, ResnetBlock2D), _maybe_remat(cfg, Transformer2DModel)
    x = resnet(channels, cfg.norm_num_groups, cfg.norm_eps, dtype, name=f"resnets_{i}")(x, temb)
    if heads:
        x = transformer(
            channels,
            heads,
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            cfg.cross_attention_dim is not None,
            cfg.transformer_layers_per_block,
            dtype,
            cfg.attention,
            name=f"attentions_{i}",
        )(x, context)
    return x


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(setting) -> str:
    """`unet.remat` as a policy name (False/True from older configs mean 'none'/'full')."""
    if isinstance(setting, bool) or setting is None:
        return "full" if setting else "none"
    if setting not in REMAT_POLICIES:
        raise ValueError(f"config model.unet.remat={setting!r} is not one of {tuple(REMAT_POLICIES)}")
    return setting


def _maybe_remat(cfg, cls):
    """`unet.remat`: recompute each ResNet / transformer block's activations in the backward
    pass instead of storing them, all of them ('full') or all but the matmul/conv outputs
    ('dots', 'dots_no_batch'): less memory for up to one more forward of compute."""
    policy = remat_policy(cfg.remat)
    if policy == "none":
        return cls
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


class DownBlock(nn.Module):
    """`CrossAttnDownBlock2D` (with attentions) or `DownBlock2D`."""

    out_channels: int
    num_layers: int
    attention: bool
    heads: int
    add_downsample: bool
    cfg: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        skips = []
        for i in range(self.num_layers):
            x = _resnet_attention(
                cfg, self.out_channels, self.heads if self.attention else 0, self.dtype, i, x, temb, context
            )
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D`: consumes num_layers + 1 skips."""

    out_channels: int
    num_layers: int
    attention: bool
    heads: int
    add_upsample: bool
    cfg: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg = self.cfg
        for i in range(self.num_layers + 1):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _resnet_attention(
                cfg, self.out_channels, self.heads if self.attention else 0, self.dtype, i, x, temb, context
            )
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """`UNetMidBlock2DCrossAttn`: resnets_0, attentions_0, resnets_1."""

    channels: int
    heads: int
    cfg: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        x = _resnet_attention(cfg, self.channels, self.heads, self.dtype, 0, x, temb, context)
        return ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="resnets_1")(x, temb)


_ATTN_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_ATTN_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def check_unet_config(cfg):
    """One-line errors for a U-Net config that cannot build."""
    n = len(cfg.block_out_channels)
    for key, table in (("down_block_types", _ATTN_DOWN), ("up_block_types", _ATTN_UP)):
        types = list(cfg[key])
        if len(types) != n:
            raise ValueError(f"unet.{key} has {len(types)} entries but unet.block_out_channels has {n}")
        bad = [t for t in types if t not in table]
        if bad:
            raise ValueError(f"unet.{key} has unknown block type(s) {bad}; known: {sorted(table)}")
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(
                f"unet.block_out_channels entry {c} is not divisible by unet.norm_num_groups={cfg.norm_num_groups}"
            )


def build_encoder(module: nn.Module, cfg, dtype):
    """Create conv_in, time_embedding, down_blocks, mid_block on `module` (called from its setup).

    The U-Net and the adapter of eq 12 both call this, so the adapter's copy of the
    encoder has the backbone's parameter names and can be initialised from it.
    """
    n = len(cfg.block_out_channels)
    heads = _heads(cfg, n)
    ch0 = cfg.block_out_channels[0]
    module.conv_in = conv3x3(ch0, None, dtype)
    module.time_embedding = TimestepEmbedding(ch0 * 4, dtype)
    module.down_blocks = [
        DownBlock(c, cfg.layers_per_block, _ATTN_DOWN[t], heads[i], i < n - 1, cfg, dtype)
        for i, (c, t) in enumerate(zip(cfg.block_out_channels, cfg.down_block_types))
    ]
    module.mid_block = MidBlock(cfg.block_out_channels[-1], heads[-1], cfg, dtype)


def run_encoder(module: nn.Module, cfg, sample, timesteps, context, extra_input=None):
    """Encoder forward: returns (temb, skips, mid). `extra_input` is added after conv_in (ControlNet)."""
    t = timestep_embedding(
        timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    )
    temb = module.time_embedding(t.astype(module.dtype))
    h = module.conv_in(sample.astype(module.dtype))
    if extra_input is not None:
        h = h + extra_input
    h = layers.constrain(h)  # activations stay split over the batch axes (config mesh.rules)
    skips = [h]
    for block in module.down_blocks:
        h, s = block(h, temb, context)
        h = layers.constrain(h)
        skips.extend(s)
    h = layers.constrain(module.mid_block(h, temb, context))
    return temb, skips, h


class UNet(nn.Module):
    """`UNet2DConditionModel` in Flax. `__call__(sample, timesteps, context)` returns the model output."""

    cfg: Any
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        check_unet_config(cfg)
        build_encoder(self, cfg, self.dtype)
        n = len(cfg.block_out_channels)
        rev = list(reversed(cfg.block_out_channels))
        heads = list(reversed(_heads(cfg, n)))
        self.up_blocks = [
            UpBlock(rev[i], cfg.layers_per_block, _ATTN_UP[t], heads[i], i < n - 1, cfg, self.dtype)
            for i, t in enumerate(cfg.up_block_types)
        ]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype)
        self.conv_out = conv3x3(cfg.out_channels, None, self.dtype)

    def encode(self, sample, timesteps, context=None):
        return run_encoder(self, self.cfg, sample, timesteps, context)

    def decode(self, h, skips, temb, context=None):
        skips = list(skips)
        for block in self.up_blocks:
            n_take = self.cfg.layers_per_block + 1
            block_skips, skips = skips[-n_take:], skips[:-n_take]
            h = layers.constrain(block(h, block_skips, temb, context))
        h = nn.silu(self.conv_norm_out(h))
        return self.conv_out(h).astype(jnp.float32)

    def __call__(self, sample, timesteps, context=None):
        temb, skips, h = self.encode(sample, timesteps, context)
        return self.decode(h, skips, temb, context)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
