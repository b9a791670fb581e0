"""Progressive distillation (GD-II baseline): the step grid and the one-step target, in closed form."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.methods import progressive


def _schedule(kind="cosine"):
    return diffusion.make_schedule(
        mlc.ConfigDict(
            dict(kind=kind, num_timesteps=1000, logsnr_min=-10.0, logsnr_max=8.0, beta_start=0.00085, beta_end=0.012)
        )
    )


@pytest.mark.parametrize("kind", ["cosine", "scaled_linear"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_step_grid_refines_the_sampler_grid(kind, n):
    schedule = _schedule(kind)
    t, mid, nxt = progressive.step_grid(schedule, n)
    np.testing.assert_array_equal(t, diffusion.sampling_timesteps(schedule, n))  # the student's sampler grid
    np.testing.assert_array_equal(
        np.sort(np.concatenate([t, mid]))[::-1], diffusion.sampling_timesteps(schedule, 2 * n)
    )
    assert np.all(t > mid) and np.all(mid > nxt) and nxt[-1] == 0


def test_target_makes_one_student_step_land_on_two_teacher_steps():
    """DDIM from (z_t, t) with x_hat = x~ (and the eps that goes with it) reaches z_next exactly."""
    schedule = _schedule()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    z_t, z_next = jax.random.normal(k1, (3, 4, 4, 3)), jax.random.normal(k2, (3, 4, 4, 3))
    t, t_next = jnp.array([900, 500, 120]), jnp.array([700, 250, 0])
    a_t, s_t = schedule.alpha_sigma(t)
    a_n, s_n = schedule.alpha_sigma(t_next)
    x_tilde = progressive.target_x(z_t, z_next, a_t, s_t, a_n, s_n)
    eps = diffusion.eps_from_x(x_tilde, z_t, a_t, s_t)
    np.testing.assert_allclose(diffusion.ddim_step(x_tilde, eps, a_n, s_n), z_next, atol=2e-4)


def test_rounds_halve_and_reject_bad_counts():
    assert progressive.rounds(16, 4) == [8, 4]
    assert progressive.rounds(64, 1) == [32, 16, 8, 4, 2, 1]
    for start, final in [(12, 4), (4, 4), (4, 8), (1, 1)]:
        with pytest.raises(ValueError, match="gd.start_steps"):
            progressive.rounds(start, final)
