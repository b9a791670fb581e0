"""The diffusion math of CoDi, in one place (paper sec. 3 and 4, appendix D).

Everything here is a pure function of arrays. Time is measured in *timesteps*
`t` in [0, T] (T = `num_timesteps`, 1000 for Stable Diffusion), so that a
discrete SD schedule and a continuous schedule share one interface, the U-Net
sees the same timestep scale, and `Delta t` is a number of timesteps.

Variance preserving (eq 1): z_t = alpha_t x + sigma_t eps, sigma_t^2 = 1 - alpha_t^2.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Prediction = Literal["eps", "v", "x"]
PREDICTIONS = ("eps", "v", "x")


# --------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A variance-preserving noise schedule over timesteps t in [0, T].

    kind="discrete": SD's table of cumulative alphas, indexed by integer t
      (t in [0, T-1]); `alphas_cumprod` holds alpha_t^2.
    kind="cosine": continuous, alpha_t^2 = sigmoid(logsnr(t)) with a cosine
      log-SNR clipped to [logsnr_min, logsnr_max], so that both ends are
      non-degenerate (alpha_T > 0, sigma_0 > 0).
    """

    kind: str
    num_timesteps: int
    alphas_cumprod: tuple[float, ...] | None = None
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    @property
    def t_max(self) -> int:
        """Largest valid timestep (the start of sampling)."""
        return self.num_timesteps - 1 if self.kind == "discrete" else self.num_timesteps

    def alpha_sigma(self, t):
        """(alpha_t, sigma_t) for timesteps t (any shape, int or float)."""
        t = jnp.asarray(t)
        if self.kind == "discrete":
            table = jnp.asarray(self.alphas_cumprod, jnp.float32)
            idx = jnp.clip(jnp.round(t).astype(jnp.int32), 0, self.num_timesteps - 1)
            a2 = table[idx]
        else:
            a2 = jax.nn.sigmoid(self.logsnr(t))
        return jnp.sqrt(a2), jnp.sqrt(1.0 - a2)

    def logsnr(self, t):
        """log(alpha^2 / sigma^2) at timestep t."""
        t = jnp.asarray(t, jnp.float32)
        if self.kind == "discrete":
            a, s = self.alpha_sigma(t)
            return 2.0 * (jnp.log(a) - jnp.log(s))
        # Cosine schedule in log-SNR form: logsnr(u) = -2 log tan(a u + b),
        # with a, b chosen so that logsnr(0) = max and logsnr(1) = min.
        b = np.arctan(np.exp(-0.5 * self.logsnr_max))
        a = np.arctan(np.exp(-0.5 * self.logsnr_min)) - b
        u = t / self.num_timesteps
        return -2.0 * jnp.log(jnp.tan(a * u + b))


def scaled_linear_alphas_cumprod(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """SD's "scaled_linear" betas (linear in sqrt(beta)); returns alpha_t^2 per timestep."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def linear_alphas_cumprod(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def make_schedule(cfg) -> Schedule:
    """Schedule from a config with fields kind, num_timesteps, beta_start, beta_end, ...

    kind: "cosine" | "scaled_linear" | "linear". The two beta kinds are SD's
    discrete schedules (diffusers' `beta_schedule` names).
    """
    kind = cfg.kind
    if kind == "cosine":
        return Schedule("cosine", int(cfg.num_timesteps), None, float(cfg.logsnr_min), float(cfg.logsnr_max))
    if kind in ("scaled_linear", "linear"):
        fn = scaled_linear_alphas_cumprod if kind == "scaled_linear" else linear_alphas_cumprod
        table = fn(int(cfg.num_timesteps), float(cfg.beta_start), float(cfg.beta_end))
        return Schedule("discrete", int(cfg.num_timesteps), tuple(float(v) for v in table))
    raise ValueError(f"config schedule.kind={kind!r} is not one of 'cosine', 'scaled_linear', 'linear'")


def bcast(coef, x):
    """Broadcast per-example coefficients [B] (or scalars) against x [B, ...]."""
    coef = jnp.asarray(coef, x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


# --------------------------------------------------------------------------- forward process


def add_noise(x, eps, alpha, sigma):
    """Eq 1 by reparameterisation: z_t = alpha_t x + sigma_t eps."""
    return bcast(alpha, x) * x + bcast(sigma, x) * eps


# --------------------------------------------------------------------------- parameterisations (eq 8)


def to_x_eps(pred, z, alpha, sigma, prediction: Prediction):
    """Turn a network output into the pair (x_hat, eps_hat).

    v (eq 8): x = a z - s v, eps = a v + s z.  eps: x = (z - s eps) / a.
    x: eps = (z - a x) / s.
    """
    a, s = bcast(alpha, z), bcast(sigma, z)
    if prediction == "v":
        return a * z - s * pred, a * pred + s * z
    if prediction == "eps":
        return (z - s * pred) / a, pred
    if prediction == "x":
        return pred, (z - a * pred) / s
    raise ValueError(f"prediction type {prediction!r} is not one of {PREDICTIONS}")


def from_x_eps(x, eps, z, alpha, sigma, prediction: Prediction):
    """The network target for a given (x, eps) pair (inverse of `to_x_eps`)."""
    a, s = bcast(alpha, z), bcast(sigma, z)
    if prediction == "v":
        return a * eps - s * x
    if prediction == "eps":
        return eps
    if prediction == "x":
        return x
    raise ValueError(f"prediction type {prediction!r} is not one of {PREDICTIONS}")


def eps_from_x(x, z, alpha, sigma):
    """eps implied by a signal estimate x at z_t (z = a x + s eps)."""
    return (z - bcast(alpha, z) * x) / bcast(sigma, z)


# --------------------------------------------------------------------------- steps


def ddim_step(x_hat, eps_hat, alpha_s, sigma_s):
    """DDIM / PF-ODE step to time s (eq 7, eq 9 in v form): z_s = a_s x_hat + s_s eps_hat."""
    return bcast(alpha_s, x_hat) * x_hat + bcast(sigma_s, x_hat) * eps_hat


def prev_step(x_hat, eps, alpha_s, sigma_s):
    """PREv step (eq 14): z_s = a_s x_hat_theta(z_t, c, t) + s_s eps, eps the noise that made z_t."""
    return bcast(alpha_s, x_hat) * x_hat + bcast(sigma_s, x_hat) * eps


# --------------------------------------------------------------------------- boundary condition (eq 17, 18)


def boundary_scalings(t, *, sigma_data: float, time_scale: float):
    """(c_skip, c_out) of the consistency boundary condition, eq 17/18.

    Eq 18 as printed has c_skip(0) = 1/sigma_data and c_out -> sigma_data for
    large t, which contradicts eq 11's c_skip(0) = 1. We use the consistency-model
    form that satisfies it: c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2),
    with u = time_scale * t (t in timesteps), so c_skip(0) = 1, c_out(0) = 0 and
    c_out -> 1 (the public code's variant halves every prediction: docs/design-choices.md).
    """
    u = time_scale * jnp.asarray(t, jnp.float32)
    c_skip = sigma_data**2 / (u**2 + sigma_data**2)
    c_out = u / jnp.sqrt(u**2 + sigma_data**2)
    return c_skip, c_out


def apply_boundary(x_hat, z, t, alpha, sigma, *, sigma_data: float, time_scale: float):
    """Eq 17 on the signal prediction: x' = c_skip(t) z_t + c_out(t) x_hat, eps' from (x', z_t).

    At t = 0, x' = z_0: the boundary condition f(z_0, 0) = z_0 of eq 11. On a VP schedule
    z_0 = alpha_0 x + sigma_0 eps is not x (sigma_0 = 0.018 cosine, 0.029 SD), so the noise
    re-derived from x' near t = 0, (z - alpha x') / sigma, tends to (1 - alpha_0) z_0 / sigma_0
    (about 0.01 z_0), not the noise: eps' is a signal-space construction's by-product there.
    The noise-consistency target does not use it (`noise_boundary`).
    """
    c_skip, c_out = boundary_scalings(t, sigma_data=sigma_data, time_scale=time_scale)
    x_b = bcast(c_skip, z) * z + bcast(c_out, z) * x_hat
    return x_b, eps_from_x(x_b, z, alpha, sigma)


def noise_boundary(eps_net, eps_s, s, *, sigma_data: float, time_scale: float):
    """Eq 17 in noise space, for the noise-consistency target at time s (eq 15):
    eps' = c_skip(s) eps_s + (1 - c_skip(s)) eps_net.

    eps_net is the target network's own noise estimate at (z_s, s) (eq 8, unwrapped), eps_s the
    noise that built z_s (PREv, eq 14: the very noise of z_t). At s = 0 the target is eps_s, the
    noise-space image of f(z_0, 0) = z_0: the chain is anchored on known noise rather than on the
    (1 - alpha_0) z_0 / sigma_0 that `apply_boundary`'s re-derived eps gives there. With
    time_scale 10, c_skip(s) <= 0.0025 for s >= 1, so away from s = 0 this is the network's estimate.
    """
    c_skip, _ = boundary_scalings(s, sigma_data=sigma_data, time_scale=time_scale)
    c = bcast(c_skip, eps_net)
    return c * eps_s + (1.0 - c) * eps_net


# --------------------------------------------------------------------------- timesteps


def sampling_timesteps(schedule: Schedule, num_steps: int) -> np.ndarray:
    """A coarse DDIM grid from t_max down, one model call per entry (e.g. 4 steps: 999, 749, 499, 249)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_max = schedule.t_max
    stride = (t_max + 1) / num_steps
    return np.array([round(t_max - i * stride) for i in range(num_steps)], dtype=np.int32)


def sample_timesteps(key, shape, *, low: int, high: int):
    """Uniform integer timesteps in [low, high] (inclusive)."""
    return jax.random.randint(key, shape, low, high + 1)


# --------------------------------------------------------------------------- distances for eq 15


def distance(a, b, kind: str, huber_c: float = 0.0):
    """Per-example distance, mean over non-batch axes.

    l2: mean squared error. pseudo_huber: sqrt(||a-b||^2/d + c^2) - c (with ||.||^2/d the
    per-element mean, so c is on the scale of a per-element error).
    """
    sq = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=tuple(range(1, a.ndim)))
    if kind == "l2":
        return sq
    if kind == "pseudo_huber":
        return jnp.sqrt(sq + huber_c**2) - huber_c
    raise ValueError(f"distance {kind!r} is not one of 'l2', 'pseudo_huber'")
