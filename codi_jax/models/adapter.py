"""The conditional adapter of CoDi (eq 12) and the adapted model w_theta(z_t, c, t).

The adapter duplicates the U-Net encoder (conv_in, time embedding, down blocks, mid
block; initialised from the backbone's weights by `init_adapter_from_backbone`) and
takes the image condition through a small conv embedding added after conv_in, with the
names of diffusers' `ControlNetModel` (`controlnet_cond_embedding`, ...).

Fusion of its features h_eta into the backbone's encoder features h_theta:
  "mix" (eq 12, default): h' = (1 - mu) h_theta(z_t) + mu h_eta(z_t, c), one learnable
        scalar mu initialised to 0, applied to every skip feature and the mid-block output.
  "residual" (ControlNet): h' = h_theta + zero_conv(h_eta), zero-initialised 1x1 convs.
Both leave the adapted model exactly equal to the backbone at initialisation.

Choice recorded in docs/design-choices.md: the adapter sees z_t as well as c (the
ControlNet input), since its features replace the backbone's as mu grows; and the two
encoders run side by side, fusion happening on the features the decoder consumes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models import unet as unet_lib

FUSIONS = ("mix", "residual")
ADAPTER_INPUTS = ("sample_and_cond", "cond", "cond_as_sample")


class ConditioningEmbedding(nn.Module):
    """`ControlNetConditioningEmbedding`: conv_in, pairs of (conv, stride-2 conv) blocks, zero conv_out.

    len(block_out_channels) - 1 stride-2 convs: () for pixel-space models whose
    condition has the sample's size, 3 for SD's 8x latent.
    """

    block_out_channels: tuple[int, ...]
    out_channels: int
    zero_out: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cond):
        ch = self.block_out_channels
        h = nn.silu(unet_lib.conv3x3(ch[0], "conv_in", self.dtype)(cond.astype(self.dtype)))
        for i in range(len(ch) - 1):
            h = nn.silu(unet_lib.conv3x3(ch[i], f"blocks_{2 * i}", self.dtype)(h))
            h = nn.silu(unet_lib.conv3x3(ch[i + 1], f"blocks_{2 * i + 1}", self.dtype, stride=2)(h))
        return unet_lib.conv3x3(self.out_channels, "conv_out", self.dtype, zero=self.zero_out)(h)


class ConditionEncoder(nn.Module):
    """h_eta of eq 12: the duplicated encoder, fed z_t and the condition c."""

    unet_cfg: Any
    adapter_cfg: Any
    dtype: Any = jnp.float32

    def setup(self):
        cfg, acfg = self.unet_cfg, self.adapter_cfg
        if acfg.fusion not in FUSIONS:
            raise ValueError(f"config model.adapter.fusion={acfg.fusion!r} is not one of {FUSIONS}")
        unet_lib.build_encoder(self, cfg, self.dtype)
        # ControlNet zero-initialises the embedding's conv_out. With the mu fusion that would
        # make h_eta == h_theta at init, so dL/dmu = 0 and nothing would ever train: mu = 0
        # alone keeps the adapted model equal to the backbone there.
        self.controlnet_cond_embedding = ConditioningEmbedding(
            tuple(acfg.conditioning_embedding_out_channels),
            cfg.block_out_channels[0],
            zero_out=acfg.fusion == "residual" or acfg.input == "cond_as_sample",
            dtype=self.dtype,
        )
        if acfg.input not in ADAPTER_INPUTS:
            raise ValueError(f"config model.adapter.input={acfg.input!r} is not one of {ADAPTER_INPUTS}")
        if acfg.fusion == "mix":
            # The learnable scalar of eq 12, initialised to 0 (or one per fused feature: the
            # skips and the mid block, when model.adapter.mu_per_feature is set).
            n_mu = len(self._skip_channels(cfg)) + 1 if acfg.mu_per_feature else None
            self.mu = self.param("mu", nn.initializers.zeros, () if n_mu is None else (n_mu,), jnp.float32)
        else:
            n_skips = 1 + sum(
                cfg.layers_per_block + (i < len(cfg.block_out_channels) - 1) for i in range(len(cfg.block_out_channels))
            )
            skip_channels = self._skip_channels(cfg)
            assert len(skip_channels) == n_skips
            self.controlnet_down_blocks = [unet_lib.conv1x1(c, None, self.dtype, zero=True) for c in skip_channels]
            self.controlnet_mid_block = unet_lib.conv1x1(cfg.block_out_channels[-1], None, self.dtype, zero=True)

    @staticmethod
    def _skip_channels(cfg):
        chans = [cfg.block_out_channels[0]]
        for i, c in enumerate(cfg.block_out_channels):
            chans += [c] * cfg.layers_per_block
            if i < len(cfg.block_out_channels) - 1:
                chans.append(c)
        return chans

    def __call__(self, sample, timesteps, cond, context=None):
        """Returns (skip features, mid feature) of the adapter branch."""
        emb = self.controlnet_cond_embedding(cond)
        if self.adapter_cfg.input == "cond":
            # eq 12 read literally, h_eta(c): the duplicated conv_in sees no z_t (only its bias).
            sample = jnp.zeros_like(sample)
        elif self.adapter_cfg.input == "cond_as_sample":
            # h_eta(c) with c in z_t's place (pixel-space tasks, where c has the sample's shape):
            # the duplicated encoder starts out seeing the condition as an image it knows.
            if cond.shape != sample.shape:
                raise ValueError(
                    f"config model.adapter.input='cond_as_sample' needs the condition's shape "
                    f"{cond.shape} to equal the sample's {sample.shape}"
                )
            sample = cond
        _, skips, mid = unet_lib.run_encoder(self, self.unet_cfg, sample, timesteps, context, extra_input=emb)
        return skips, mid

    def fuse(self, h_skips, h_mid, a_skips, a_mid):
        """Combine backbone features (h) with adapter features (a)."""
        if self.adapter_cfg.fusion == "mix":
            mus = self.mu.astype(h_mid.dtype)
            if mus.ndim == 0:
                mus = jnp.broadcast_to(mus, (len(h_skips) + 1,))
            mix = lambda h, a, mu: (1.0 - mu) * h + mu * a  # eq 12
            return [mix(h, a, mus[i]) for i, (h, a) in enumerate(zip(h_skips, a_skips))], mix(h_mid, a_mid, mus[-1])
        skips = [h + conv(a) for h, a, conv in zip(h_skips, a_skips, self.controlnet_down_blocks)]
        return skips, h_mid + self.controlnet_mid_block(a_mid)


class AdaptedUNet(nn.Module):
    """w_theta(z_t, c, t): the backbone U-Net with the conditional adapter fused in.

    Params: {'unet': backbone, 'adapter': duplicated encoder + embedding + fusion}.
    With cond=None the adapter is bypassed (the unconditional backbone, e.g. the teacher).
    """

    unet_cfg: Any
    adapter_cfg: Any
    dtype: Any = jnp.float32

    def setup(self):
        self.unet = unet_lib.UNet(self.unet_cfg, self.dtype)
        self.adapter = ConditionEncoder(self.unet_cfg, self.adapter_cfg, self.dtype)

    def __call__(self, sample, timesteps, cond=None, context=None):
        temb, skips, mid = self.unet.encode(sample, timesteps, context)
        if cond is not None:
            a_skips, a_mid = self.adapter(sample, timesteps, cond, context)
            skips, mid = self.adapter.fuse(skips, mid, a_skips, a_mid)
        return self.unet.decode(mid, skips, temb, context)


# Encoder submodules shared by name between the backbone and its duplicate.
ENCODER_KEYS = ("conv_in", "time_embedding", "mid_block")


def init_adapter_from_backbone(adapter_params, unet_params):
    """Copy the backbone's encoder weights into the adapter (the duplicate of eq 12)."""
    out = dict(adapter_params)
    for key in unet_params:
        if key in ENCODER_KEYS or key.startswith("down_blocks_"):
            if key not in out:
                raise KeyError(f"adapter has no submodule {key!r} to copy from the backbone")
            src_shapes = jax.tree_util.tree_map(jnp.shape, unet_params[key])
            dst_shapes = jax.tree_util.tree_map(jnp.shape, out[key])
            if src_shapes != dst_shapes:
                raise ValueError(f"adapter {key!r} does not match the backbone's shapes")
            out[key] = jax.tree_util.tree_map(jnp.array, unet_params[key])
    return out
