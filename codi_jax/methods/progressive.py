"""Progressive distillation (Salimans & Ho 2022), applied to the finetuned conditional model:
the paper's GD-II baseline (Table 1/2: finetune, then distil; for super-resolution there is no
classifier-free guidance to fold in, so guided distillation reduces to progressive distillation).

One round halves the sampler's steps: a student of N DDIM steps (on `diffusion.sampling_timesteps`'s
N-grid) learns to land, in one step, where two DDIM steps of the frozen teacher land on the 2N-grid
(whose even entries are the N-grid's). The student starts as a copy of the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import diffusion
from codi_jax.methods import base, codi


def step_grid(schedule: diffusion.Schedule, student_steps: int):
    """(t, t_mid, t_next) per student step: the N-grid, its 2N-grid midpoints, and the next entry (0 last)."""
    fine = diffusion.sampling_timesteps(schedule, 2 * student_steps)
    coarse = fine[0::2]
    if not np.array_equal(coarse, diffusion.sampling_timesteps(schedule, student_steps)):
        raise ValueError(f"the {2 * student_steps}-step grid does not refine the {student_steps}-step grid")
    t_next = np.concatenate([coarse[1:], [0]]).astype(np.int32)
    return coarse, fine[1::2], t_next


def target_x(z_t, z_next, alpha_t, sigma_t, alpha_n, sigma_n):
    """The x~ whose DDIM step from (z_t, t) lands on z_next at t_next (Salimans & Ho, Alg. 2):
    z_next = a_n x~ + s_n (z_t - a_t x~) / s_t  =>  x~ = (z_next - (s_n/s_t) z_t) / (a_n - (s_n/s_t) a_t)."""
    b = lambda c: diffusion.bcast(c, z_t)
    ratio = b(sigma_n / sigma_t)
    return (z_next - ratio * z_t) / (b(alpha_n) - ratio * b(alpha_t))


def progressive_loss(params, frozen, ema_params, batch, rng, *, denoiser: base.Denoiser, student_steps: int):
    """max(SNR_t, 1)-weighted ||x~ - x_hat_student(z_t, t, c)||^2 ("truncated SNR" weighting).

    On the last student step the sampler returns x_hat itself (sampling.py), so there the target
    is the teacher's x_hat after its first of the two steps (its own last step).
    """
    del ema_params
    x, cond, context = batch["image"], batch["cond"], batch.get("context")
    schedule = denoiser.schedule
    k_i, k_eps = base.split_each(base.example_keys(rng, x.shape[0]))
    coarse, mid, nxt = (jnp.asarray(a) for a in step_grid(schedule, student_steps))
    i = jax.vmap(lambda k: jax.random.randint(k, (), 0, student_steps))(k_i)
    t, t_mid, t_next = coarse[i], mid[i], nxt[i]
    eps = base.normal_each(k_eps, x.shape, x.dtype)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    z_t = diffusion.add_noise(x, eps, alpha_t, sigma_t)

    # Two DDIM steps of the frozen conditional teacher (eq 7), t -> t_mid -> t_next.
    x1, e1 = codi.teacher_predict(denoiser, frozen, z_t, t, cond, context)
    a_m, s_m = schedule.alpha_sigma(t_mid)
    z_mid = diffusion.ddim_step(x1, e1, a_m, s_m)
    x2, e2 = codi.teacher_predict(denoiser, frozen, z_mid, t_mid, cond, context)
    a_n, s_n = schedule.alpha_sigma(t_next)
    z_next = diffusion.ddim_step(x2, e2, a_n, s_n)
    last = diffusion.bcast(i == student_steps - 1, x)
    target = jax.lax.stop_gradient(jnp.where(last, x2, target_x(z_t, z_next, alpha_t, sigma_t, a_n, s_n)))

    x_hat, _ = denoiser(base.merge(params, frozen), z_t, t, cond, context)
    weight = jnp.maximum(jnp.square(alpha_t / sigma_t), 1.0)
    per_example = weight * diffusion.distance(x_hat, target, "l2")
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "x_mse": jnp.mean(diffusion.distance(x_hat, target, "l2"))}


def rounds(start_steps: int, final_steps: int) -> list[int]:
    """Student step counts, halving from start_steps / 2 down to final_steps (powers of two apart)."""
    if start_steps < 2 or final_steps < 1 or start_steps % final_steps or start_steps <= final_steps:
        raise ValueError(
            f"config gd.start_steps={start_steps} must be a power-of-two multiple (> 1x) of "
            f"gd.final_steps={final_steps}"
        )
    ratio = start_steps // final_steps
    if ratio & (ratio - 1):
        raise ValueError(f"config gd.start_steps={start_steps} / gd.final_steps={final_steps} is not a power of two")
    out, n = [], start_steps
    while n > final_steps:
        n //= 2
        out.append(n)
    return out
