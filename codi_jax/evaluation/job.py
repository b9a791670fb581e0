"""The batch evaluation job (`--config=configs/eval.py`): re-evaluate a finished run.

A run's WORKDIR holds config.json (written at the run's start) and its stages' checkpoints. The job
restores the EMA weights of the method's final stage, samples a split's crops with every requested
(sampler, steps) entry, and writes, in the job's --workdir:

  eval/entries/<key>.json   metrics of one entry (skipped when present: the job resumes)
  eval/entries/<key>.npz    its first grid rows (uint8), for the grid
  eval/metrics.json         all entries + bicubic, once every entry exists
  eval/grid.png             LR | bicubic | entries... | HR
  eval/metrics_vs_steps.png PSNR and SWD against steps, one line per sampler

Entries are split over jobs by `shard` / `num_shards`; whichever job finds every entry done
writes the summary.
"""

from __future__ import annotations

import functools
import io
import itertools
import time

import jax
import numpy as np
from absl import logging

from codi_jax import build, runs, sampling, storage
from codi_jax import workdir as workdir_lib
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate, grids, plots


def validate(ecfg) -> None:
    if not ecfg.checkpoint:
        raise ValueError("config checkpoint is empty: give the workdir of a finished run")
    if not 0 <= ecfg.shard < ecfg.num_shards:
        raise ValueError(f"config shard={ecfg.shard} must be in [0, num_shards={ecfg.num_shards})")
    evaluate.validate(ecfg, "")


def _key_path(out_dir, key, ext):
    return storage.join(out_dir, "entries", f"{key}.{ext}")


def run(ecfg, workdir: str) -> dict | None:
    """Evaluate this shard's entries; write the summary when all entries are there. Returns it (or None)."""
    validate(ecfg)
    evaluate.check_metric_weights(ecfg)
    run_cfg = runs.read_run_config(ecfg.checkpoint)
    if ecfg.guidance_scale >= 0:  # classifier-free guidance weight of this evaluation
        if run_cfg.task not in task_data.PROMPT_TASKS:
            raise ValueError(
                f"config guidance_scale={ecfg.guidance_scale}: run {ecfg.checkpoint} (task "
                f"{run_cfg.task!r}) has no prompts to guide with"
            )
        run_cfg.text.guidance_scale = float(ecfg.guidance_scale)
    workdir_lib.check_workdir(workdir)
    out_dir = storage.join(workdir, "eval")
    model = build.build_model(run_cfg, workdir)
    run_cfg = model.config
    params, frozen, step = runs.restore_final(run_cfg, ecfg.checkpoint, ecfg.method, model=model)
    seed = run_cfg.eval.seed if ecfg.seed < 0 else ecfg.seed
    n = ecfg.num_examples or run_cfg.eval.num_examples
    batch = pipeline.make_eval_batch(
        run_cfg.data,
        task=run_cfg.task,
        num_examples=n,
        seed=seed,
        split=ecfg.split,
        min_images=ecfg.min_images,
        prompt_fn=model.space.prompt_fn,
    )
    hr, cond = batch["image"], batch["cond"]
    kw = model.space.eval_kwargs(frozen, batch)
    one_shape = tuple(kw.get("sample_shape") or hr.shape[1:])
    denoiser = model.space.guided(model.method_denoiser)
    method = run_cfg.method
    entries = list(itertools.product(ecfg.samplers, ecfg.steps))
    mine = entries[ecfg.shard :: ecfg.num_shards]
    logging.info(
        "eval job: %s (method %s, %s step %d), %d crops of split %r; entries %d of %d (shard %d/%d)",
        ecfg.checkpoint,
        method,
        runs.final_stage(run_cfg)[1],
        step,
        n,
        ecfg.split,
        len(mine),
        len(entries),
        ecfg.shard,
        ecfg.num_shards,
    )
    k = min(ecfg.grid_examples, n)
    draw = functools.partial(
        evaluate.sample_batches,
        params=params,
        cond=cond,
        rng=jax.random.PRNGKey(seed),
        n=n,
        batch_size=min(ecfg.batch_size, n),
        one_shape=one_shape,
        context=kw.get("context"),
        to_pixels=kw.get("to_pixels"),
    )
    t_job = time.perf_counter()
    for i, (sampler, num_steps) in enumerate(mine):
        key = evaluate.result_key(method, sampler, num_steps)
        if storage.exists(_key_path(out_dir, key, "json")):
            logging.info("eval job: %s done already; skipped", key)
            continue
        t0 = time.perf_counter()
        samples, metrics, _ = evaluate.evaluate_entry(
            denoiser, sampler, num_steps, draw, batch, ecfg, run_cfg.task, run_cfg.data
        )
        result = dict(metrics, sampler=sampler, steps=num_steps, wall_s=round(time.perf_counter() - t0, 2))
        save = functools.partial(np.savez_compressed, samples=grids.to_uint8(samples[:k]))
        storage.save_with(_key_path(out_dir, key, "npz"), save)
        storage.write_json(_key_path(out_dir, key, "json"), result)  # an entry exists only once it is complete
        done = i + 1
        eta = (time.perf_counter() - t_job) / done * (len(mine) - done)
        logging.info(
            "eval job: [%d/%d] %s psnr %.2f swd %.4f (%.1f s; ETA %.0f s)",
            done,
            len(mine),
            key,
            result["psnr"],
            result["swd_mean"],
            result["wall_s"],
            eta,
        )
    return summarize(out_dir, method, entries, batch, k, ecfg, step, run_cfg)


def summarize(out_dir, method, entries, batch, k, ecfg, step, run_cfg):
    run_dir = ecfg.checkpoint
    keys = [(evaluate.result_key(method, s, n), s, n) for s, n in entries]
    missing = [key for key, _, _ in keys if not storage.exists(_key_path(out_dir, key, "json"))]
    if missing:
        logging.info("eval job: %d entries still missing (other shards?): %s", len(missing), missing)
        return None
    baselines, inputs, ref_label = evaluate.task_views(run_cfg.task, batch)
    results = {
        name: evaluate.image_metrics(x, batch, ecfg, run_cfg.task, run_cfg.data) for name, x in baselines.items()
    }
    columns = [(label, x[:k]) for label, x in inputs]
    series = {}
    for key, sampler, n in keys:
        results[key] = storage.read_json(_key_path(out_dir, key, "json"))
        with np.load(io.BytesIO(storage.read_bytes(_key_path(out_dir, key, "npz")))) as z:
            columns.append((evaluate.column_label(method, sampler, n), z["samples"]))
        series.setdefault(
            f"{evaluate.METHOD_LABELS.get(method, method)} {sampling.SAMPLER_LABELS[sampler]}", []
        ).append((n, results[key]))
    columns.append((ref_label, batch["image"][:k]))
    columns = [(label, evaluate.as_rgb(x)) for label, x in columns]
    report = {
        "checkpoint": run_dir,
        "step": int(step),
        "method": method,
        "num_examples": int(batch["image"].shape[0]),
        "metrics": results,
        "grid": str(grids.save_grid(storage.join(out_dir, "grid.png"), columns)),
        "plot": plots.metrics_vs_steps(
            series,
            storage.join(out_dir, "metrics_vs_steps.png"),
            title=f"{storage.basename(run_dir)} ({method})",
        ),
    }
    storage.write_json(storage.join(out_dir, "metrics.json"), report)
    print(f"eval: {storage.join(out_dir, 'metrics.json')}\neval: {report['grid']}\neval: {report['plot']}")
    return report
