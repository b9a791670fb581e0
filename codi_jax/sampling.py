"""Samplers: one model call per step, `jax.lax.scan` over the steps.

Compiled once per step count (the timestep grid is a static-shape array argument).

  deterministic  DDIM / PF-ODE (eq 7): z_s = a_s x_hat + s_s eps_hat. N steps of it is the
                 "DDIM N" baseline for a finetuned model and CoDi's few-step sampler.
  stochastic     consistency-style multistep: z_s = a_s x_hat + s_s eps', fresh eps' each step.
  dpmpp_2m       DPM-Solver++(2M) (Lu et al. 2022, the paper's Table 2 baseline): a second-order
                 multistep solver of the PF-ODE in data prediction x_hat and log-SNR time.
Every sampler returns the last step's x_hat (a 1-step sampler returns x_hat(z_T, T)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from codi_jax import diffusion
from codi_jax.methods import base

SAMPLERS = ("deterministic", "stochastic", "dpmpp_2m")
# Short names for result keys and plot legends.
SAMPLER_LABELS = {"deterministic": "DDIM", "stochastic": "multistep", "dpmpp_2m": "DPM++2M"}


def check_sampler(name: str, key: str = "eval.sampler") -> str:
    if name not in SAMPLERS:
        raise ValueError(f"config {key}={name!r} is not one of {SAMPLERS}")
    return name


def _start(rng, shape):
    k0, rng = jax.random.split(rng)
    return jax.random.normal(k0, shape, jnp.float32), rng


def _grid(timesteps):
    timesteps = jnp.asarray(timesteps, jnp.int32)
    return timesteps, jnp.concatenate([timesteps[1:], jnp.zeros((1,), jnp.int32)])


def sample(
    denoiser: base.Denoiser,
    params,
    rng,
    timesteps,
    shape,
    cond=None,
    context=None,
    stochastic: bool = False,
    eps_scale: float = 1.0,
    trajectory: bool = False,
):
    """Start from z_T ~ N(0, I), walk down `timesteps` (descending), return the last x_hat.

    deterministic: DDIM / PF-ODE, z_s = a_s x_hat + s_s eps_hat (eq 7).
    stochastic:    consistency-style multistep, z_s = a_s x_hat + s_s eps', fresh eps'.
    eps_scale:     c != 1 samples with c * eps_hat and the x_hat that goes with it,
                   (z - sigma_t c eps_hat) / alpha_t, at every step but the first: a network that
                   removes too little noise per step leaves some in z each time, and a long DDIM
                   path accumulates it as grain; c slightly above 1 takes it out
                   (docs/results-notes.md). The first step, from pure noise, is left alone: there
                   sigma_t / alpha_t is large (150 for the cosine schedule, 15 for SD's) and would
                   turn a 1% change of eps_hat into a wrong x_hat. (Ning et al. 2023's "epsilon
                   scaling" is the same knob turned the other way, c < 1, against exposure bias.)
    trajectory:    return every step's x_hat, [steps, *shape], instead of the last.
    """
    timesteps, next_t = _grid(timesteps)
    z, rng = _start(rng, shape)

    scaled = eps_scale != 1.0  # a Python branch: c = 1 compiles to the same program as before

    def step(carry, ts):
        z, key = carry
        (i, t, s) = ts if scaled else (None, *ts)
        x_hat, eps_hat = denoiser(params, z, t, cond, context)
        if scaled:
            c = jnp.where(i == 0, 1.0, eps_scale)
            alpha_t, sigma_t = denoiser.schedule.alpha_sigma(t)
            x_hat = x_hat - (c - 1.0) * (sigma_t / alpha_t) * eps_hat
            eps_hat = c * eps_hat
        key, k = jax.random.split(key)
        noise = jax.random.normal(k, z.shape, z.dtype) if stochastic else eps_hat
        alpha_s, sigma_s = denoiser.schedule.alpha_sigma(s)
        return (diffusion.ddim_step(x_hat, noise, alpha_s, sigma_s), key), x_hat

    xs = (jnp.arange(timesteps.shape[0]), timesteps, next_t) if scaled else (timesteps, next_t)
    _, x_hats = jax.lax.scan(step, (z, rng), xs)
    return x_hats if trajectory else x_hats[-1]


def dpmpp_2m_update(z, x_hat, x_prev, lam_t, lam_s, lam_prev, alpha_s, sigma_t, sigma_s, first):
    """One DPM-Solver++(2M) step from t to s (lam = log(alpha / sigma), h = lam_s - lam_t):

        D   = (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_prev,  r = (lam_t - lam_prev) / h   (D = x_hat_t when `first`)
        z_s = (sigma_s / sigma_t) z_t - alpha_s (exp(-h) - 1) D

    With D = x_hat_t this is exactly the DDIM step (eq 7) written in log-SNR time.
    """
    h = lam_s - lam_t
    r = (lam_t - lam_prev) / h
    d = jnp.where(first, x_hat, (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev)
    return (sigma_s / sigma_t) * z - alpha_s * jnp.expm1(-h) * d


def sample_dpmpp_2m(denoiser: base.Denoiser, params, rng, timesteps, shape, cond=None, context=None):
    """DPM-Solver++(2M) over `timesteps` (descending): first step first order, the rest second
    order, and the output is the last step's x_hat (the "lower order final" choice of
    diffusers' DPMSolverMultistepScheduler for few steps, as DDIM ends here)."""
    timesteps, next_t = _grid(timesteps)
    z, _ = _start(rng, shape)
    schedule = denoiser.schedule

    def lam(t):
        a, s = schedule.alpha_sigma(t)
        return jnp.log(a) - jnp.log(s)

    def step(carry, inputs):
        z, x_prev, lam_prev = carry
        i, t, s = inputs
        x_hat, _ = denoiser(params, z, t, cond, context)
        _, sigma_t = schedule.alpha_sigma(t)
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        z_s = dpmpp_2m_update(z, x_hat, x_prev, lam(t), lam(s), lam_prev, alpha_s, sigma_t, sigma_s, i == 0)
        return (z_s, x_hat, lam(t)), x_hat

    steps = jnp.arange(timesteps.shape[0])
    init = (z, jnp.zeros_like(z), lam(timesteps[0]) + 1.0)  # lam_prev unused on the first step
    _, x_hats = jax.lax.scan(step, init, (steps, timesteps, next_t))
    return x_hats[-1]


_SAMPLERS: dict = {}


def make_sampler(
    denoiser: base.Denoiser,
    num_steps: int,
    sampler: str = "deterministic",
    eps_scale: float = 1.0,
    trajectory: bool = False,
):
    """A jitted `fn(params, rng, shape, cond, context) -> x` for a fixed step count (`sample`'s
    eps_scale and trajectory: DDIM and the multistep sampler only).

    Built once per process for equal arguments (the denoiser by its repr: the module with its whole
    config, the schedule, the prediction type, the guidance scale), so the run's evaluation, a resumed
    run's, the evaluation job's and the sampler's calls share one traced and compiled program."""
    key = (repr(denoiser), num_steps, sampler, float(eps_scale), trajectory)
    if key not in _SAMPLERS:
        if len(_SAMPLERS) >= 32:
            _SAMPLERS.pop(next(iter(_SAMPLERS)))
        _SAMPLERS[key] = _build_sampler(denoiser, num_steps, sampler, eps_scale, trajectory)
    return _SAMPLERS[key]


def _build_sampler(denoiser, num_steps, sampler, eps_scale, trajectory):
    check_sampler(sampler)
    if sampler == "dpmpp_2m" and (eps_scale != 1.0 or trajectory):
        raise ValueError(
            "eps_scale and trajectory are for the 'deterministic' and 'stochastic' samplers, not 'dpmpp_2m'"
        )
    if not eps_scale > 0:
        raise ValueError(f"eps_scale={eps_scale} must be > 0")
    timesteps = diffusion.sampling_timesteps(denoiser.schedule, num_steps)

    @functools.partial(jax.jit, static_argnums=(2,))
    def fn(params, rng, shape, cond=None, context=None):
        if sampler == "dpmpp_2m":
            return sample_dpmpp_2m(denoiser, params, rng, timesteps, shape, cond, context)
        return sample(
            denoiser, params, rng, timesteps, shape, cond, context, sampler == "stochastic", eps_scale, trajectory
        )

    return fn
