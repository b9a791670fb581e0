"""Where along the sampling path a model goes wrong: a diagnosis of a finished run.

  python -m codi_jax.evaluation.diagnose --run=RUN_DIR [--steps=4,50] [--eps_scales=1,1.01,1.02]

Three views, on the run's held-out crops (the evaluation's own crops and noise):
  denoiser  z_t = alpha_t x + sigma_t eps from held-out images x at a range of t: the network's x_hat
            error against the "do nothing" estimate z_t / alpha_t, the energy of its eps_hat over the
            true eps's and their correlation. Even an exact denoiser's E[eps | z_t] has energy < 1
            where the data has detail at the noise's scale (Gaussian data N(m, S^2):
            sigma^2 / (alpha^2 S^2 + sigma^2)), so read it across t and against other models.
  path      DDIM-N from the evaluation's noise: PSNR / SWD / high-frequency ratio of x_hat at points
            along the trajectory, so a sampler that peaks early and then adds grain shows where.
  eps scale DDIM-N with eps_hat scaled by c from the second step on (`sampling.sample`'s
            eps_scale): a network that removes too little noise per step leaves some in z each
            time, and N steps accumulate it as grain (HF ratio > 1 late in the path); c slightly
            above 1 removes it (docs/results-notes.md has the reproduction's finetuned model).
Writes RUN_DIR/diagnose.json (or --out) and prints a table. Pixel-space runs of image-conditioned
tasks (sr, inpaint); latent and text-prompted runs are refused with a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import build, diffusion, runs, sampling, storage
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate, metrics

DENOISE_T = (1, 10, 40, 100, 200, 400, 600, 800, 950)


def denoiser_stats(
    denoiser, params, x, cond=None, *, timesteps=DENOISE_T, seed: int = 0, batch_size: int = 16
) -> list[dict]:
    """Per t: the network's x_hat on z_t = alpha_t x + sigma_t eps (one eps draw, `seed`) against
    `x`: x_mse, identity_mse (of z_t / alpha_t), eps_energy (E eps_hat^2 / E eps^2), eps_corr, and
    for images the high-frequency ratio of x_hat (clipped to [-1, 1]) to x."""
    x = np.asarray(x, np.float32)
    eps = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), x.shape), np.float32)
    call = jax.jit(lambda p, z, t, c: denoiser(p, z, t, c, None))
    out = []
    for t in timesteps:
        t = min(t, denoiser.schedule.t_max)
        alpha, sigma = (float(v) for v in denoiser.schedule.alpha_sigma(t))
        z = alpha * x + sigma * eps
        xs, es = [], []
        for i in range(0, x.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            xh, eh = call(params, z[sl], jnp.full((z[sl].shape[0],), float(t)), None if cond is None else cond[sl])
            xs.append(np.asarray(xh)), es.append(np.asarray(eh))
        x_hat, eps_hat = np.concatenate(xs), np.concatenate(es)
        row = {
            "t": int(t),
            "sigma_over_alpha": sigma / alpha,
            "x_mse": float(np.mean((x_hat - x) ** 2)),
            "identity_mse": float(np.mean((z / alpha - x) ** 2)),
            "eps_energy": float(np.mean(eps_hat**2) / np.mean(eps**2)),
            "eps_corr": float(np.sum(eps_hat * eps) / np.sqrt(np.sum(eps_hat**2) * np.sum(eps**2))),
        }
        if x.ndim == 4:
            row["x_hf_ratio"] = float(metrics.high_frequency_ratio(np.clip(x_hat, -1, 1), x))
        out.append(row)
    return out


def path_points(num_steps: int, points: int = 10) -> list[int]:
    """Indices of the steps whose x_hat is measured: all of a short path, ~`points` of a long one
    (always the last)."""
    stride = max(1, num_steps // points)
    return sorted({*range(0, num_steps, stride), num_steps - 1})


def sample_path(
    denoiser, params, cond, *, num_steps: int, shape, seed: int, batch_size: int, eps_scale: float = 1.0, context=None
) -> np.ndarray:
    """DDIM-`num_steps` x_hat at every step, [n, steps, *shape], with the evaluation's noise
    (`evaluate.sample_batches` with PRNGKey(seed)): the last step is the evaluation's sample."""
    fn = sampling.make_sampler(denoiser, num_steps, "deterministic", eps_scale=eps_scale, trajectory=True)
    return evaluate.sample_batches(
        lambda *a: jnp.moveaxis(fn(*a), 0, 1),
        params,
        cond,
        rng=jax.random.PRNGKey(seed),
        n=cond.shape[0],
        batch_size=batch_size,
        one_shape=tuple(shape),
        context=context,
    )


def path_metrics(traj: np.ndarray, ref, timesteps, points: int = 10) -> list[dict]:
    """PSNR / SSIM / SWD / HF ratio of the path's x_hat at `path_points` (clipped to [-1, 1])."""
    out = []
    for i in path_points(traj.shape[1], points):
        m = metrics.evaluate_batch(np.clip(traj[:, i], -1.0, 1.0), ref)
        out.append(
            {
                "step": i + 1,
                "t": int(timesteps[i]),
                "psnr": m["psnr"],
                "ssim": m["ssim"],
                "swd_mean": m["swd_mean"],
                "hf_ratio": m["hf_ratio"],
            }
        )
    return out


def diagnose(run_dir: str, steps=(4, 50), eps_scales=(1.0, 1.01, 1.02), cache_dir: str = "", log=print) -> dict:
    """The three views for a finished run (see the module doc); returns the report."""
    config = runs.read_run_config(run_dir)
    if config.task in task_data.PROMPT_TASKS:
        raise ValueError(
            f"run {run_dir}: task {config.task!r} samples with text prompts; diagnose takes "
            "image-conditioned tasks (sr, inpaint)"
        )
    if config.teacher.pretrained_path:
        raise ValueError(
            f"run {run_dir}: a latent-space run (teacher.pretrained_path is set); diagnose takes pixel-space runs"
        )
    if not steps or not eps_scales or min(steps) < 1 or min(eps_scales) <= 0:
        raise ValueError(
            f"--steps={list(steps)} and --eps_scales={list(eps_scales)}: each needs values, steps >= 1 and scales > 0"
        )
    model = build.build_model(config, cache_dir or storage.join(run_dir, "diagnose_cache"))
    params, _, step = runs.restore_final(model.config, run_dir, model=model)
    den = model.method_denoiser
    ecfg = config.eval
    batch = pipeline.make_eval_batch(
        config.data, task=config.task, num_examples=ecfg.num_examples, seed=ecfg.seed, prompt_fn=model.space.prompt_fn
    )
    hr, cond = np.asarray(batch["image"]), batch["cond"]
    report = {
        "run": storage.absolute(run_dir),
        "method": config.method,
        "step": int(step),
        "num_examples": int(hr.shape[0]),
    }
    log(f"diagnose: {run_dir} (method {config.method}, step {step}), {hr.shape[0]} held-out crops")
    report["denoiser"] = denoiser_stats(den, params, hr, cond, seed=ecfg.seed, batch_size=ecfg.batch_size)
    log(
        "\nDenoiser on held-out z_t = alpha x + sigma eps:\n\n"
        "| t | sigma/alpha | x_hat MSE | z/alpha MSE | eps_hat energy | corr(eps_hat, eps) | x_hat HF ratio |\n"
        "|---|---|---|---|---|---|---|"
    )
    for r in report["denoiser"]:
        log(
            f"| {r['t']} | {r['sigma_over_alpha']:.3g} | {r['x_mse']:.4g} | {r['identity_mse']:.4g} | "
            f"{r['eps_energy']:.3f} | {r['eps_corr']:.3f} | {r.get('x_hf_ratio', float('nan')):.3f} |"
        )
    report["paths"] = {}
    for n in steps:
        for c in eps_scales:
            traj = sample_path(
                den,
                params,
                cond,
                num_steps=n,
                shape=model.space.shape,
                seed=ecfg.seed,
                batch_size=ecfg.batch_size,
                eps_scale=c,
            )
            ts = np.asarray(diffusion.sampling_timesteps(den.schedule, n))
            rows = path_metrics(traj, hr, ts)
            report["paths"][f"ddim{n}_eps{c:g}"] = rows
            log(
                f"\nDDIM {n} steps, eps_hat x {c:g}: x_hat along the path\n\n"
                "| step | t | PSNR | SSIM | SWD | HF ratio |\n|---|---|---|---|---|---|"
            )
            for r in rows:
                log(
                    f"| {r['step']} | {r['t']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['swd_mean']:.4f} | "
                    f"{r['hf_ratio']:.3f} |"
                )
    return report


def _define_flags():
    from absl import flags

    flags.DEFINE_string("run", None, "Workdir of a finished run (its config.json and final checkpoint).")
    flags.DEFINE_list("steps", ["4", "50"], "DDIM step counts whose paths are measured.")
    flags.DEFINE_list("eps_scales", ["1", "1.01", "1.02"], "Scales c of eps_hat (1 = the plain sampler).")
    flags.DEFINE_string("out", "", "The report's JSON file (default RUN/diagnose.json).")
    flags.mark_flags_as_required(["run"])


def main():
    from absl import flags

    from codi_jax import logging_utils

    _define_flags()

    def run(argv):
        del argv
        f = flags.FLAGS
        steps = [int(s) for s in f.steps]
        scales = [float(s) for s in f.eps_scales]
        report = diagnose(f.run, steps, scales)
        path = f.out or storage.join(f.run, "diagnose.json")
        storage.write_json(path, report, indent=1)
        print(f"\ndiagnose: report {path}")

    logging_utils.run_cli(run)


if __name__ == "__main__":
    main()
