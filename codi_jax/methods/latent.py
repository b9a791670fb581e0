"""Latent-space training (Stable Diffusion): pixels <-> VAE latents, and the text context.

The VAE params and the cached prompt embedding ride in the train state's `frozen` dict
(keys 'vae' and 'context'), so the jitted step sees them as arguments, not constants.
Diffusion latents are z = scaling_factor * (E(x) - shift_factor), as diffusers' pipelines.
The condition c stays in pixel space: the adapter's conv embedding brings it to the latent
resolution (ControlNet's layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from codi_jax.methods import base

FROZEN_KEYS = ("vae", "context")


@dataclasses.dataclass(frozen=True)
class LatentCodec:
    vae: Any  # codi_jax.models.vae.AutoencoderKL
    scaling_factor: float
    shift_factor: float = 0.0
    sample_posterior: bool = True  # draw from the VAE posterior (SD training) or take its mean

    def moments(self, vae_params, images):
        """The VAE posterior's (mean, logvar) of images [B, H, W, 3] (what the record cache stores)."""
        return self.vae.apply({"params": vae_params}, images, method=self.vae.encode)

    def from_moments(self, mean, logvar, rng=None):
        """Diffusion latents of a posterior: its mean, or a draw from it per example of `rng`."""
        z = mean
        if self.sample_posterior and rng is not None:
            noise = base.normal_each(base.example_keys(rng, mean.shape[0]), mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * logvar) * noise
        return (z - self.shift_factor) * self.scaling_factor

    def encode(self, vae_params, images, rng=None):
        return self.from_moments(*self.moments(vae_params, images), rng)

    def decode(self, vae_params, latents):
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.apply({"params": vae_params}, z, method=self.vae.decode).astype(jnp.float32)


def context_for(frozen, batch_size: int):
    ctx = frozen.get("context")
    if ctx is None:
        return None
    return jnp.broadcast_to(ctx, (batch_size,) + ctx.shape[1:])


CACHED_LATENT_KEYS = ("latent_mean", "latent_logvar")


def latent_loss(loss_fn, codec: LatentCodec):
    """Wrap a pixel-batch loss: the image becomes its latent (no gradient), the prompt
    embedding becomes the batch's context (unless the batch has one: tasks with prompts);
    the pixel image is kept as batch['pixels']. A batch with the records' cached VAE posterior
    (batch['latent_mean'], ['latent_logvar']: docs/data.md) skips the VAE encoder: the latent is
    drawn from the cached posterior with the same noise the encoder's path would draw."""

    def wrapped(params, frozen, ema_params, batch, rng):
        images = batch["image"]
        k_enc, k_loss = base.split_each(base.example_keys(rng, images.shape[0]))
        if "latent_mean" in batch:
            mean, logvar = (batch[k] for k in CACHED_LATENT_KEYS)
            latents = jax.lax.stop_gradient(codec.from_moments(mean.astype(jnp.float32), logvar, k_enc))
            batch = {k: v for k, v in batch.items() if k not in CACHED_LATENT_KEYS}
        else:
            latents = jax.lax.stop_gradient(codec.encode(frozen["vae"], images, k_enc))
        context = batch["context"] if batch.get("context") is not None else context_for(frozen, images.shape[0])
        batch = dict(batch, image=latents, pixels=images, context=context)
        return loss_fn(params, frozen, ema_params, batch, k_loss)

    return wrapped
