"""A Flax version of diffusers' `AutoencoderKL` (the Stable Diffusion VAE), NHWC.

Parameter paths mirror the PyTorch state dict with '_' before list indices
(`encoder/down_blocks_0/resnets_1/conv1/kernel` is `encoder.down_blocks.0.resnets.1.conv1.weight`,
`.../mid_block/attentions_0/to_out_0` is `...mid_block.attentions.0.to_out.0`), so diffusers
checkpoints load by name through `codi_jax.pretrained.convert`.

The blocks follow diffusers' `Encoder`/`Decoder` (autoencoders/vae.py) built from
`DownEncoderBlock2D`, `UpDecoderBlock2D` and `UNetMidBlock2D`: ResNet blocks without a
time embedding, GroupNorm eps 1e-6, one single-head self-attention in the mid block
(group norm first, residual added, output scale 1), stride-2 downsampling after an
asymmetric (0, 1) zero pad, nearest-neighbour 2x upsampling.

`encode` gives the mean and log-variance of the latent posterior (log-variance clamped to
[-30, 20] as in `DiagonalGaussianDistribution`); `decode` takes an unscaled latent (multiply
by `cfg.scaling_factor`, after subtracting `cfg.shift_factor`, to get the diffusion latent).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any

_EPS = 1e-6  # every GroupNorm of the diffusers VAE
_DIFFUSERS_DEFAULTS = dict(  # AutoencoderKL.__init__ defaults, for keys a config.json omits
    in_channels=3,
    out_channels=3,
    block_out_channels=(64,),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    shift_factor=None,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    act_fn="silu",
)


# ----------------------------------------------------------------------------- config


def vae_config_from_diffusers(d: dict) -> ml_collections.ConfigDict:
    """A diffusers `vae/config.json` dict -> our VAE config (one-line ValueError if unsupported)."""
    get = lambda k: d[k] if d.get(k) is not None else _DIFFUSERS_DEFAULTS[k]
    blocks = tuple(int(c) for c in get("block_out_channels"))
    n = len(blocks)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.get(key) or [kind] * n)
        if len(types) != n:
            raise ValueError(f"vae {key} has {len(types)} entries but block_out_channels has {n}")
        bad = sorted({t for t in types if t != kind})
        if bad:
            raise ValueError(f"vae {key} has unsupported block type(s) {bad}; only {kind} is supported")
    act = get("act_fn")
    if act not in ("silu", "swish"):  # diffusers maps both names to SiLU
        raise ValueError(f"vae act_fn is {act!r}; only 'silu' is supported")
    cfg = ml_collections.ConfigDict(
        dict(
            in_channels=int(get("in_channels")),
            out_channels=int(get("out_channels")),
            block_out_channels=blocks,
            layers_per_block=int(get("layers_per_block")),
            latent_channels=int(get("latent_channels")),
            norm_num_groups=int(get("norm_num_groups")),
            scaling_factor=float(get("scaling_factor")),
            shift_factor=float(d["shift_factor"]) if d.get("shift_factor") is not None else 0.0,
            use_quant_conv=bool(get("use_quant_conv")),
            use_post_quant_conv=bool(get("use_post_quant_conv")),
            mid_block_add_attention=bool(get("mid_block_add_attention")),
            down_block_types=tuple(["DownEncoderBlock2D"] * n),
            up_block_types=tuple(["UpDecoderBlock2D"] * n),
        )
    )
    check_vae_config(cfg)
    return cfg


def check_vae_config(cfg):
    """One-line errors for a VAE config that cannot build."""
    if not cfg.block_out_channels:
        raise ValueError("vae block_out_channels is empty")
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(
                f"vae block_out_channels entry {c} is not divisible by norm_num_groups={cfg.norm_num_groups}"
            )
    if cfg.layers_per_block < 1:
        raise ValueError(f"vae layers_per_block is {cfg.layers_per_block}; it must be at least 1")


# ----------------------------------------------------------------------------- blocks


def _conv(features, kernel, name, dtype, stride=1, padding=None):
    pad = padding if padding is not None else ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype, name=name)


def _norm(groups, name, dtype):
    return nn.GroupNorm(num_groups=groups, epsilon=_EPS, dtype=dtype, name=name)


class VaeResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` with temb_channels=None (no time_emb_proj), output scale 1."""

    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(_norm(self.groups, "norm1", self.dtype)(x)))
        h = _conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(_norm(self.groups, "norm2", self.dtype)(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class VaeAttention(nn.Module):
    """diffusers `Attention` as built by `UNetMidBlock2D` for the VAE: group_norm, to_q/k/v
    (with bias), scaled dot-product attention over all pixels, to_out_0, plus the input."""

    channels: int
    heads: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _norm(self.groups, "group_norm", self.dtype)(x).reshape(b, hgt * wid, c)
        dense = lambda name: nn.Dense(self.channels, dtype=self.dtype, name=name)
        split = lambda a: a.reshape(b, hgt * wid, self.heads, self.channels // self.heads)
        q, k, v = (split(dense(n)(h)) for n in ("to_q", "to_k", "to_v"))
        o = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim); softmax in float32
        o = dense("to_out_0")(o.reshape(b, hgt * wid, self.channels))
        return x + o.reshape(b, hgt, wid, c).astype(x.dtype)


class VaeMidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` (one layer): resnets_0, [attentions_0], resnets_1."""

    channels: int
    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = VaeResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            # attention_head_dim = channels, hence heads = channels // channels = 1.
            x = VaeAttention(self.channels, 1, self.groups, self.dtype, name="attentions_0")(x)
        return VaeResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """diffusers `Downsample2D(padding=0)`: zero pad right and bottom by one, 3x3 stride-2 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, "conv", self.dtype, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """diffusers `Upsample2D`: nearest-neighbour 2x, then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype)(x)


class DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = VaeResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = VaeResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers `Encoder` with double_z: image -> 2 * latent_channels moments."""

    cfg: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, chans, g = self.cfg, self.cfg.block_out_channels, self.cfg.norm_num_groups
        x = _conv(chans[0], 3, "conv_in", self.dtype)(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock(c, cfg.layers_per_block, g, i < len(chans) - 1, self.dtype, name=f"down_blocks_{i}")(x)
        x = VaeMidBlock(chans[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        x = nn.silu(_norm(g, "conv_norm_out", self.dtype)(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
    """diffusers `Decoder` (norm_type 'group'): latent -> image."""

    cfg: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, chans, g = self.cfg, self.cfg.block_out_channels, self.cfg.norm_num_groups
        x = _conv(chans[-1], 3, "conv_in", self.dtype)(z)
        x = VaeMidBlock(chans[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, c in enumerate(reversed(chans)):
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, g, i < len(chans) - 1, self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(g, "conv_norm_out", self.dtype)(x))
        return _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`. `dtype` is the compute dtype; parameters are float32."""

    cfg: Any
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, None, self.dtype)

    def encode(self, x):
        """NHWC images in [-1, 1] -> (mean, logvar) of the latent posterior, NHWC float32."""
        moments = self.encoder(x)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """NHWC unscaled latent -> NHWC image (roughly [-1, 1]), in the compute dtype."""
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)


def downscale_factor(cfg) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(cfg.block_out_channels) - 1)


# ----------------------------------------------------------------------------- loading


# Old diffusers VAE checkpoints (SD 1.x era) name the mid-block attention differently.
OLD_ATTENTION_NAMES = {
    r"(attentions\.\d+)\.query\.": r"\1.to_q.",
    r"(attentions\.\d+)\.key\.": r"\1.to_k.",
    r"(attentions\.\d+)\.value\.": r"\1.to_v.",
    r"(attentions\.\d+)\.proj_attn\.": r"\1.to_out.0.",
}


def init_shapes(module: AutoencoderKL, cfg):
    """The parameter tree of `module` as ShapeDtypeStructs (no compute)."""
    s = downscale_factor(cfg)
    x = jax.ShapeDtypeStruct((1, s, s, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)["params"]
