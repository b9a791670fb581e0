"""Plain diffusion training: makes the tiny unconditional teacher (and, with a condition,
is the conditional finetuning baseline)."""

from __future__ import annotations

import jax.numpy as jnp

from codi_jax import diffusion
from codi_jax.methods import base


def diffusion_loss(params, frozen, ema_params, batch, rng, *, denoiser: base.Denoiser, use_cond: bool):
    """E_t,eps || f_theta(z_t, t) - target ||^2, target in the backbone's parameterisation."""
    del ema_params
    x = batch["image"]
    k_t, k_eps = base.split_each(base.example_keys(rng, x.shape[0]))
    schedule = denoiser.schedule
    t = base.per_batch_or_sample(k_t, x.shape[0], True, 0, schedule.t_max)
    eps = base.normal_each(k_eps, x.shape, x.dtype)
    alpha, sigma = schedule.alpha_sigma(t)
    z = diffusion.add_noise(x, eps, alpha, sigma)
    cond = batch["cond"] if use_cond else None
    out = denoiser.raw(base.merge(params, frozen), z, t, cond, batch.get("context"))
    target = diffusion.from_x_eps(x, eps, z, alpha, sigma, denoiser.prediction)
    loss = jnp.mean(jnp.square(out - target))
    return loss, {"loss": loss}
