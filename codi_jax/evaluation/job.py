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

import itertools
import json
import os
import time

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from codi_jax import experiment, sampling, train
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate, grids, plots
from codi_jax.methods import base
from codi_jax.models import layers


def read_run_config(run_dir: str) -> mlc.ConfigDict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config checkpoint={run_dir!r}: no config.json there (not a finished codi_jax run's workdir?)"
        )
    with open(path) as f:
        return mlc.ConfigDict(json.load(f))


def validate(ecfg) -> None:
    if not ecfg.checkpoint:
        raise ValueError("config checkpoint is empty: give the workdir of a finished run")
    if not 0 <= ecfg.shard < ecfg.num_shards:
        raise ValueError(f"config shard={ecfg.shard} must be in [0, num_shards={ecfg.num_shards})")
    if not ecfg.samplers or not ecfg.steps:
        raise ValueError("config samplers and steps must each name at least one")
    for name in ecfg.samplers:
        sampling.check_sampler(name, "samplers")
    for n in ecfg.steps:
        if not 1 <= n <= 1000:
            raise ValueError(f"config steps has {n}; step counts must be in [1, 1000]")


def restore_final(run_cfg, run_dir: str, expect_method: str = "", model=None):
    """EMA params merged with the frozen ones, from the final stage's latest checkpoint; checked
    parameter by parameter against `model` (experiment.build_model's) when given."""
    if expect_method and expect_method != run_cfg.method:
        raise ValueError(f"config method={expect_method!r}, but {run_dir} was trained with method {run_cfg.method!r}")
    where, stage = experiment.final_stage(run_cfg)
    ckpt_dir = os.path.join(where or run_dir, stage, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{run_dir}: no {stage}/checkpoints (method {run_cfg.method!r}); did the run finish?")
    mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
    step = mgr.latest_step()
    want = experiment.final_stage_steps(run_cfg)
    if step is None or step < want:
        mgr.close()
        raise FileNotFoundError(f"{ckpt_dir}: latest step {step}, the run's {stage} stage has {want}: not finished")
    mgr.close()
    state = restore_subtrees(ckpt_dir, step, ("ema_params", "frozen"))
    params = base.merge(state["ema_params"], state["frozen"])
    if model is not None:
        check_params_match(params, model, f"{ckpt_dir}/{step}")
    return params, state["frozen"], step


def check_params_match(params, model, where: str) -> None:
    """One line naming the first parameter the checkpoint lacks, adds, or holds in another shape than
    the run's config.json builds (a finetune checkpoint of another model size, an edited config)."""
    cfg = model.config
    wanted = layers.unbox(base.abstract_params(model.module, cfg.model, model.space.shape[0], cfg.data.crop_size))
    train.check_shapes(train.shapes_by_path({"params": params}), train.shapes_by_path({"params": wanted}), where)


def restore_subtrees(ckpt_dir: str, step: int, keys) -> dict:
    """Only `keys` of a train state checkpoint (a partial restore with the stored structure: no model
    init needed), on the default device. Evaluation reads the EMA weights and the frozen ones; the
    online weights and the optimizer's moments (three times the EMA weights under Adam) stay on disk."""
    path = os.path.join(ckpt_dir, str(step), "state")
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))  # the tree's metadata (not the step's)
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"{ckpt_dir}: step {step}'s train state has no {missing} (not a codi_jax train state?)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")
    item = {
        k: jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta[k], is_leaf=is_leaf
        )
        for k in keys
    }
    restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    return ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )


def _key_path(out_dir, key, ext):
    return os.path.join(out_dir, "entries", f"{key}.{ext}")


def run(ecfg, workdir: str) -> dict | None:
    """Evaluate this shard's entries; write the summary when all entries are there. Returns it (or None)."""
    validate(ecfg)
    evaluate.check_metric_weights(ecfg)
    run_cfg = read_run_config(ecfg.checkpoint)
    if ecfg.get("guidance_scale", -1.0) >= 0:  # classifier-free guidance weight of this evaluation
        if run_cfg.task not in task_data.PROMPT_TASKS:
            raise ValueError(
                f"config guidance_scale={ecfg.guidance_scale}: run {ecfg.checkpoint} (task "
                f"{run_cfg.task!r}) has no prompts to guide with"
            )
        run_cfg.text.guidance_scale = float(ecfg.guidance_scale)
    experiment.check_workdir(workdir)
    out_dir = os.path.join(workdir, "eval")
    model = experiment.build_model(run_cfg, workdir)
    run_cfg = model.config
    params, frozen, step = restore_final(run_cfg, ecfg.checkpoint, ecfg.method, model=model)
    seed = run_cfg.eval.seed if ecfg.seed < 0 else ecfg.seed
    n = ecfg.num_examples or run_cfg.eval.num_examples
    batch = pipeline.make_eval_batch(
        run_cfg.data, task=run_cfg.task, num_examples=n, seed=seed, split=ecfg.split, min_images=ecfg.min_images
    )
    hr, cond = batch["image"], batch["cond"]
    kw = model.space.eval_kwargs(frozen, batch)
    one_shape = tuple(kw.get("sample_shape") or hr.shape[1:])
    denoiser = model.space.guided(model.method_denoiser)
    method = run_cfg.method
    entries = list(itertools.product(ecfg.samplers, ecfg.steps))
    mine = entries[ecfg.shard :: ecfg.num_shards]
    os.makedirs(os.path.join(out_dir, "entries"), exist_ok=True)
    logging.info(
        "eval job: %s (method %s, %s step %d), %d crops of split %r; entries %d of %d (shard %d/%d)",
        ecfg.checkpoint,
        method,
        experiment.final_stage(run_cfg)[1],
        step,
        n,
        ecfg.split,
        len(mine),
        len(entries),
        ecfg.shard,
        ecfg.num_shards,
    )
    k = min(ecfg.grid_examples, n)
    t_job = time.perf_counter()
    for i, (sampler, num_steps) in enumerate(mine):
        key = evaluate.result_key(method, sampler, num_steps)
        if os.path.exists(_key_path(out_dir, key, "json")):
            logging.info("eval job: %s done already; skipped", key)
            continue
        t0 = time.perf_counter()
        fn = sampling.make_sampler(denoiser, num_steps, sampler)
        samples = evaluate.sample_batches(
            fn,
            params,
            cond,
            rng=jax.random.PRNGKey(seed),
            n=n,
            batch_size=min(ecfg.batch_size, n),
            one_shape=one_shape,
            context=kw.get("context"),
            to_pixels=kw.get("to_pixels"),
        )
        result = dict(
            evaluate.all_metrics(samples, hr, ecfg),
            sampler=sampler,
            steps=num_steps,
            wall_s=round(time.perf_counter() - t0, 2),
        )
        result.update(evaluate.task_metrics(run_cfg.task, samples, batch, run_cfg.data))
        result.update(evaluate.prompt_metrics(samples, batch, ecfg, run_cfg.data, run_cfg.task))
        np.savez_compressed(_key_path(out_dir, key, "npz"), samples=grids.to_uint8(samples[:k]))
        tmp = _key_path(out_dir, key, "json.tmp")
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, _key_path(out_dir, key, "json"))  # an entry exists only once it is complete
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
    missing = [key for key, _, _ in keys if not os.path.exists(_key_path(out_dir, key, "json"))]
    if missing:
        logging.info("eval job: %d entries still missing (other shards?): %s", len(missing), missing)
        return None
    baselines, inputs, ref_label = evaluate.task_views(run_cfg.task, batch)
    results = {
        name: dict(
            evaluate.all_metrics(x, batch["image"], ecfg), **evaluate.task_metrics(run_cfg.task, x, batch, run_cfg.data)
        )
        for name, x in baselines.items()
    }
    columns = [(label, x[:k]) for label, x in inputs]
    series = {}
    for key, sampler, n in keys:
        with open(_key_path(out_dir, key, "json")) as f:
            results[key] = json.load(f)
        with np.load(_key_path(out_dir, key, "npz")) as z:
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
        "grid": str(grids.save_grid(os.path.join(out_dir, "grid.png"), columns)),
        "plot": plots.metrics_vs_steps(
            series,
            os.path.join(out_dir, "metrics_vs_steps.png"),
            title=f"{os.path.basename(os.path.normpath(run_dir))} ({method})",
        ),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"eval: {os.path.join(out_dir, 'metrics.json')}\neval: {report['grid']}\neval: {report['plot']}")
    return report
