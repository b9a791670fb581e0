"""Few-step samplers: one model call per step, `jax.lax.scan` over the steps.

Compiled once per step count (the timestep grid is a static-shape array argument).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import diffusion
from codi_jax.methods import base

SAMPLERS = ("deterministic", "stochastic")


def sample(denoiser: base.Denoiser, params, rng, timesteps, shape, cond=None, context=None,
           stochastic: bool = False):
    """Start from z_T ~ N(0, I), walk down `timesteps` (descending), return the last x_hat.

    deterministic: DDIM / PF-ODE, z_s = a_s x_hat + s_s eps_hat (eq 7).
    stochastic:    consistency-style multistep, z_s = a_s x_hat + s_s eps', fresh eps'.
    """
    timesteps = jnp.asarray(timesteps, jnp.int32)
    next_t = jnp.concatenate([timesteps[1:], jnp.zeros((1,), jnp.int32)])
    k0, rng = jax.random.split(rng)
    z = jax.random.normal(k0, shape, jnp.float32)

    def step(carry, ts):
        z, key = carry
        t, s = ts
        x_hat, eps_hat = denoiser(params, z, t, cond, context)
        key, k = jax.random.split(key)
        noise = jax.random.normal(k, z.shape, z.dtype) if stochastic else eps_hat
        alpha_s, sigma_s = denoiser.schedule.alpha_sigma(s)
        return (diffusion.ddim_step(x_hat, noise, alpha_s, sigma_s), key), x_hat

    _, x_hats = jax.lax.scan(step, (z, rng), (timesteps, next_t))
    return x_hats[-1]


def make_sampler(denoiser: base.Denoiser, num_steps: int, sampler: str = "deterministic"):
    """A jitted `fn(params, rng, cond, context) -> x` for a fixed step count."""
    if sampler not in SAMPLERS:
        raise ValueError(f"config eval.sampler={sampler!r} is not one of {SAMPLERS}")
    timesteps = diffusion.sampling_timesteps(denoiser.schedule, num_steps)

    @functools.partial(jax.jit, static_argnums=(2,))
    def fn(params, rng, shape, cond=None, context=None):
        return sample(denoiser, params, rng, timesteps, shape, cond, context, sampler == "stochastic")

    return fn
