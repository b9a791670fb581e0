"""CoDi's training rule (Algorithm 1, eq 14, 15) as claims the paper makes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import train
from tests import helpers


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _run_steps(config, n, lr=None, keep_every=False):
    """(initial state, final state or every state, losses) of n steps on one batch."""
    trainable, frozen, loss_fn, batch = helpers.codi_setup(config)
    tcfg = config.codi.train
    if lr is not None:
        tcfg.lr = lr
    tx, sched = train.make_optimizer(tcfg)
    state = train.create_state(trainable, frozen, tx, jax.random.PRNGKey(0))
    init = jax.tree_util.tree_map(np.asarray, state)
    step = jax.jit(train.make_train_step(loss_fn, tx, sched, tcfg.ema_decay))
    losses, states = [], []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        if keep_every:
            states.append(jax.tree_util.tree_map(np.asarray, state))
    return init, (states if keep_every else state), losses


def test_pe_mode_leaves_every_backbone_parameter_unchanged():
    config = helpers.smoke_config(mode="pe")
    init, state, _ = _run_steps(config, 3)
    assert set(state["params"]) == {"adapter"}  # only the adapter (and mu) trains
    assert _leaves_equal(init["frozen"]["unet"], state["frozen"]["unet"])
    assert not _leaves_equal(init["params"]["adapter"], state["params"]["adapter"])
    assert float(state["params"]["adapter"]["mu"]) != 0.0


def test_full_mode_trains_the_backbone_and_the_target_is_a_real_ema():
    """CoDi (full mode) for 30 steps on one fixed batch (one test: one compile for the three claims).
    The backbone trains; theta^- follows theta by Algorithm 1's rule (not the frozen copy of the
    initial weights that the public CoDi code steps with); the loss falls."""
    config = helpers.smoke_config(mode="full")
    config.codi.train.update(warmup_steps=1, ema_decay=0.9)
    init, states, losses = _run_steps(config, 30, lr=2e-3, keep_every=True)
    assert not _leaves_equal(init["params"]["unet"], states[-1]["params"]["unet"])

    assert not _leaves_equal(init["ema_params"], states[-1]["ema_params"])
    expected = init["params"]
    for s in states:
        expected = jax.tree_util.tree_map(lambda e, p: 0.9 * e + 0.1 * p, expected, s["params"])
    for got, want in zip(jax.tree_util.tree_leaves(states[-1]["ema_params"]), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("zs_predictor", ["prev", "ddim", "teacher"])
def test_no_gradient_reaches_the_target(zs_predictor):
    config = helpers.smoke_config(zs_predictor=zs_predictor)
    trainable, frozen, loss_fn, batch = helpers.codi_setup(config)
    # A target that differs from the online params, so a leak would show.
    ema = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)
    # jitted: one compile costs less than dispatching (and compiling) the U-Net's ops one by one
    grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True))(
        trainable, frozen, ema, batch, jax.random.PRNGKey(3)
    )
    g_online, g_frozen, g_target = grads[0]
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(g_target))
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(g_frozen))
    assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree_util.tree_leaves(g_online))


def test_guidance_weight_zero_switches_conditional_guidance_off():
    on = helpers.smoke_config(guidance_weight=1.0)
    off = helpers.smoke_config(guidance_weight=0.0)
    t_on, f_on, loss_on, batch = helpers.codi_setup(on)
    t_off, f_off, loss_off, _ = helpers.codi_setup(off)
    key = jax.random.PRNGKey(5)
    l_on, m_on = loss_on(t_on, f_on, t_on, batch, key)
    l_off, m_off = loss_off(t_off, f_off, t_off, batch, key)
    np.testing.assert_allclose(float(l_on), float(m_on["d_eps"] + m_on["d_x"]), rtol=1e-5)
    np.testing.assert_allclose(float(l_off), float(m_off["d_eps"]), rtol=1e-5)


def test_one_t_per_batch_or_per_sample():
    """codi.t_per_sample=False (the paper's CoDi): one t for the whole batch, drawn from its first
    example's key, so a microbatch (rows 1, 3, 5, ...) draws its own; True: one t per example."""
    from codi_jax.methods import base as methods_base

    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    shared = np.asarray(methods_base.per_batch_or_sample(keys, 64, False, 20, 1000))
    each = np.asarray(methods_base.per_batch_or_sample(keys, 64, True, 20, 1000))
    assert len(set(shared.tolist())) == 1 and len(set(each.tolist())) > 40
    assert each.min() >= 20 and each.max() <= 1000
    assert shared[0] == each[0]
    micro = np.asarray(methods_base.per_batch_or_sample(keys[1::2], 32, False, 20, 1000))
    assert set(micro.tolist()) == {int(each[1])}


def _schedule_config(kind):
    config = helpers.smoke_config()
    config.schedule.kind = kind  # 'cosine' (sigma_0 = 0.018) or SD's 'scaled_linear' (sigma_0 = 0.029)
    return config


@pytest.mark.parametrize("kind", ["cosine", "scaled_linear"])
def test_the_noise_target_at_s_0_is_the_noise_of_z_t_and_the_network_s_own_estimate_above(kind):
    """Eq 15's noise-consistency target at t = Delta t (s = 0) under PREv (eq 14) is the noise eps that
    made z_t (the boundary f(z_0, 0) = z_0 in noise space), on both schedules. The eps re-derived from the
    boundary-wrapped x' = z_0 instead ('wrapped', the earlier behaviour) is (1 - alpha_0) z_0 / sigma_0:
    a few hundredths of the noise. For s >= 1 the target is the EMA network's own noise estimate (within
    c_skip(s) <= 0.25%)."""
    from codi_jax import diffusion
    from codi_jax.methods import codi

    config = _schedule_config(kind)
    trainable, frozen, _, batch = helpers.codi_setup(config)
    denoiser = helpers.denoisers(config)[1]
    params = dict(trainable, **frozen)
    x, cond = batch["image"], batch["cond"]
    eps = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    schedule = denoiser.schedule
    for s in (0, 1, 2, 5):
        t = jnp.full((x.shape[0],), s + config.codi.delta_t)
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        z_t = diffusion.add_noise(x, eps, alpha_t, sigma_t)
        x_hat, _ = denoiser(params, z_t, t, cond)
        alpha_s, sigma_s = schedule.alpha_sigma(jnp.full_like(t, s))
        z_s = diffusion.prev_step(x_hat, eps, alpha_s, sigma_s)
        x_b, eps_target = codi.consistency_target(
            denoiser, params, z_s, jnp.full_like(t, s), eps, cond, None, "noise_boundary"
        )
        _, eps_wrapped = codi.consistency_target(denoiser, params, z_s, jnp.full_like(t, s), eps, cond, None, "wrapped")
        (_, eps_net), _ = denoiser.both(params, z_s, jnp.full_like(t, s), cond)
        rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))
        if s == 0:
            np.testing.assert_allclose(x_b, z_s, atol=1e-6)  # eq 17: f(z_0, 0) = z_0
            np.testing.assert_allclose(eps_target, eps, atol=1e-6)  # the noise of z_t, exactly
            a0, s0 = float(alpha_s[0]), float(sigma_s[0])
            np.testing.assert_allclose(eps_wrapped, (1 - a0) * z_s / s0, atol=1e-4)
            assert rms(eps_wrapped) < 0.05 * rms(eps), (kind, rms(eps_wrapped))
        else:
            assert rms(eps_target - eps_net) <= 0.0025 * rms(eps - eps_net) + 1e-6, (kind, s)
