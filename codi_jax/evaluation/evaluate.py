"""Evaluation of a distilled model on held-out data: few-step samples vs bicubic, metrics, grids."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from codi_jax import sampling
from codi_jax.evaluation import grids, metrics


METHOD_LABELS = {"codi": "CoDi", "finetune": "finetuned", "gd": "GD"}


def result_key(method: str, sampler: str, num_steps: int) -> str:
    """metrics.json row name: 'codi_4step' (the default DDIM/PF-ODE sampler), 'finetune_dpmpp_2m_4step'."""
    return f"{method}_{num_steps}step" if sampler == "deterministic" else f"{method}_{sampler}_{num_steps}step"


def column_label(method: str, sampler: str, num_steps: int) -> str:
    name = METHOD_LABELS.get(method, method)
    return f"{name} {num_steps}" if sampler == "deterministic" else f"{name} {sampling.SAMPLER_LABELS[sampler]} {num_steps}"


def check_metric_weights(ecfg) -> None:
    """Load the FID / LPIPS weights named in the eval config now, so a wrong path fails at the start
    of a run, not after its training."""
    if ecfg.get("fid_weights"):
        from codi_jax.evaluation import inception
        inception.feature_fn(ecfg.fid_weights)
    if ecfg.get("lpips_weights"):
        from codi_jax.evaluation import lpips
        lpips.distance_fn(ecfg.lpips_weights)


def all_metrics(samples, ref, ecfg, batch_size: int = 16) -> dict:
    """`metrics.evaluate_batch` (PSNR, SSIM, SWD, HF ratio) plus FID and LPIPS where the eval config
    names their weights (`eval.fid_weights`, `eval.lpips_weights`). FID over a few dozen images is
    biased high (covariances of rank < 2048): compare it between methods on the same crops only."""
    out = metrics.evaluate_batch(samples, ref)
    chunks = lambda x: [x[i:i + batch_size] for i in range(0, x.shape[0], batch_size)]
    if ecfg.get("fid_weights"):
        from codi_jax.evaluation import frechet, inception
        feats = inception.feature_fn(ecfg.fid_weights)
        f = lambda x: np.concatenate([np.asarray(feats(c)) for c in chunks(np.asarray(x))])
        out["fid"] = frechet.frechet_distance_of_features(f(samples), f(ref))
    if ecfg.get("lpips_weights"):
        from codi_jax.evaluation import lpips
        dist = lpips.distance_fn(ecfg.lpips_weights)
        pairs = zip(chunks(np.asarray(samples)), chunks(np.asarray(ref)))
        out["lpips"] = float(np.mean(np.concatenate([np.asarray(dist(a, b)) for a, b in pairs])))
    return out


def sample_batches(fn, params, cond, *, rng, n, batch_size, one_shape, context=None, to_pixels=None, limit=None):
    """Samples for examples [0, limit) in batches; batch i's noise from fold_in(rng, i), so a result
    does not depend on which job (or shard) computes it."""
    outs = []
    for i in range(0, n if limit is None else limit, batch_size):
        sl = slice(i, min(i + batch_size, n))
        m = sl.stop - sl.start
        ctx = None if context is None else np.broadcast_to(context, (m,) + context.shape[1:])
        x = fn(params, jax.random.fold_in(rng, i), (m,) + one_shape, cond[sl] if cond is not None else None, ctx)
        outs.append(np.asarray(to_pixels(x) if to_pixels is not None else x))
    return np.concatenate(outs)


def evaluate_sr(*, denoiser, params, eval_batch: dict, ecfg, out_dir: str, teacher=None, teacher_params=None,
                extra: dict | None = None, sample_shape=None, context=None, to_pixels=None,
                method: str = "codi") -> dict:
    """Sample the held-out batch with every sampler in `ecfg.samplers` at every step count in
    `ecfg.steps`; compare with bicubic. Rows are named by `result_key(method, sampler, steps)`.

    Latent models: `sample_shape` is one latent's (H, W, C), `context` the [1, L, D] prompt
    embedding, `to_pixels` the VAE decoder (latents -> images). Pixel models: all None.
    Writes OUT_DIR/grids/sr_grid.png (LR | bicubic | CoDi N... | HR) and returns the report;
    the caller writes it (with its own timings) as metrics.json.
    """
    hr, cond, lr = eval_batch["image"], eval_batch["cond"], eval_batch["lr"]
    n = hr.shape[0]
    bs = min(ecfg.batch_size, n)
    results = {"bicubic": all_metrics(cond, hr, ecfg)}
    columns = [("LR", lr), ("bicubic", cond)]
    timings = {}
    rng = jax.random.PRNGKey(ecfg.seed)

    one_shape = tuple(sample_shape) if sample_shape is not None else hr.shape[1:]

    def run(fn, p, c, limit=n):
        return sample_batches(fn, p, c, rng=rng, n=n, batch_size=bs, one_shape=one_shape, context=context,
                              to_pixels=to_pixels, limit=limit)

    for sampler in ecfg.samplers:
        for num_steps in ecfg.steps:
            key = result_key(method, sampler, num_steps)
            fn = sampling.make_sampler(denoiser, num_steps, sampler)
            t0 = time.perf_counter()
            run(fn, params, cond, limit=bs)  # compile + warm up on one batch
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            samples = run(fn, params, cond)
            timings[key] = {"compile_and_first_batch_s": round(compile_s, 3),
                            "sample_s_per_image": round((time.perf_counter() - t0) / n, 5)}
            results[key] = all_metrics(samples, hr, ecfg)
            columns.append((column_label(method, sampler, num_steps), samples))
            logging.info("eval: %s: %s", key, results[key])

    if teacher is not None and ecfg.teacher_ddim_steps:
        fn = sampling.make_sampler(teacher, ecfg.teacher_ddim_steps, "deterministic")
        samples = run(fn, teacher_params, None)
        columns.append((f"teacher {ecfg.teacher_ddim_steps} (uncond)", samples))

    columns.append(("HR", hr))
    k = min(ecfg.grid_examples, n)
    grid_path = grids.save_grid(os.path.join(out_dir, "grids", "sr_grid.png"), [(name, x[:k]) for name, x in columns])
    report = {"num_examples": int(n), "method": method, "samplers": list(ecfg.samplers), "metrics": results, "timings": timings,
              "grid": str(grid_path)}
    if extra:
        report.update(extra)
    return report
