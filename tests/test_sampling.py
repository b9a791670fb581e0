"""Samplers against the exact PF-ODE of Gaussian data, where the optimal denoiser and the
ODE's solution are known in closed form (no network, no training)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from codi_jax import diffusion, sampling

MEAN, STD = 0.3, 0.5  # data x ~ N(MEAN, STD^2) per dimension


@dataclasses.dataclass(frozen=True)
class GaussianDenoiser:
    """E[x | z_t] for Gaussian data: the exact x_hat (and the eps_hat that goes with it)."""

    schedule: diffusion.Schedule

    def __call__(self, params, z, t, cond=None, context=None):
        alpha, sigma = self.schedule.alpha_sigma(jnp.broadcast_to(t, (z.shape[0],)))
        alpha, sigma = alpha[:, None], sigma[:, None]
        x_hat = MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (z - alpha * MEAN)
        return x_hat, (z - alpha * x_hat) / sigma


def exact(schedule, timesteps, z_T):
    """The exact PF-ODE flow from t_max to the grid's last timestep, then the exact x_hat there:
    the standardised variable (z_t - a_t m) / std_t is constant along the flow."""
    den = GaussianDenoiser(schedule)

    def std(t):
        a, s = schedule.alpha_sigma(t)
        return jnp.sqrt(a**2 * STD**2 + s**2), a

    s0, a0 = std(timesteps[0])
    s1, a1 = std(timesteps[-1])
    z = a1 * MEAN + (z_T - a0 * MEAN) * s1 / s0
    return den(None, z, timesteps[-1])[0]


@pytest.fixture(params=["cosine", "scaled_linear"])
def schedule(request):
    cfg = mlc.ConfigDict(
        dict(
            kind=request.param, num_timesteps=1000, logsnr_min=-10.0, logsnr_max=8.0, beta_start=0.00085, beta_end=0.012
        )
    )
    return diffusion.make_schedule(cfg)


def _errors(schedule, sampler, steps_list):
    """Max error of the sampler's scan on a fixed interval (t = 800 -> 200 in n ODE steps), so
    every step count solves the same problem."""
    den = GaussianDenoiser(schedule)
    rng = jax.random.PRNGKey(0)
    shape = (256, 1)
    z_T = jax.random.normal(jax.random.split(rng)[0], shape)  # the samplers' own first draw
    fn = sampling.sample_dpmpp_2m if sampler == "dpmpp_2m" else sampling.sample
    errs = []
    for n in steps_list:
        ts = np.linspace(800, 200, n + 1).round().astype(np.int32)
        out = jax.jit(lambda r, ts=ts: fn(den, None, r, ts, shape))(rng)
        errs.append(float(jnp.max(jnp.abs(out - exact(schedule, ts, z_T)))))
    return np.array(errs)


def test_dpmpp_2m_is_second_order_and_beats_ddim(schedule):
    steps = [3, 6, 12]
    ddim = _errors(schedule, "deterministic", steps)
    dpm = _errors(schedule, "dpmpp_2m", steps)
    # Both converge to the exact ODE solution; DPM-Solver++(2M) faster, and closer at every count.
    assert np.all(np.diff(ddim) < 0) and np.all(np.diff(dpm) < 0), (ddim, dpm)
    assert np.all(dpm < ddim), (ddim, dpm)
    # Halving the step size: first order ~2x less error, second order ~4x (allow slack: coarse grids).
    assert ddim[1] / ddim[2] < 2.8, ddim
    assert dpm[1] / dpm[2] > 3.0, dpm


def test_dpmpp_2m_first_step_is_ddim(schedule):
    """One step: both samplers return x_hat(z_T, T) from the same z_T."""
    den = GaussianDenoiser(schedule)
    rng = jax.random.PRNGKey(3)
    a = sampling.make_sampler(den, 1, "deterministic")(None, rng, (8, 1))
    b = sampling.make_sampler(den, 1, "dpmpp_2m")(None, rng, (8, 1))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # and the update with D = x_hat is the DDIM step in log-SNR form
    t, s = 700, 400
    a_t, s_t = schedule.alpha_sigma(t)
    a_s, s_s = schedule.alpha_sigma(s)
    z = jnp.ones((2, 1)) * 0.7
    x_hat, eps_hat = den(None, z, t)
    lam = lambda a_, s_: jnp.log(a_) - jnp.log(s_)
    upd = sampling.dpmpp_2m_update(z, x_hat, x_hat, lam(a_t, s_t), lam(a_s, s_s), 0.0, a_s, s_t, s_s, True)
    np.testing.assert_allclose(upd, diffusion.ddim_step(x_hat, eps_hat, a_s, s_s), rtol=1e-5)


def test_unknown_sampler_names_config_key():
    with pytest.raises(ValueError, match="eval.sampler='euler'"):
        sampling.check_sampler("euler")


@dataclasses.dataclass(frozen=True)
class ShrunkDenoiser:
    """The exact denoiser with its noise estimate scaled by k < 1 below t_max (and the x_hat that
    goes with it): a network that takes part of the noise for detail, except from pure noise."""

    inner: GaussianDenoiser
    k: float

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, params, z, t, cond=None, context=None):
        _, eps_hat = self.inner(params, z, t)
        alpha, sigma = self.schedule.alpha_sigma(jnp.broadcast_to(t, (z.shape[0],)))
        eps_hat = jnp.where(t >= self.schedule.t_max, 1.0, self.k) * eps_hat
        return (z - sigma[:, None] * eps_hat) / alpha[:, None], eps_hat


def test_shrunk_noise_estimate_leaves_noise_and_eps_scale_removes_it(schedule):
    exact_den, shrunk = GaussianDenoiser(schedule), ShrunkDenoiser(GaussianDenoiser(schedule), 0.98)
    rng, shape = jax.random.PRNGKey(0), (4096, 1)
    for n in (50, 200):
        assert diffusion.sampling_timesteps(schedule, n)[0] == schedule.t_max  # the first step is from pure noise
        want = sampling.make_sampler(exact_den, n, "deterministic")(None, rng, shape)
        if n == 200:
            assert abs(float(jnp.std(want)) - STD) < 0.01  # the exact sampler: the data's spread
        grainy = sampling.make_sampler(shrunk, n, "deterministic")(None, rng, shape)
        assert float(jnp.std(grainy)) > float(jnp.std(want)) + 0.025, n  # leftover noise: more spread
        fixed = sampling.make_sampler(shrunk, n, "deterministic", eps_scale=1 / 0.98)(None, rng, shape)
        np.testing.assert_allclose(fixed, want, atol=2e-4)


def test_diagnose_path_is_the_sampler_and_its_eps_scale_reaches_it(schedule):
    """diagnose.sample_path (batched like the evaluation) ends in make_sampler's sample, with or
    without the scale; the shrunk denoiser's path with eps_scale = 1/k is the exact one."""
    from codi_jax.evaluation import diagnose

    den, shrunk = GaussianDenoiser(schedule), ShrunkDenoiser(GaussianDenoiser(schedule), 0.98)
    cond = np.zeros((12, 1), np.float32)  # only its length is read: 12 examples in batches of 8 and 4
    exact_path = diagnose.sample_path(den, None, cond, num_steps=20, shape=(1,), seed=3, batch_size=8)
    fixed_path = diagnose.sample_path(
        shrunk, None, cond, num_steps=20, shape=(1,), seed=3, batch_size=8, eps_scale=1 / 0.98
    )
    assert exact_path.shape == (12, 20, 1)
    np.testing.assert_allclose(fixed_path, exact_path, atol=2e-4)
    first = sampling.make_sampler(den, 20, "deterministic")(None, jax.random.fold_in(jax.random.PRNGKey(3), 0), (8, 1))
    np.testing.assert_allclose(exact_path[:8, -1], first, atol=1e-6)


def test_trajectory_ends_in_the_sample_and_bad_options_are_named(schedule):
    den = GaussianDenoiser(schedule)
    rng = jax.random.PRNGKey(1)
    last = sampling.make_sampler(den, 6, "deterministic")(None, rng, (16, 1))
    path = sampling.make_sampler(den, 6, "deterministic", trajectory=True)(None, rng, (16, 1))
    assert path.shape == (6, 16, 1)
    np.testing.assert_array_equal(path[-1], last)
    with pytest.raises(ValueError, match="not 'dpmpp_2m'"):
        sampling.make_sampler(den, 4, "dpmpp_2m", eps_scale=1.01)
    with pytest.raises(ValueError, match="eps_scale=0"):
        sampling.make_sampler(den, 4, "deterministic", eps_scale=0)


def test_denoiser_stats_match_gaussian_closed_forms(schedule):
    """diagnose.denoiser_stats on Gaussian data with the exact denoiser: the posterior's error
    S^2 s^2 / (a^2 S^2 + s^2), the identity's s^2 / a^2, and E[eps | z]'s energy s^2 / (a^2 S^2 + s^2)."""
    from codi_jax.evaluation import diagnose

    x = MEAN + STD * np.asarray(jax.random.normal(jax.random.PRNGKey(5), (1 << 16, 1)))
    rows = diagnose.denoiser_stats(GaussianDenoiser(schedule), None, x, timesteps=(40, 300, 700), batch_size=1 << 16)
    for r in rows:
        a, s = (float(v) for v in schedule.alpha_sigma(r["t"]))
        var = a**2 * STD**2 + s**2
        assert r["x_mse"] == pytest.approx(STD**2 * s**2 / var, rel=0.06), r
        assert r["identity_mse"] == pytest.approx(s**2 / a**2, rel=0.06), r
        assert r["eps_energy"] == pytest.approx(s**2 / var, rel=0.06), r
        assert r["eps_corr"] == pytest.approx(s / np.sqrt(var), rel=0.05), r
    assert diagnose.path_points(4) == [0, 1, 2, 3] and diagnose.path_points(50)[-1] == 49


@pytest.mark.parametrize(
    "sampler,steps", [("deterministic", 4), ("deterministic", 20), ("dpmpp_2m", 4), ("dpmpp_2m", 20)]
)
def test_samplers_match_diffusers_schedulers(sampler, steps):
    """SD's schedule, the same model (the exact Gaussian denoiser) and the same z_T: our DDIM and
    DPM-Solver++(2M) land where diffusers' DDIMScheduler and DPMSolverMultistepScheduler do, with
    "trailing" timesteps (our grid), a last step to t = 0 (DDIM: alpha = 1; DPM: sigma = 0, first
    order), both of which return the last timestep's x_hat."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = mlc.ConfigDict(dict(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012))
    schedule = diffusion.make_schedule(cfg)
    den = GaussianDenoiser(schedule)
    rng, shape = jax.random.PRNGKey(7), (64, 3)
    ours = np.asarray(sampling.make_sampler(den, steps, sampler)(None, rng, shape))

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    if sampler == "deterministic":
        sched = diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True
        )
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(sched.timesteps.numpy(), diffusion.sampling_timesteps(schedule, steps))
    z = torch.from_numpy(np.array(jax.random.normal(jax.random.split(rng)[0], shape)))  # our z_T
    for t in sched.timesteps:
        eps = torch.from_numpy(np.asarray(den(None, jnp.asarray(z.numpy()), int(t))[1]))
        z = sched.step(eps, t, z).prev_sample
    np.testing.assert_allclose(ours, z.numpy(), atol=2e-4, rtol=1e-4)


@dataclasses.dataclass(frozen=True)
class BoundaryGaussianDenoiser:
    """The exact Gaussian denoiser under the consistency boundary condition (eq 17), as a CoDi model
    with `codi.boundary` on samples: diffusers' LCMScheduler applies the same c_skip / c_out itself."""

    inner: GaussianDenoiser
    sigma_data: float = 0.5
    time_scale: float = 10.0

    @property
    def schedule(self):
        return self.inner.schedule

    def __call__(self, params, z, t, cond=None, context=None):
        x_hat, _ = self.inner(params, z, t)
        alpha, sigma = self.schedule.alpha_sigma(jnp.broadcast_to(t, (z.shape[0],)))
        return diffusion.apply_boundary(
            x_hat,
            z,
            jnp.broadcast_to(t, (z.shape[0],)),
            alpha,
            sigma,
            sigma_data=self.sigma_data,
            time_scale=self.time_scale,
        )


@pytest.mark.parametrize("steps", [2, 4])
def test_consistency_multistep_sampler_matches_diffusers_lcm_scheduler(steps, monkeypatch):
    """The few-step sampler (denoise with the boundary condition, re-noise to the next timestep with
    fresh noise; the last x_hat is the sample) against diffusers' LCMScheduler on the same model,
    timesteps, z_T and noise draws (ours, handed to diffusers in order)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_lcm

    cfg = mlc.ConfigDict(dict(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012))
    schedule = diffusion.make_schedule(cfg)
    den = BoundaryGaussianDenoiser(GaussianDenoiser(schedule))
    rng, shape = jax.random.PRNGKey(11), (64, 3)
    ours = np.asarray(sampling.make_sampler(den, steps, "stochastic")(None, rng, shape))

    # Our draws: z_T from the first split of rng, then one key split off the rest per step.
    k0, key = jax.random.split(rng)
    noises = []
    for _ in range(steps):
        key, k = jax.random.split(key)
        noises.append(torch.from_numpy(np.array(jax.random.normal(k, shape))))
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **kw: noises.pop(0))

    sched = diffusers.LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_scaling=10.0,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    sched.set_timesteps(timesteps=[int(t) for t in diffusion.sampling_timesteps(schedule, steps)])
    z = torch.from_numpy(np.array(jax.random.normal(k0, shape)))
    for t in sched.timesteps:
        eps = torch.from_numpy(np.asarray(den.inner(None, jnp.asarray(z.numpy()), int(t))[1]))  # before eq 17
        z = sched.step(eps, t, z).prev_sample
    assert len(noises) == 1  # one draw per step but the last (ours draws it and drops it)
    np.testing.assert_allclose(ours, z.numpy(), atol=2e-4, rtol=1e-4)
