"""The math module against closed forms (eq 1, 7, 8, 9, 14, 17, 18)."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from codi_jax import diffusion

SCHEDULES = {
    "cosine": mlc.ConfigDict(
        dict(kind="cosine", num_timesteps=1000, logsnr_min=-10.0, logsnr_max=7.0, beta_start=0.00085, beta_end=0.012)
    ),
    "sd": mlc.ConfigDict(
        dict(
            kind="scaled_linear", num_timesteps=1000, logsnr_min=0.0, logsnr_max=0.0, beta_start=0.00085, beta_end=0.012
        )
    ),
}


@pytest.fixture(params=list(SCHEDULES))
def schedule(request):
    return diffusion.make_schedule(SCHEDULES[request.param])


def test_variance_preserving(schedule):
    t = jnp.arange(0, schedule.t_max + 1, 37)
    a, s = schedule.alpha_sigma(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    assert np.all(np.diff(np.asarray(a)) < 0), "alpha must fall with t"


def test_sd_scaled_linear_matches_known_values():
    sched = diffusion.make_schedule(SCHEDULES["sd"])
    table = np.asarray(sched.alphas_cumprod)
    # diffusers' DDPMScheduler(scaled_linear, 0.00085, 0.012): alphas_cumprod[0] = 1 - 0.00085.
    np.testing.assert_allclose(table[0], 1 - 0.00085, rtol=1e-9)
    np.testing.assert_allclose(table[-1], 0.0046, atol=1e-4)


def test_cosine_endpoints():
    sched = diffusion.make_schedule(SCHEDULES["cosine"])
    np.testing.assert_allclose(sched.logsnr(0.0), 7.0, atol=1e-4)
    np.testing.assert_allclose(sched.logsnr(1000.0), -10.0, atol=1e-3)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_parameterisation_round_trip(schedule, prediction):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (4, 8, 8, 3))
    eps = jax.random.normal(k2, (4, 8, 8, 3))
    t = jnp.array([10, 250, 600, 900])
    a, s = schedule.alpha_sigma(t)
    z = diffusion.add_noise(x, eps, a, s)
    target = diffusion.from_x_eps(x, eps, z, a, s, prediction)
    x_hat, eps_hat = diffusion.to_x_eps(target, z, a, s, prediction)
    np.testing.assert_allclose(x_hat, x, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)


def test_eq8_v_form():
    # v = a eps - s x; x = a z - s v; eps = a v + s z (eq 8).
    a, s = jnp.array([0.6]), jnp.array([0.8])
    x, eps = jnp.ones((1, 2)) * 0.3, jnp.ones((1, 2)) * -1.2
    z = a[:, None] * x + s[:, None] * eps
    v = a[:, None] * eps - s[:, None] * x
    xh, eh = diffusion.to_x_eps(v, z, a, s, "v")
    np.testing.assert_allclose(xh, x, atol=1e-6)
    np.testing.assert_allclose(eh, eps, atol=1e-6)


def test_ddim_with_exact_predictions_reproduces_forward_process(schedule):
    """Eq 7/9 with the true (x, eps) lands exactly on q(z_s | x) with the same noise."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (3, 4, 4, 2))
    eps = jax.random.normal(k2, x.shape)
    t, s = jnp.array([900, 500, 30]), jnp.array([700, 480, 0])
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    z_t = diffusion.add_noise(x, eps, a_t, s_t)
    x_hat, eps_hat = diffusion.to_x_eps(diffusion.from_x_eps(x, eps, z_t, a_t, s_t, "v"), z_t, a_t, s_t, "v")
    z_s = diffusion.ddim_step(x_hat, eps_hat, a_s, s_s)
    np.testing.assert_allclose(z_s, diffusion.add_noise(x, eps, a_s, s_s), atol=1e-4)
    # PREv (eq 14) with the exact signal also lands on the forward process.
    np.testing.assert_allclose(diffusion.prev_step(x, eps, a_s, s_s), diffusion.add_noise(x, eps, a_s, s_s), atol=1e-6)


def test_prev_differs_from_ddim_when_prediction_is_wrong(schedule):
    x = jnp.ones((1, 2, 2, 1))
    eps = jnp.zeros_like(x) + 0.5
    a_s, s_s = schedule.alpha_sigma(jnp.array([300]))
    wrong_x, wrong_eps = x * 0.0, eps * 3.0
    prev = diffusion.prev_step(wrong_x, eps, a_s, s_s)
    ddim = diffusion.ddim_step(wrong_x, wrong_eps, a_s, s_s)
    assert not np.allclose(prev, ddim)


def test_boundary_scalings():
    c_skip, c_out = diffusion.boundary_scalings(jnp.array([0.0, 1.0, 999.0]), sigma_data=0.5, time_scale=10.0)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # eq 11: c_skip(0) = 1, c_out(0) = 0
    assert c_out[-1] > 0.999  # no halving of predictions at large t
    assert np.all(np.diff(np.asarray(c_skip)) < 0) and np.all(np.diff(np.asarray(c_out)) > 0)


def test_apply_boundary_is_identity_at_t0():
    sched = diffusion.make_schedule(SCHEDULES["sd"])
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 3))
    t = jnp.zeros((2,))
    a, s = sched.alpha_sigma(t)
    x_b, eps_b = diffusion.apply_boundary(z * 7.0, z, t, a, s, sigma_data=0.5, time_scale=10.0)
    np.testing.assert_allclose(x_b, z, atol=1e-6)  # f(z_0, 0) = z_0 whatever the network said
    # and the implied noise is consistent with z: z = a x + s eps.
    np.testing.assert_allclose(diffusion.add_noise(x_b, eps_b, a, s), z, atol=1e-5)


def test_sampling_timesteps():
    sched = diffusion.make_schedule(SCHEDULES["sd"])
    np.testing.assert_array_equal(diffusion.sampling_timesteps(sched, 4), [999, 749, 499, 249])
    np.testing.assert_array_equal(diffusion.sampling_timesteps(sched, 1), [999])
    with pytest.raises(ValueError):
        diffusion.sampling_timesteps(sched, 0)


def test_distances():
    a, b = jnp.zeros((2, 3)), jnp.ones((2, 3)) * 2.0
    np.testing.assert_allclose(diffusion.distance(a, b, "l2"), [4.0, 4.0])
    np.testing.assert_allclose(diffusion.distance(a, b, "pseudo_huber", 0.5), [np.sqrt(4.25) - 0.5] * 2, rtol=1e-6)
    with pytest.raises(ValueError, match="distance"):
        diffusion.distance(a, b, "l1")


def test_unknown_schedule_names_config_key():
    with pytest.raises(ValueError, match="schedule.kind"):
        diffusion.make_schedule(mlc.ConfigDict(dict(kind="sqrt", num_timesteps=10)))
