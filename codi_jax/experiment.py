"""The training job: teacher -> (finetune) -> CoDi or GD rounds -> evaluation.

`run` is the plan; each stage is a function below it that takes and returns explicit values. Every
stage lives in its own WORKDIR subfolder with its own checkpoints, so running the same command again
resumes where it stopped and skips finished stages.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from codi_jax import build, diffusion, runs, sampling, sharding, storage, train
from codi_jax import workdir as workdir_lib
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate
from codi_jax.methods import base, codi, latent, pretrain, progressive, text

TASKS = ("sr", "inpaint", "depth", "edit")
METHODS = ("codi", "finetune", "gd")


def run(config, workdir: str, stop_after: str | None = None) -> dict | None:
    """Run the job described by `config` in `workdir`; returns the evaluation report.

    Stages, each in WORKDIR/<stage> (resumed, or skipped when complete):
      teacher   the pretrained model (loaded, or pretrained here for the tiny recipes)
      finetune  conditional finetuning with the diffusion loss (method 'finetune', and the start
                of the two-stage baselines: codi.init='finetuned' (CM-II), method 'gd' (GD-II))
      codi      CoDi / PE-CoDi / CM-II and the ablations (method 'codi')
      gd_Nsteps progressive distillation rounds (method 'gd')
    then evaluation of the method's final EMA weights. `stop_after='teacher'` returns after the
    teacher (the reproduction's shared teacher).
    """
    job = setup(config, workdir)
    teacher_unet = teacher_stage(job)
    if stop_after == "teacher":
        return None
    job.teacher_fingerprint = params_fingerprint(teacher_unet)  # before a stage's state takes the arrays over
    if not job.config.eval.teacher_ddim_steps:
        # Nothing reads the teacher after the stage that starts from it: a fresh stage's state takes over
        # its arrays (train.initial_state), a resumed one frees them (3.4 GB at SD size, held twice before).
        job.release_teacher = functools.partial(_delete_arrays, teacher_unet)
    method = job.config.method
    finetuned = finetune_stage(job, teacher_unet) if needs_finetune(job.config) else None
    if method == "codi":
        final = codi_stage(job, teacher_unet, finetuned)
    elif method == "gd":
        final = gd_stages(job, finetuned)
    else:
        final = finetuned
    kept = teacher_unet if job.config.eval.teacher_ddim_steps else None  # the copy eval's teacher samples read
    del teacher_unet
    return evaluation_stage(job, final, kept)


@dataclasses.dataclass
class Job:
    """What every stage reads: the run's config (with a pretrained folder's architecture filled in),
    its model, where params live on the mesh, the held-out batch and the preview functions. `timings`
    collects each stage's wall time for metrics.json."""

    config: object
    workdir: str
    model: build.Model
    place: dict  # mesh, rules, logical names: train.run_stage's placement arguments
    eval_batch: dict
    teacher_images: object  # state -> {tag: images} for TensorBoard, or None
    method_images: object
    timings: dict
    t_start: float
    teacher_fingerprint: str = ""  # metrics.json: which teacher a run started from
    release_teacher: Callable = lambda: None  # called once a stage's state exists (train.run_stage's on_state)


def setup(config, workdir: str) -> Job:
    """Check the config and WORKDIR, build the model, write config.json (what the run's readers read)."""
    validate_config(config)
    workdir_lib.check_workdir(workdir)
    evaluate.check_metric_weights(config.eval)
    t_start = time.perf_counter()
    model = build.build_model(config, workdir)
    config, space = model.config, model.space
    if jax.process_index() == 0:
        storage.write_text(storage.join(workdir, runs.CONFIG_FILE), config.to_json_best_effort(indent=2))
    eval_batch = pipeline.make_eval_batch(
        config.data,
        task=config.task,
        num_examples=config.eval.num_examples,
        seed=config.eval.seed,
        prompt_fn=space.prompt_fn,
    )
    teacher_images, method_images = None, None
    if jax.process_count() == 1 and config.eval.previews:  # previews read whole arrays on one process
        teacher_images, method_images = _preview_fns(
            config, model.denoisers.diffusion, model.method_denoiser, eval_batch, space
        )
    return Job(config, workdir, model, placement(model), eval_batch, teacher_images, method_images, {}, t_start)


def planning_job(config, pre, devices) -> Job:
    """The job's model and placement on `devices` (a TPU topology's abstract ones too) around a weightless
    teacher `pre` (codi_jax.pretrained.architectures): what the memory planner compiles. No workdir, no data."""
    validate_config(config)
    model = build.build_model(config, "", pre=pre)
    return Job(model.config, "", model, placement(model, devices), {}, None, None, {}, time.perf_counter())


def placement(model: build.Model, devices=None) -> dict:
    """train.run_stage's placement arguments: the mesh of `config.mesh` over `devices` (default: all), its
    logical axis rules, and the logical names the modules put on their weights."""
    config, space = model.config, model.space
    names = base.model_logical_names(model.module, config.model, space.shape[0], config.data.crop_size)
    logical = dict(unet=names["unet"], adapter=names["adapter"], teacher_unet=names["unet"])
    logical["teacher_adapter"] = names["adapter"]
    mesh = sharding.make_mesh(config.mesh, devices)
    return dict(mesh=mesh, rules=sharding.rules_from_config(config.mesh), logical=logical)


def needs_finetune(config) -> bool:
    """The finetuned model is the result (method 'finetune') or the start (GD-II, CM-II's codi.init)."""
    return config.method in ("finetune", "gd") or config.codi.init == "finetuned"


def teacher_stage(job: Job):
    """The unconditional (or text-to-image) teacher's backbone params: a diffusers folder's, a teacher
    checkpoint's (`teacher.checkpoint`), or pretrained here with the diffusion loss."""
    config, model = job.config, job.model
    t0 = time.perf_counter()
    init_fn = _teacher_init(model.module, config)
    if model.pre is not None:
        unet = model.pre.unet_params
        if jax.process_count() == 1 and (jax.default_backend() == "cpu" or jax.device_count() == 1):
            # The folder's weights are host (numpy) arrays, which no one can free while a reference
            # remains. Where the device is the host (CPU) or one device holds the whole state, they
            # become device arrays now: the stage's state takes them over (donation) and the loaded
            # copy is not kept beside it (3.4 GB at SD-1.5 size). On a multi-chip mesh they stay on the
            # host and go straight to their shards.
            unet = model.pre.unet_params = jax.device_put(unet)
    elif config.teacher.checkpoint:
        state = train.load_final_state(
            name="teacher", workdir=config.teacher.checkpoint, tcfg=config.pretrain, init_fn=init_fn,
            seed=config.seed, **job.place,
        )  # fmt: skip
        unet = state["ema_params"]["unet"]
    else:
        loss_fn = functools.partial(pretrain.diffusion_loss, denoiser=model.denoisers.diffusion, use_cond=False)
        prompts = model.space.prompts
        if prompts is not None:
            # A text-to-image teacher of the task's images and prompts; the prompt table (or the text
            # encoder's params) is a constant of its step, so its checkpoint is the backbone alone (any
            # task's runs can load it).
            loss_fn = prompts.loss(loss_fn, config.text.dropout, constant=True)
        state = train.run_stage(
            name="teacher", workdir=job.workdir, tcfg=config.pretrain, loss_fn=loss_fn, init_fn=init_fn,
            data_cfg=config.data, task=config.task if prompts is not None else "uncond", seed=config.seed,
            image_fn=job.teacher_images, prompt_fn=model.space.prompt_fn, **job.place,
        )  # fmt: skip
        unet = state["ema_params"]["unet"]
    job.timings["teacher_s"] = round(time.perf_counter() - t0, 1)
    return unet


def finetune_stage(job: Job, teacher_unet):
    """Conditional finetuning with the diffusion loss from eq 12's initialisation (the finetuned-LDM
    baseline, and the first stage of GD-II and CM-II); loaded from `finetune.checkpoint` when given."""
    config, f = job.config, job.config.finetune
    loss_fn, init_fn = finetune_parts(job, teacher_unet)
    return _train_or_load(
        job, "finetune", f.train, loss_fn, init_fn, seed_offset=1, workdir=f.checkpoint or job.workdir,
        load=bool(f.checkpoint), image_fn=job.method_images if config.method == "finetune" else None,
    )  # fmt: skip


def finetune_parts(job: Job, teacher_unet):
    """(loss_fn, init_fn) of conditional finetuning (the diffusion loss with the condition)."""

    def init_fn(rng):
        return codi.split_params(_adapted_params(job, rng, teacher_unet), job.config.finetune.mode, key="finetune")

    loss_fn = functools.partial(pretrain.diffusion_loss, denoiser=job.model.denoisers.diffusion, use_cond=True)
    return loss_fn, init_fn


def codi_stage(job: Job, teacher_unet, finetuned):
    """CoDi (Algorithm 1, eq 15) from eq 12's initialisation, a random backbone (Fig. 7), or the
    finetuned model (CM-II); PE-CoDi with codi.mode='pe'."""
    loss_fn, init_fn = codi_parts(job, teacher_unet, finetuned)
    return _train_or_load(
        job, "codi", job.config.codi.train, loss_fn, init_fn, seed_offset=1, image_fn=job.method_images
    )


def codi_parts(job: Job, teacher_unet, finetuned):
    """(loss_fn, init_fn) of the CoDi stage, before the latent space wraps them. `finetuned` None with
    codi.init='finetuned' (the planner: no finetuned model exists) starts from eq 12's initialisation of
    the teacher, which has the finetuned model's shapes."""
    c, model = job.config.codi, job.model

    def init_fn(rng):
        if c.init == "finetuned" and finetuned is not None:
            params = _merged(finetuned)
        else:
            params = _adapted_params(job, rng, None if c.init == "random" else teacher_unet)
        # A frozen teacher (zs_predictor 'teacher') is the starting model: the pretrained backbone
        # without the condition, or the finetuned model with it (CM-II).
        teacher_cond = c.init == "finetuned" and c.zs_predictor == "teacher"
        return codi.split_params(params, c.mode, c.zs_predictor, teacher_cond=teacher_cond)

    codec = model.codec
    loss_fn = functools.partial(
        codi.codi_loss,
        denoiser=model.denoisers.consistency,
        teacher=model.denoisers.diffusion,
        cfg=c,
        decode=None if codec is None else lambda fz, z: codec.decode(fz["vae"], z),
    )
    return loss_fn, init_fn


def gd_stages(job: Job, finetuned):
    """GD-II: progressive distillation rounds from the finetuned model, halving the steps each round."""
    g, state = job.config.gd, finetuned
    for i, n in enumerate(progressive.rounds(g.start_steps, g.final_steps)):
        start = _merged(state)  # the previous round's student (the finetuned model first)
        loss_fn, init_fn = gd_parts(job, lambda rng, start=start: start, n)
        state = _train_or_load(
            job, f"gd_{n}steps", g.train, loss_fn, init_fn, seed_offset=2 + i, image_fn=job.method_images
        )
    return state


def gd_parts(job: Job, start_fn, student_steps: int):
    """(loss_fn, init_fn) of one progressive-distillation round; start_fn(rng): its starting params."""

    def init_fn(rng):
        return codi.split_params(start_fn(rng), "full", teacher_cond=True)

    loss_fn = functools.partial(
        progressive.progressive_loss, denoiser=job.model.denoisers.diffusion, student_steps=student_steps
    )
    return loss_fn, init_fn


def evaluation_stage(job: Job, state, teacher_unet) -> dict | None:
    """The final stage's EMA weights (as consistency models do) on held-out images: metrics.json, the
    grid, the summary table; PE runs also write their adapter on its own (for the sampler).
    `teacher_unet`: the teacher's backbone when eval.teacher_ddim_steps samples it, else None."""
    config, model = job.config, job.model
    t0 = time.perf_counter()
    keep_teacher = bool(config.eval.teacher_ddim_steps)
    frozen = state["frozen"]
    params = base.merge(state["ema_params"], frozen)
    if jax.process_count() > 1:  # every process takes part in gathering; process 0 evaluates alone
        from jax.experimental import multihost_utils

        params, teacher_unet, frozen = multihost_utils.process_allgather((params, teacher_unet, frozen), tiled=True)
    if jax.process_index() != 0:
        return None
    report = evaluate.evaluate_task(
        denoiser=model.space.guided(model.method_denoiser),
        params=params,
        eval_batch=job.eval_batch,
        ecfg=config.eval,
        out_dir=job.workdir,
        method=config.method,
        task=config.task,
        data_cfg=config.data,
        teacher=model.denoisers.diffusion if keep_teacher else None,
        teacher_params={"unet": teacher_unet} if keep_teacher else None,
        extra={
            "variant": config.variant,
            "timings_s": job.timings,
            "teacher_fingerprint": job.teacher_fingerprint,
            "data": train.data_stats(job.workdir),  # per stage: the corrupt records skipped
        },
        **model.space.eval_kwargs(frozen, job.eval_batch),
    )
    job.timings["eval_s"] = round(time.perf_counter() - t0, 1)  # the report holds `timings`: these land in it
    job.timings["total_s"] = round(time.perf_counter() - job.t_start, 1)
    storage.write_json(storage.join(job.workdir, "metrics.json"), report)
    runs.export_adapter(job.workdir, config, params)
    _print_summary(report, job.workdir)
    return report


# --------------------------------------------------------------------------- the stages' parts


def stage_program(job: Job) -> tuple:
    """(name, train config, loss_fn, init_fn(rng, teacher_unet)) of the method's trained stage, as the job
    builds it: what the memory planner (codi_jax.benchmarks.plan) compiles. CM-II and GD-II start from
    eq 12's initialisation here (the finetuned model's shapes); GD's is its first round."""
    config, method = job.config, job.config.method
    if method == "codi":
        name, tcfg = "codi", config.codi.train
        parts = lambda unet: codi_parts(job, unet, None)
    elif method == "finetune":
        name, tcfg = "finetune", config.finetune.train
        parts = lambda unet: finetune_parts(job, unet)
    else:
        n = progressive.rounds(config.gd.start_steps, config.gd.final_steps)[0]
        name, tcfg = f"gd_{n}steps", config.gd.train
        parts = lambda unet: gd_parts(job, lambda rng: _adapted_params(job, rng, unet), n)
    loss_fn = _wrap_loss(job, parts(None)[0])
    init_fn = lambda rng, unet: _with_frozen(parts(unet)[1], job.model.space)(rng)
    return name, tcfg, loss_fn, init_fn


def _wrap_loss(job: Job, loss_fn):
    """A stage's loss in the run's space: pixels -> latents (latent models), prompts -> contexts."""
    if job.model.codec is not None:
        loss_fn = latent.latent_loss(loss_fn, job.model.codec)
    if job.model.space.prompts is not None:
        loss_fn = job.model.space.prompts.loss(loss_fn, job.config.text.dropout, constant=False)
    return loss_fn


def _train_or_load(job: Job, name, tcfg, loss_fn, init_fn, *, seed_offset, image_fn, workdir=None, load=False):
    """Train (or load) one stage after the teacher. Every such stage's frozen state carries the
    latent space (VAE, prompt context) that its latent loss and evaluation read."""
    config, space = job.config, job.model.space
    t0 = time.perf_counter()
    init_fn = _with_frozen(init_fn, space)
    kw = dict(name=name, workdir=workdir or job.workdir, tcfg=tcfg, init_fn=init_fn, seed=config.seed + seed_offset)
    if load:
        state = train.load_final_state(**kw, **job.place)
    else:
        loss_fn = _wrap_loss(job, loss_fn)
        state = train.run_stage(
            **kw, loss_fn=loss_fn, data_cfg=config.data, task=config.task, image_fn=image_fn,
            prompt_fn=space.prompt_fn, cache_fields=space.cache_fields, on_state=job.release_teacher, **job.place,
        )  # fmt: skip
    job.timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    return state


def _adapted_params(job: Job, rng, teacher_unet):
    """Eq 12's initialisation around the teacher's backbone (a random one when None). With teacher
    samples kept for evaluation, the backbone is a copy: train steps donate their state."""
    unet = teacher_unet
    if unet is not None and job.config.eval.teacher_ddim_steps:
        unet = _copy(unet)
    cfg, space = job.config, job.model.space
    return base.init_adapted_params(job.model.module, cfg.model, rng, space.shape[0], cfg.data.crop_size, unet=unet)


def _merged(state):
    return base.merge(state["ema_params"], state["frozen"])


def _teacher_init(module, config):
    def init_fn(rng):
        params = base.init_model_params(module, config.model, rng, config.data.crop_size)
        return {"unet": params["unet"]}, {}

    return init_fn


def _with_frozen(init_fn, space: build.Space):
    def init(rng):
        trainable, frozen = init_fn(rng)
        return trainable, space.with_frozen(frozen)

    return init


def _delete_arrays(tree, name: str = "teacher") -> None:
    """Free the device buffers of `tree` now, whoever still refers to them (reading one later raises)."""
    count = nbytes = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            count, nbytes = count + 1, nbytes + leaf.nbytes
            leaf.delete()
    logging.info("%s: freed %d arrays (%.2f GB) once the stage's state existed", name, count, nbytes / 1e9)


def _copy(tree):
    """A fresh copy: train steps donate their state, and jit may forward input buffers to outputs."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def params_fingerprint(tree) -> str:
    """The sum of squared weights over a parameter tree, to 7 significant digits: the same teacher gives
    the same figure on any mesh (up to summation order, far below the 7th digit); two trainings of the
    same recipe that drifted apart (another JAX build, another machine) differ from the 3rd or 4th digit.
    Computed on the devices, so sharded and multi-host trees need no gather."""
    total = jax.jit(
        lambda t: sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree_util.tree_leaves(t))
    )(tree)
    return f"{float(total):.7g}"


def _preview_fns(config, diffusion_denoiser, method_denoiser, eval_batch, space: build.Space):
    """TensorBoard pictures: teacher DDIM samples, and bicubic | the method's N-step samples | HR on held-out crops."""
    k = min(config.eval.preview_examples, eval_batch["image"].shape[0])
    cond, hr = eval_batch["cond"][:k], eval_batch["image"][:k]
    prompt = None if "prompt" not in eval_batch else eval_batch["prompt"][:k]
    shape, ctx = (k,) + space.shape, space.batch_context(k, prompt)
    method_ctx = space.sampling_context(k, prompt)
    rng = jax.random.PRNGKey(config.eval.seed)
    ddim_steps = config.eval.teacher_ddim_steps or config.eval.preview_teacher_steps
    teacher_sampler = sampling.make_sampler(diffusion_denoiser, ddim_steps, "deterministic")
    n_steps = max(config.eval.steps)
    codi_sampler = sampling.make_sampler(space.guided(method_denoiser), n_steps, config.eval.samplers[0])

    def teacher_images(state):
        x = teacher_sampler(state["ema_params"], rng, shape, None, ctx)
        return {f"samples/teacher_ddim{ddim_steps}_uncond": space.to_pixels(x, state["frozen"])}

    def codi_images(state):
        x = codi_sampler(base.merge(state["ema_params"], state["frozen"]), rng, shape, cond, method_ctx)
        shown = cond[..., :3] if cond.shape[-1] >= 3 else np.repeat(cond, 3, axis=-1)
        row = np.concatenate(
            [shown, space.to_pixels(x, state["frozen"]), hr], axis=2
        )  # side by side, one row per example
        return {f"samples/cond_{config.method}{n_steps}_target": row}

    return teacher_images, codi_images


# --------------------------------------------------------------------------- config checks


# Config fields a recipe leaves for the user to set (ml_collections' required placeholders), with what to say.
REQUIRED_HINTS = {
    "teacher.pretrained_path": "the paper-scale recipe needs a pretrained model: set "
    "--config.teacher.pretrained_path=/path/to/stable-diffusion (diffusers format), "
    "or run the offline default --config=configs/sr.py:tiny",
}


def unset_required_fields(config, prefix: str = "") -> list[str]:
    """Dotted names of the required fields of `config` (placeholders, configs/common.py `required`)
    that hold no value yet."""
    out = []
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, mlc.ConfigDict):
            out += unset_required_fields(value, f"{prefix}{key}.")
        elif isinstance(value, mlc.FieldReference) and value.get() is None:
            out.append(prefix + key)
    return out


def check_required(config) -> None:
    """One line naming the first required field left unset (before anything reads the config)."""
    missing = unset_required_fields(config)
    if missing:
        name = missing[0]
        raise ValueError(f"config {name} is required: {REQUIRED_HINTS.get(name, f'set --config.{name}')}")


def validate_config(config):
    """One-line errors for values that would otherwise fail deep inside a run; each config section is
    checked by the module that reads it."""
    check_required(config)
    if config.task not in TASKS:
        raise ValueError(f"config task={config.task!r} is not one of {TASKS}")
    if config.method not in METHODS:
        raise ValueError(f"config method={config.method!r} is not one of {METHODS}")
    build.validate_model(config)
    codi.validate(config.codi, diffusion.make_schedule(config.schedule))
    codi.check_mode(config.finetune.mode, "finetune.mode")
    if config.method == "gd":
        progressive.rounds(config.gd.start_steps, config.gd.final_steps)
    stages = (("pretrain", config.pretrain), ("codi.train", config.codi.train))
    stages += (("finetune.train", config.finetune.train), ("gd.train", config.gd.train))
    for prefix, tcfg in stages:
        train.validate_train(tcfg, prefix)
    evaluate.validate(config.eval, "eval.")
    if config.task in task_data.PROMPT_TASKS:
        text.validate(config.text)


def _print_summary(report, workdir):
    m = report["metrics"]
    lines = [f"{'':12s} {'PSNR':>7s} {'SSIM':>6s} {'SWD':>7s} {'HF':>5s}"]
    for name, v in m.items():
        lines.append(f"{name:12s} {v['psnr']:7.2f} {v['ssim']:6.3f} {v['swd_mean']:7.4f} {v['hf_ratio']:5.2f}")
    print("\n".join(lines))
    print(f"metrics: {storage.join(workdir, 'metrics.json')}")
    print(f"grid:    {report['grid']}")
    print(f"tensorboard --logdir {workdir}")
