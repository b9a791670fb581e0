"""CoDi: conditional diffusion distillation (Algorithm 1, eq 14 and 15).

The loss is a pure function of (trainable params, frozen params, EMA target params,
batch, rng). The target branch (z_s and the theta^- forward) carries no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codi_jax import diffusion
from codi_jax.methods import base

ZS_PREDICTORS = ("prev", "ddim", "teacher")
MODES = ("full", "pe")
INITS = ("pretrained", "finetuned", "random")
GUIDANCE_SPACES = ("latent", "pixel")
CONSISTENCY_SPACES = ("eps", "x")
EPS_TARGETS = ("noise_boundary", "wrapped")
DISTANCES = ("l2", "pseudo_huber")


def check_mode(mode: str, key: str) -> None:
    if mode not in MODES:
        raise ValueError(f"config {key}={mode!r} is not one of {MODES}")


def validate(c, schedule) -> None:
    """One line naming the first bad field of the `codi` config section."""
    check_mode(c.mode, "codi.mode")
    choices = (
        ("zs_predictor", ZS_PREDICTORS),
        ("d_eps", DISTANCES),
        ("d_x", DISTANCES),
        ("init", INITS),
        ("consistency_space", CONSISTENCY_SPACES),
        ("eps_target", EPS_TARGETS),
        ("guidance_space", GUIDANCE_SPACES),
    )
    for key, allowed in choices:
        if c[key] not in allowed:
            raise ValueError(f"config codi.{key}={c[key]!r} is not one of {allowed}")
    if not 1 <= c.delta_t < schedule.t_max:
        raise ValueError(f"config codi.delta_t={c.delta_t} must be in [1, {schedule.t_max - 1}]")


def split_params(full_params, mode: str, zs_predictor: str = "prev", teacher_cond: bool = False, key: str = "codi"):
    """(trainable, frozen) for CoDi ('full') or PE-CoDi ('pe', sec 4.4: backbone frozen).

    With the 'teacher' z_s predictor (or `teacher_cond`) a frozen copy of the starting model
    is kept as the teacher: frozen['teacher_unet'] (in PE mode the frozen backbone is that
    teacher already) and, with `teacher_cond` (a finetuned conditional teacher: CM-II, GD-II),
    frozen['teacher_adapter'] too, so the teacher sees the condition.
    """
    check_mode(mode, f"{key}.mode")
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
    if mode == "full":
        trainable = {"unet": full_params["unet"], "adapter": full_params["adapter"]}
        frozen = {}
        if zs_predictor == "teacher" or teacher_cond:
            frozen["teacher_unet"] = copy(full_params["unet"])
    else:
        trainable = {"adapter": full_params["adapter"]}
        frozen = {"unet": full_params["unet"]}
    if teacher_cond:
        frozen["teacher_adapter"] = copy(full_params["adapter"])
    return trainable, frozen


def teacher_params(frozen):
    """The frozen teacher's params: {'unet'} (unconditional) or {'unet', 'adapter'} (conditional)."""
    out = {"unet": frozen["teacher_unet"] if "teacher_unet" in frozen else frozen["unet"]}
    if "teacher_adapter" in frozen:
        out["adapter"] = frozen["teacher_adapter"]
    return out


def teacher_predict(teacher: base.Denoiser, frozen, z, t, cond, context):
    """(x_hat, eps_hat) of the frozen teacher; a conditional teacher is given the condition."""
    tp = teacher_params(frozen)
    return teacher(tp, z, t, cond if "adapter" in tp else None, context)


def consistency_target(denoiser: base.Denoiser, target_params, z_s, s, eps_s, cond, context, eps_target: str):
    """(x', eps') of the EMA target theta^- at (z_s, s): the targets of eq 15's consistency term.

    x' is the boundary-wrapped signal (eq 17; x' = z_s at s = 0). eps_target='noise_boundary':
    eq 17 in noise space, `diffusion.noise_boundary` (at s = 0 the noise eps_s that built z_s; the
    network's own eps estimate elsewhere). 'wrapped': the noise re-derived from x', which at s = 0 is
    (1 - alpha_0) z_0 / sigma_0, about 0.01 z_0 (kept to measure the fix; docs/design-choices.md).
    """
    (_, eps_net), (x_b, eps_b) = jax.tree_util.tree_map(
        jax.lax.stop_gradient, denoiser.both(target_params, z_s, s, cond, context)
    )
    if eps_target == "wrapped" or denoiser.boundary is None:
        return x_b, eps_b
    if eps_target != "noise_boundary":
        raise ValueError(f"config codi.eps_target={eps_target!r} is not one of {EPS_TARGETS}")
    sigma_data, time_scale = denoiser.boundary
    return x_b, diffusion.noise_boundary(eps_net, eps_s, s, sigma_data=sigma_data, time_scale=time_scale)


def codi_loss(
    params, frozen, ema_params, batch, rng, *, denoiser: base.Denoiser, teacher: base.Denoiser, cfg, decode=None
):
    """Eq 15: d_eps(eps_hat_{theta-}(z_s, s, c), eps_hat_theta(z_t, t, c)) + lambda d_x(x, x_hat_theta(z_t, t, c)).

    `decode(frozen, latents) -> pixels` (latent models): with cfg.guidance_space == 'pixel',
    d_x compares pixels through the VAE decoder (Fig. 2); 'latent' compares latents.
    """
    x, cond, context = batch["image"], batch["cond"], batch.get("context")
    schedule = denoiser.schedule
    k_t, k_eps = base.split_each(base.example_keys(rng, x.shape[0]))
    # Algorithm 1: t ~ [Delta t, T], s = t - Delta t.
    t = base.per_batch_or_sample(k_t, x.shape[0], cfg.t_per_sample, cfg.delta_t, schedule.t_max)
    s = t - cfg.delta_t
    eps = base.normal_each(k_eps, x.shape, x.dtype)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    z_t = diffusion.add_noise(x, eps, alpha_t, sigma_t)

    online = base.merge(params, frozen)
    (_, eps_net), (x_hat, eps_hat) = denoiser.both(online, z_t, t, cond, context)

    sg = jax.lax.stop_gradient
    # z_s and eps_s, the noise that built it (z_s = a_s x + s_s eps_s).
    if cfg.zs_predictor == "prev":  # eq 14: the adapted model's own PF-ODE, with the true noise
        eps_s = eps
        z_s = diffusion.prev_step(sg(x_hat), eps, alpha_s, sigma_s)
    elif cfg.zs_predictor == "ddim":  # eq 7 with the model's own eps_hat (the public code's default)
        eps_s = sg(eps_hat)
        z_s = diffusion.ddim_step(sg(x_hat), eps_s, alpha_s, sigma_s)
    elif cfg.zs_predictor == "teacher":  # consistency-model style: the frozen starting model's PF-ODE
        x_te, eps_te = teacher_predict(teacher, frozen, z_t, t, cond, context)
        eps_s = sg(eps_te)
        z_s = diffusion.ddim_step(sg(x_te), eps_s, alpha_s, sigma_s)
    else:
        raise ValueError(f"config codi.zs_predictor={cfg.zs_predictor!r} is not one of {ZS_PREDICTORS}")

    # theta^-: the EMA target network; no gradient flows through it.
    target = base.merge(sg(ema_params), frozen)
    x_target, eps_target = consistency_target(denoiser, target, sg(z_s), s, eps_s, cond, context, cfg.eps_target)

    space = cfg.consistency_space
    if space == "eps":  # eq 15: noise-space consistency
        online_eps = eps_net if cfg.eps_target == "noise_boundary" else eps_hat
        d_eps = diffusion.distance(online_eps, eps_target, cfg.d_eps, cfg.huber_c)
    elif space == "x":  # signal-space consistency f(z_t, t) = f(z_s, s) (consistency models; an ablation)
        d_eps = diffusion.distance(x_hat, x_target, cfg.d_eps, cfg.huber_c)
    else:
        raise ValueError(f"config codi.consistency_space={space!r} is not one of {CONSISTENCY_SPACES}")
    if cfg.guidance_space == "pixel" and decode is not None:
        d_x = diffusion.distance(batch["pixels"], decode(frozen, x_hat), cfg.d_x, cfg.huber_c)
    else:  # latent space (for pixel-space models the two are the same)
        d_x = diffusion.distance(x, x_hat, cfg.d_x, cfg.huber_c)
    loss = jnp.mean(cfg.consistency_weight * d_eps + cfg.guidance_weight * d_x)
    metrics = {"loss": loss, "d_eps": jnp.mean(d_eps), "d_x": jnp.mean(d_x)}
    adapter = online.get("adapter", {})
    if "mu" in adapter:
        metrics["mu"] = jnp.mean(adapter["mu"])  # the scalar of eq 12 (or the mean of per-feature mus)
        if jnp.ndim(adapter["mu"]):
            metrics["mu_max"] = jnp.max(adapter["mu"])
    return loss, metrics
