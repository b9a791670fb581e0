"""Evaluation of a distilled model on held-out data: few-step samples vs the task's baseline, metrics, grids."""

from __future__ import annotations

import functools
import itertools
import time

import jax
import numpy as np
from absl import logging

from codi_jax import sampling, storage
from codi_jax.evaluation import grids, metrics

METHOD_LABELS = {"codi": "CoDi", "finetune": "finetuned", "gd": "GD"}


def result_key(method: str, sampler: str, num_steps: int) -> str:
    """metrics.json row name: 'codi_4step' (the default DDIM/PF-ODE sampler), 'finetune_dpmpp_2m_4step'."""
    return f"{method}_{num_steps}step" if sampler == "deterministic" else f"{method}_{sampler}_{num_steps}step"


def column_label(method: str, sampler: str, num_steps: int) -> str:
    name = METHOD_LABELS.get(method, method)
    return (
        f"{name} {num_steps}"
        if sampler == "deterministic"
        else f"{name} {sampling.SAMPLER_LABELS[sampler]} {num_steps}"
    )


def check_metric_weights(ecfg) -> None:
    """Load the FID / LPIPS weights named in the eval config now, so a wrong path fails at the start
    of a run, not after its training."""
    if ecfg.fid_weights:
        from codi_jax.evaluation import inception

        inception.feature_fn(ecfg.fid_weights)
    if ecfg.lpips_weights:
        from codi_jax.evaluation import lpips

        lpips.distance_fn(ecfg.lpips_weights)
    if ecfg.clip_model:
        clip_scorer(ecfg.clip_model)


@functools.lru_cache(maxsize=2)
def clip_scorer(folder: str):
    from codi_jax.evaluation import clip_score

    return clip_score.CLIPScorer(folder)


def prompt_metrics(samples, batch, ecfg, data_cfg, task: str) -> dict:
    """CLIP score (Table 2's text-image agreement) of samples against their prompts, where the eval
    config names a CLIP model (`eval.clip_model`) and the task has prompts."""
    from codi_jax.data import tasks as task_data

    if not ecfg.clip_model or task not in task_data.PROMPT_TASKS or data_cfg is None:
        return {}
    words = task_data.prompts(data_cfg, task)
    texts = [words[int(k)] for k in np.asarray(batch["prompt"])]
    scorer = clip_scorer(ecfg.clip_model)
    x = np.asarray(samples)
    bs = ecfg.batch_size
    scores = [scorer.score(x[i : i + bs], texts[i : i + bs]) for i in range(0, len(texts), bs)]
    return {"clip_score": float(np.mean(np.concatenate(scores)))}


def all_metrics(samples, ref, ecfg) -> dict:
    """`metrics.evaluate_batch` (PSNR, SSIM, SWD, HF ratio) plus FID and LPIPS where the eval config
    names their weights (`eval.fid_weights`, `eval.lpips_weights`). FID over a few dozen images is
    biased high (covariances of rank < 2048): compare it between methods on the same crops only."""
    out = metrics.evaluate_batch(samples, ref)
    bs = ecfg.batch_size  # the metric networks see the evaluation's batches
    chunks = lambda x: [x[i : i + bs] for i in range(0, x.shape[0], bs)]
    if ecfg.fid_weights:
        from codi_jax.evaluation import frechet, inception

        feats = inception.feature_fn(ecfg.fid_weights)
        f = lambda x: np.concatenate([np.asarray(feats(c)) for c in chunks(np.asarray(x))])
        out["fid"] = frechet.frechet_distance_of_features(f(samples), f(ref))
    if ecfg.lpips_weights:
        from codi_jax.evaluation import lpips

        dist = lpips.distance_fn(ecfg.lpips_weights)
        pairs = zip(chunks(np.asarray(samples)), chunks(np.asarray(ref)))
        out["lpips"] = float(np.mean(np.concatenate([np.asarray(dist(a, b)) for a, b in pairs])))
    return out


def _rows(x, sl, m):
    """Examples `sl` of a per-example array ([n, ...]), or a shared one ([1, ...]) broadcast to m."""
    x = np.asarray(x)
    return x[sl] if x.shape[0] != 1 else np.broadcast_to(x, (m,) + x.shape[1:])


def sample_batches(fn, params, cond, *, rng, n, batch_size, one_shape, context=None, to_pixels=None, limit=None):
    """Samples for examples [0, limit) in batches; batch i's noise from fold_in(rng, i), so a result
    does not depend on which job (or shard) computes it. `context`: an array (or a dict of arrays,
    classifier-free guidance) per example [n, L, D] or shared [1, L, D]."""
    outs = []
    for i in range(0, n if limit is None else limit, batch_size):
        sl = slice(i, min(i + batch_size, n))
        m = sl.stop - sl.start
        ctx = None if context is None else jax.tree_util.tree_map(lambda c, sl=sl, m=m: _rows(c, sl, m), context)
        x = fn(params, jax.random.fold_in(rng, i), (m,) + one_shape, cond[sl] if cond is not None else None, ctx)
        outs.append(np.asarray(to_pixels(x) if to_pixels is not None else x))
    return np.concatenate(outs)


def as_rgb(x):
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def task_views(task: str, batch: dict) -> tuple[dict, list, str]:
    """(baseline rows {name: images}, input columns [(label, images)], reference label) of a task.

    sr: bicubic upsampling; inpaint: the input with its hole left at 0 (gray); edit: the unedited
    input (the 'do nothing' edit); depth: no baseline (the condition is not an image)."""
    cond = batch["cond"]
    if task == "sr":
        return {"bicubic": cond}, [("LR", batch["lr"]), ("bicubic", cond)], "HR"
    if task == "inpaint":
        return {"input": cond[..., :3]}, [("masked", cond[..., :3])], "target"
    if task == "edit":
        return {"input": cond}, [("input", cond)], "target"
    if task == "depth":
        return {}, [("depth", as_rgb(cond))], "target"
    raise ValueError(f"no evaluation for task {task!r}")


def hole_psnr(samples, ref, mask) -> dict:
    """PSNR (on [0, 1] images) inside the hole and outside it, per image, then the mean."""
    err = np.square((np.asarray(samples) - np.asarray(ref)) / 2.0)  # [-1, 1] -> [0, 1] units

    def psnr(w):
        mse = np.sum(err * w, axis=(1, 2, 3)) / np.maximum(np.sum(w, axis=(1, 2, 3)) * err.shape[-1], 1.0)
        return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))

    m = np.asarray(mask, np.float32)
    return {"psnr_hole": psnr(m), "psnr_known": psnr(1.0 - m)}


def caption_colour_accuracy(samples, batch, dcfg) -> dict:
    """Depth scenes: does the sample show the caption's colours? For each example, the mean colour of
    the object's pixels (and of the wall's) is matched to the nearest palette colour; the score is
    the fraction of examples where that is the caption's colour. Texture and shading change
    brightness, so colours are compared as chromaticity (rgb / sum)."""
    from codi_jax.data import tasks as task_data

    captions = task_data.depth_captions(dcfg)
    names = list(dcfg.palette.keys())
    pal = np.asarray([dcfg.palette[k] for k in names], np.float32)
    chroma = lambda c: c / np.maximum(np.sum(c, -1, keepdims=True), 1e-6)
    x = (np.asarray(samples, np.float32) + 1.0) / 2.0
    hits = {"object": [], "wall": []}
    for i, k in enumerate(np.asarray(batch["prompt"])):
        obj_colour, _, wall_colour = captions[int(k)]
        for part, w, want in (
            ("object", batch["object_mask"][i], obj_colour),
            ("wall", 1.0 - batch["object_mask"][i], wall_colour),
        ):
            mean = np.sum(x[i] * w, axis=(0, 1)) / max(float(np.sum(w)), 1.0)
            nearest = names[int(np.argmin(np.sum(np.square(chroma(pal) - chroma(mean)), -1)))]
            hits[part].append(nearest == want)
    return {f"colour_acc_{part}": float(np.mean(v)) for part, v in hits.items()}


def task_metrics(task: str, samples, batch: dict, data_cfg) -> dict:
    if task == "inpaint":
        return hole_psnr(samples, batch["image"], batch["mask"])
    if task == "depth" and data_cfg is not None and "object_mask" in batch:
        return caption_colour_accuracy(samples, batch, data_cfg.depth)
    return {}


def validate(ecfg, prefix: str) -> None:
    """One line naming the first bad sampler or step count of an evaluation config (`prefix`: 'eval.' in
    a run's config, '' in the evaluation job's)."""
    if not ecfg.samplers or not ecfg.steps:
        raise ValueError(
            f"config {prefix}samplers and {prefix}steps must each name at least one of {sampling.SAMPLERS}"
        )
    for name in ecfg.samplers:
        sampling.check_sampler(name, f"{prefix}samplers")
    for n in ecfg.steps:
        if not 1 <= n <= 1000:
            raise ValueError(f"config {prefix}steps has {n}; step counts must be in [1, 1000]")


def image_metrics(images, batch: dict, ecfg, task: str, data_cfg) -> dict:
    """Every metric of one set of images (a method's samples or a baseline) against the batch's
    references: `all_metrics`, the task's own (`task_metrics`) and the prompts' (`prompt_metrics`)."""
    out = all_metrics(images, batch["image"], ecfg)
    out.update(task_metrics(task, images, batch, data_cfg))
    out.update(prompt_metrics(images, batch, ecfg, data_cfg, task))
    return out


def evaluate_entry(denoiser, sampler: str, num_steps: int, draw, batch: dict, ecfg, task: str, data_cfg, warm_up=0):
    """(samples, metrics, timings) of one (sampler, steps) entry of an evaluation. `draw(fn, limit=None)`
    samples the held-out batch with a sampler function (`sample_batches` with the batch's arguments
    bound); `warm_up` > 0 first draws that many examples to time the compile apart from sampling."""
    fn = sampling.make_sampler(denoiser, num_steps, sampler)
    timings = {}
    if warm_up:
        t0 = time.perf_counter()
        draw(fn, limit=warm_up)  # compile + warm up on one batch
        timings["compile_and_first_batch_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    samples = draw(fn)
    seconds = time.perf_counter() - t0
    timings.update(sample_s=round(seconds, 2), sample_s_per_image=round(seconds / samples.shape[0], 5))
    return samples, image_metrics(samples, batch, ecfg, task, data_cfg), timings


def evaluate_task(
    *,
    denoiser,
    params,
    eval_batch: dict,
    ecfg,
    out_dir: str,
    task: str = "sr",
    data_cfg=None,
    teacher=None,
    teacher_params=None,
    extra: dict | None = None,
    sample_shape=None,
    context=None,
    teacher_context=None,
    to_pixels=None,
    method: str = "codi",
) -> dict:
    """Sample the held-out batch with every sampler in `ecfg.samplers` at every step count in
    `ecfg.steps`; compare with the task's baseline (`task_views`). Rows are named by
    `result_key(method, sampler, steps)`; each has `metrics.evaluate_batch`'s metrics (+ FID/LPIPS
    where configured) and the task's own (`task_metrics`: inpainting inside/outside the hole, the
    depth captions' colours).

    Latent models: `sample_shape` is one latent's (H, W, C), `to_pixels` the VAE decoder. `context`:
    the method's cross-attention context (see `sample_batches`; a {'prompt', 'negative'} dict under
    classifier-free guidance), `teacher_context` the teacher's. Writes OUT_DIR/grids/<task>_grid.png
    (inputs | baseline | method N... | reference) and returns the report; the caller writes it
    (with its own timings) as metrics.json.
    """
    hr, cond = eval_batch["image"], eval_batch["cond"]
    n = hr.shape[0]
    bs = min(ecfg.batch_size, n)
    baselines, columns, ref_label = task_views(task, eval_batch)
    results = {name: image_metrics(images, eval_batch, ecfg, task, data_cfg) for name, images in baselines.items()}
    columns = list(columns)
    timings = {}
    one_shape = tuple(sample_shape) if sample_shape is not None else hr.shape[1:]
    shared = dict(rng=jax.random.PRNGKey(ecfg.seed), n=n, batch_size=bs, one_shape=one_shape, to_pixels=to_pixels)
    draw = functools.partial(sample_batches, params=params, cond=cond, context=context, **shared)
    for sampler, num_steps in itertools.product(ecfg.samplers, ecfg.steps):
        key = result_key(method, sampler, num_steps)
        samples, results[key], timings[key] = evaluate_entry(
            denoiser, sampler, num_steps, draw, eval_batch, ecfg, task, data_cfg, warm_up=bs
        )
        columns.append((column_label(method, sampler, num_steps), samples))
        logging.info("eval: %s: %s", key, results[key])

    if teacher is not None and ecfg.teacher_ddim_steps:
        fn = sampling.make_sampler(teacher, ecfg.teacher_ddim_steps, "deterministic")
        samples = sample_batches(fn, params=teacher_params, cond=None, context=teacher_context, **shared)
        columns.append((f"teacher {ecfg.teacher_ddim_steps} (uncond)", samples))

    columns.append((ref_label, hr))
    k = min(ecfg.grid_examples, n)
    grid_path = grids.save_grid(
        storage.join(out_dir, "grids", f"{task}_grid.png"), [(name, as_rgb(x[:k])) for name, x in columns]
    )
    report = {
        "task": task,
        "num_examples": int(n),
        "method": method,
        "samplers": list(ecfg.samplers),
        "metrics": results,
        "timings": timings,
        "grid": str(grid_path),
    }
    if extra:
        report.update(extra)
    return report
