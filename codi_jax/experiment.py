"""The whole job: (pretrain the teacher) -> CoDi distillation -> evaluation.

Each stage lives in its own WORKDIR subfolder with its own checkpoints, so running the
same command again resumes where it stopped and skips finished stages.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import logging

from codi_jax import diffusion, sampling, sharding, train
from codi_jax.data import pipeline
from codi_jax.evaluation import evaluate
from codi_jax.methods import base, codi, pretrain
from codi_jax.models import adapter as adapter_lib

TASKS = ("sr",)


def validate_config(config):
    """One-line errors for values that would otherwise fail deep inside a run."""
    if config.task not in TASKS:
        raise ValueError(f"config task={config.task!r} is not one of {TASKS}")
    if config.model.prediction not in diffusion.PREDICTIONS:
        raise ValueError(f"config model.prediction={config.model.prediction!r} is not one of {diffusion.PREDICTIONS}")
    base.compute_dtype(config.model.dtype)
    if config.model.adapter.fusion not in adapter_lib.FUSIONS:
        raise ValueError(f"config model.adapter.fusion={config.model.adapter.fusion!r} is not one of {adapter_lib.FUSIONS}")
    c = config.codi
    if c.mode not in codi.MODES:
        raise ValueError(f"config codi.mode={c.mode!r} is not one of {codi.MODES}")
    if c.zs_predictor not in codi.ZS_PREDICTORS:
        raise ValueError(f"config codi.zs_predictor={c.zs_predictor!r} is not one of {codi.ZS_PREDICTORS}")
    for key in ("d_eps", "d_x"):
        if c[key] not in ("l2", "pseudo_huber"):
            raise ValueError(f"config codi.{key}={c[key]!r} is not one of ('l2', 'pseudo_huber')")
    schedule = diffusion.make_schedule(config.schedule)
    if not 1 <= c.delta_t < schedule.t_max:
        raise ValueError(f"config codi.delta_t={c.delta_t} must be in [1, {schedule.t_max - 1}]")
    if config.eval.sampler not in sampling.SAMPLERS:
        raise ValueError(f"config eval.sampler={config.eval.sampler!r} is not one of {sampling.SAMPLERS}")
    for n in config.eval.steps:
        if not 1 <= n <= 1000:
            raise ValueError(f"config eval.steps has {n}; step counts must be in [1, 1000]")
    for stage in ("pretrain", "codi"):
        tcfg = config.pretrain if stage == "pretrain" else config.codi.train
        for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if tcfg[key] < 1:
                raise ValueError(f"config {stage}{'.train' if stage == 'codi' else ''}.{key}={tcfg[key]} must be >= 1")
    if config.teacher.pretrained_path:
        raise NotImplementedError(
            "config teacher.pretrained_path: loading diffusers-format Stable Diffusion weights is not built yet "
            "(issue 3); use --config=configs/sr.py:tiny, which pretrains its own teacher")
    if config.model.unet.in_channels != 3 and config.variant != "":
        raise ValueError("config model.unet.in_channels must be 3 for pixel-space variants")


def check_workdir(workdir: str):
    """Fail at once, in one line, if WORKDIR cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as e:
        raise PermissionError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def _teacher_params_init(module, config):
    image_size = config.data.crop_size

    def init_fn(rng):
        params = base.init_model_params(module, config.model, rng, image_size)
        return {"unet": params["unet"]}, {}

    return init_fn


def _preview_fns(config, plain, wrapped, eval_batch):
    """TensorBoard pictures: teacher DDIM samples, and bicubic | CoDi N-step | HR on held-out crops."""
    k = min(4, eval_batch["image"].shape[0])
    cond, hr = eval_batch["cond"][:k], eval_batch["image"][:k]
    rng = jax.random.PRNGKey(config.eval.seed)
    ddim_steps = config.eval.teacher_ddim_steps or 16
    teacher_sampler = sampling.make_sampler(plain, ddim_steps, "deterministic")
    n_steps = max(config.eval.steps)
    codi_sampler = sampling.make_sampler(wrapped, n_steps, config.eval.sampler)

    def teacher_images(state):
        x = teacher_sampler(state["ema_params"], rng, hr.shape)
        return {f"samples/teacher_ddim{ddim_steps}_uncond": np.asarray(x)}

    def codi_images(state):
        x = codi_sampler(base.merge(state["ema_params"], state["frozen"]), rng, hr.shape, cond)
        row = np.concatenate([cond, np.asarray(x), hr], axis=2)  # side by side, one row per example
        return {f"samples/bicubic_codi{n_steps}_hr": row}

    return teacher_images, codi_images


def run(config, workdir: str) -> dict:
    """Run the job described by `config` in `workdir`; returns the evaluation report."""
    if config.variant == "" and not config.teacher.pretrained_path:
        raise ValueError("configs/sr.py (paper scale) needs a pretrained model: set "
                         "--config.teacher.pretrained_path=/path/to/stable-diffusion (diffusers format), "
                         "or run the offline default --config=configs/sr.py:tiny")
    validate_config(config)
    check_workdir(workdir)
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh)
    schedule = diffusion.make_schedule(config.schedule)
    module = base.make_module(config.model)
    plain = base.Denoiser(module, schedule, config.model.prediction)
    b = config.codi.boundary
    wrapped = base.Denoiser(module, schedule, config.model.prediction,
                            (b.sigma_data, b.time_scale) if b.enabled else None)
    timings = {}
    eval_batch = pipeline.make_eval_batch(config.data, task=config.task, num_examples=config.eval.num_examples,
                                          seed=config.eval.seed)
    teacher_images, codi_images = _preview_fns(config, plain, wrapped, eval_batch)

    # Stage 1: the unconditional teacher (pretrained here when none is given).
    teacher_init = _teacher_params_init(module, config)
    t0 = time.perf_counter()
    if config.teacher.checkpoint:
        tstate = train.load_final_state(name="teacher", workdir=config.teacher.checkpoint, tcfg=config.pretrain,
                                        init_fn=teacher_init, seed=config.seed, mesh=mesh)
    else:
        tstate = train.run_stage(
            name="teacher", workdir=workdir, tcfg=config.pretrain,
            loss_fn=functools.partial(pretrain.diffusion_loss, denoiser=plain, use_cond=False),
            init_fn=teacher_init, data_cfg=config.data, task="uncond", seed=config.seed, mesh=mesh,
            image_fn=teacher_images)
    teacher_unet = tstate["ema_params"]["unet"]
    timings["teacher_s"] = round(time.perf_counter() - t0, 1)
    del tstate

    # Stage 2: CoDi. Adapter duplicated from the teacher's encoder; mu = 0 (eq 12).
    c = config.codi

    def codi_init(rng):
        params = base.init_model_params(module, config.model, rng, config.data.crop_size)
        params = {"unet": teacher_unet, "adapter": adapter_lib.init_adapter_from_backbone(params["adapter"], teacher_unet)}
        return codi.split_params(params, c.mode, c.zs_predictor)

    t0 = time.perf_counter()
    cstate = train.run_stage(
        name="codi", workdir=workdir, tcfg=c.train,
        loss_fn=functools.partial(codi.codi_loss, denoiser=wrapped, teacher=plain, cfg=c),
        init_fn=codi_init, data_cfg=config.data, task=config.task, seed=config.seed + 1, mesh=mesh,
        image_fn=codi_images)
    timings["codi_s"] = round(time.perf_counter() - t0, 1)

    # Stage 3: evaluation on held-out images (EMA weights, as consistency models do).
    t0 = time.perf_counter()
    params = base.merge(cstate["ema_params"], cstate["frozen"])
    report = None
    if jax.process_index() == 0:
        report = evaluate.evaluate_sr(denoiser=wrapped, params=params, eval_batch=eval_batch, ecfg=config.eval,
                                      out_dir=workdir, teacher=plain, teacher_params={"unet": teacher_unet},
                                      extra={"variant": config.variant, "timings_s": timings})
        timings["eval_s"] = round(time.perf_counter() - t0, 1)
        timings["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        _print_summary(report, workdir)
    return report


def _print_summary(report, workdir):
    m = report["metrics"]
    lines = [f"{'':12s} {'PSNR':>7s} {'SSIM':>6s} {'SWD':>7s} {'HF':>5s}"]
    for name, v in m.items():
        lines.append(f"{name:12s} {v['psnr']:7.2f} {v['ssim']:6.3f} {v['swd_mean']:7.4f} {v['hf_ratio']:5.2f}")
    print("\n".join(lines))
    print(f"metrics: {os.path.join(workdir, 'metrics.json')}")
    print(f"grid:    {report['grid']}")
    print(f"tensorboard --logdir {workdir}")
