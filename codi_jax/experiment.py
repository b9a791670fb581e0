"""The whole job: (pretrain the teacher) -> CoDi distillation -> evaluation.

Each stage lives in its own WORKDIR subfolder with its own checkpoints, so running the
same command again resumes where it stopped and skips finished stages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from codi_jax import diffusion, sampling, sharding, train
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate
from codi_jax.methods import base, codi, latent, pretrain, progressive
from codi_jax.models import adapter as adapter_lib
from codi_jax.models import prompts as prompts_lib

TASKS = ("sr", "inpaint", "depth", "edit")
METHODS = ("codi", "finetune", "gd")
CODI_INITS = ("pretrained", "finetuned", "random")


def validate_config(config):
    """One-line errors for values that would otherwise fail deep inside a run."""
    if config.task not in TASKS:
        raise ValueError(f"config task={config.task!r} is not one of {TASKS}")
    if config.model.prediction not in diffusion.PREDICTIONS + (("auto",) if config.teacher.pretrained_path else ()):
        raise ValueError(f"config model.prediction={config.model.prediction!r} is not one of {diffusion.PREDICTIONS}")
    base.compute_dtype(config.model.dtype)
    if config.model.adapter.fusion not in adapter_lib.FUSIONS:
        raise ValueError(
            f"config model.adapter.fusion={config.model.adapter.fusion!r} is not one of {adapter_lib.FUSIONS}"
        )
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
    if not config.eval.samplers:
        raise ValueError("config eval.samplers is empty; give at least one of " + str(sampling.SAMPLERS))
    for name in config.eval.samplers:
        sampling.check_sampler(name, "eval.samplers")
    if config.method not in METHODS:
        raise ValueError(f"config method={config.method!r} is not one of {METHODS}")
    if c.init not in CODI_INITS:
        raise ValueError(f"config codi.init={c.init!r} is not one of {CODI_INITS}")
    if c.consistency_space not in codi.CONSISTENCY_SPACES:
        raise ValueError(
            f"config codi.consistency_space={c.consistency_space!r} is not one of {codi.CONSISTENCY_SPACES}"
        )
    if c.eps_target not in codi.EPS_TARGETS:
        raise ValueError(f"config codi.eps_target={c.eps_target!r} is not one of {codi.EPS_TARGETS}")
    if config.finetune.mode not in codi.MODES:
        raise ValueError(f"config finetune.mode={config.finetune.mode!r} is not one of {codi.MODES}")
    if config.method == "gd":
        progressive.rounds(config.gd.start_steps, config.gd.final_steps)
    for n in config.eval.steps:
        if not 1 <= n <= 1000:
            raise ValueError(f"config eval.steps has {n}; step counts must be in [1, 1000]")
    for prefix, tcfg in (
        ("pretrain", config.pretrain),
        ("codi.train", c.train),
        ("finetune.train", config.finetune.train),
        ("gd.train", config.gd.train),
    ):
        for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if tcfg[key] < 1:
                raise ValueError(f"config {prefix}.{key}={tcfg[key]} must be >= 1")
    if c.guidance_space not in codi.GUIDANCE_SPACES:
        raise ValueError(f"config codi.guidance_space={c.guidance_space!r} is not one of {codi.GUIDANCE_SPACES}")
    if not config.teacher.pretrained_path and config.model.unet.in_channels != 3:
        raise ValueError("config model.unet.in_channels must be 3 for pixel-space models (no teacher.pretrained_path)")
    source_task = {"edit_jsonl": "edit", "ip2p_folder": "edit", "depth_folder": "depth"}.get(config.data.source)
    if source_task and source_task != config.task:
        raise ValueError(f"config data.source={config.data.source!r} holds {source_task} data, not {config.task!r}")
    want = task_data.COND_CHANNELS[config.task]
    if config.model.adapter.cond_channels != want:
        raise ValueError(
            f"config model.adapter.cond_channels={config.model.adapter.cond_channels} but task "
            f"{config.task!r} has {want}-channel conditions"
        )
    if config.task in task_data.PROMPT_TASKS:
        t = config.text
        if not config.teacher.pretrained_path and config.model.unet.cross_attention_dim is None:
            raise ValueError(
                f"config model.unet.cross_attention_dim is None but task {config.task!r} has prompts: "
                "set it to the text encoder's width"
            )
        if not 0.0 <= t.dropout < 1.0:
            raise ValueError(f"config text.dropout={t.dropout} must be in [0, 1)")
        if t.guidance_scale < 0:
            raise ValueError(f"config text.guidance_scale={t.guidance_scale} must be >= 0")


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


def with_pretrained(config, workdir):
    """Load the diffusers-format teacher; the config's model, schedule and latent size follow it."""
    from codi_jax.models import vae as vae_lib
    from codi_jax.pretrained import stable_diffusion

    prediction = config.model.prediction
    pre = stable_diffusion.load(
        config.teacher.pretrained_path,
        prompt=config.teacher.prompt,
        cache_dir=os.path.join(workdir, "cache"),
        allow_pickle=config.teacher.allow_pickle,
        expect_prediction=None if prediction == "auto" else prediction,
    )
    user_unet = config.model.unet  # the run-time options survive; the architecture comes from the folder
    config = mlc.ConfigDict(config.to_dict())
    config.model.unet = pre.unet_cfg
    config.model.unet.remat = user_unet.get("remat", "none")
    config.model.unet.attention = user_unet.get("attention", "auto")
    config.model.prediction = pre.prediction
    config.schedule = pre.schedule_cfg
    factor = vae_lib.downscale_factor(pre.vae_cfg)
    n_down = len(config.model.adapter.conditioning_embedding_out_channels) - 1
    if 2**n_down != factor:
        raise ValueError(
            f"config model.adapter.conditioning_embedding_out_channels has {n_down} stride-2 convs "
            f"(len - 1) but the VAE downscales by {factor}: it needs {factor.bit_length() - 1}"
        )
    if config.data.crop_size % factor:
        raise ValueError(
            f"config data.crop_size={config.data.crop_size} is not a multiple of the VAE's factor {factor}"
        )
    return config, pre, factor


class Space:
    """Where samples live: pixels, or VAE latents (shape, prompt context, decoder)."""

    def __init__(self, config, pre=None, codec=None, factor=1, prompt_table=None, negative=None):
        self.codec, self.pre = codec, pre
        side = config.data.crop_size // factor
        self.shape = (side, side, config.model.unet.in_channels)
        self.context = None if pre is None else pre.context
        self._decode = None if codec is None else jax.jit(codec.decode)
        # Tasks with prompts: [1 + P, L, D] embeddings (row 0 ''), the negative prompt's [1, L, D].
        self.prompt_table, self.negative = prompt_table, negative
        self.guidance_scale = float(config.text.guidance_scale) if prompt_table is not None else 1.0

    def batch_context(self, n, prompt=None):
        """The cross-attention context of n examples (their prompts' embeddings in tasks with prompts)."""
        if self.prompt_table is not None:
            return self.prompt_table[np.asarray(prompt) + 1]
        return None if self.context is None else np.broadcast_to(self.context, (n,) + self.context.shape[1:])

    def sampling_context(self, n, prompt=None):
        """What the method's sampler takes as context: under classifier-free guidance (`guided`) the
        prompts' and the negative prompt's embeddings."""
        if self.prompt_table is None:
            return self.batch_context(n)
        return {"prompt": self.batch_context(n, prompt), "negative": self.negative}

    def guided(self, denoiser):
        return denoiser if self.prompt_table is None else prompts_lib.Guided(denoiser, self.guidance_scale)

    def with_frozen(self, frozen):
        """A stage's frozen params plus what its loss and evaluation read: the VAE and prompt context
        (latent space), the prompt table (tasks with prompts)."""
        if self.pre is not None:
            frozen = dict(frozen, vae=self.pre.vae_params, context=self.pre.context)
        if self.prompt_table is not None:
            frozen = dict(frozen, prompt_table=self.prompt_table)
        return frozen

    def to_pixels(self, x, frozen):
        """Samples as images; `frozen` (the train state's) holds the VAE params of latent models."""
        return np.asarray(x) if self._decode is None else np.asarray(self._decode(frozen["vae"], x))

    def eval_kwargs(self, frozen, batch):
        n, prompt = batch["image"].shape[0], batch.get("prompt")
        out = {}
        if self.codec is not None:
            out = dict(sample_shape=self.shape, to_pixels=lambda x: self.to_pixels(x, frozen))
        if self.prompt_table is not None or self.codec is not None:
            out.update(context=self.sampling_context(n, prompt), teacher_context=self.batch_context(n, prompt))
        return out


def _preview_fns(config, plain, method_denoiser, eval_batch, space: Space):
    """TensorBoard pictures: teacher DDIM samples, and bicubic | the method's N-step samples | HR on held-out crops."""
    k = min(4, eval_batch["image"].shape[0])
    cond, hr = eval_batch["cond"][:k], eval_batch["image"][:k]
    prompt = None if "prompt" not in eval_batch else eval_batch["prompt"][:k]
    shape, ctx = (k,) + space.shape, space.batch_context(k, prompt)
    method_ctx = space.sampling_context(k, prompt)
    rng = jax.random.PRNGKey(config.eval.seed)
    ddim_steps = config.eval.teacher_ddim_steps or 16
    teacher_sampler = sampling.make_sampler(plain, ddim_steps, "deterministic")
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


@dataclasses.dataclass
class Model:
    """What a run (or the evaluation job) builds from a config: the networks and the sample space."""

    config: mlc.ConfigDict  # with the pretrained folder's architecture filled in
    pre: object  # stable_diffusion.Pretrained, or None (pixel-space tiny models)
    codec: object  # latent.LatentCodec, or None
    space: Space
    module: object
    plain: base.Denoiser  # the network as a diffusion model (eq 8)
    wrapped: base.Denoiser  # with CoDi's boundary scalings (eq 17/18)

    @property
    def method_denoiser(self) -> base.Denoiser:
        """CoDi samples through the boundary-wrapped consistency function; the finetuned and
        progressively distilled models are plain diffusion models."""
        return self.wrapped if self.config.method == "codi" else self.plain


def prompt_embeddings(config, workdir: str):
    """(prompt table [1 + P, L, D], negative prompt [1, L, D]) of a task with prompts, else (None, None);
    computed by the frozen text encoder once and cached in WORKDIR/cache."""
    if config.task not in task_data.PROMPT_TASKS:
        return None, None
    cache = os.path.join(workdir, "cache")
    task_prompts = task_data.prompts(config.data, config.task)
    encoder = prompts_lib.make_encoder(config, task_prompts, cache)
    table = prompts_lib.prompt_table(encoder, task_prompts, cache, config.text.max_cached_prompts)
    negative = prompts_lib.prompt_table(encoder, [config.text.negative_prompt], cache, 1)[1:]
    width = config.model.unet.cross_attention_dim
    if table.shape[-1] != width:
        raise ValueError(
            f"config text.encoder gives {table.shape[-1]}-wide embeddings but model.unet.cross_attention_dim={width}"
        )
    return table, negative


def build_model(config, workdir: str) -> Model:
    pre, codec, factor = None, None, 1
    if config.teacher.pretrained_path:
        config, pre, factor = with_pretrained(config, workdir)
        codec = latent.LatentCodec(
            pre.vae_module,
            float(pre.vae_cfg.scaling_factor),
            float(pre.vae_cfg.shift_factor),
            sample_posterior=config.teacher.sample_latents,
        )
    schedule = diffusion.make_schedule(config.schedule)
    module = base.make_module(config.model)
    b = config.codi.boundary
    plain = base.Denoiser(module, schedule, config.model.prediction)
    wrapped = base.Denoiser(
        module, schedule, config.model.prediction, (b.sigma_data, b.time_scale) if b.enabled else None
    )
    table, negative = prompt_embeddings(config, workdir)
    space = Space(config, pre, codec, factor, table, negative)
    return Model(config, pre, codec, space, module, plain, wrapped)


def final_stage(config) -> tuple[str, str]:
    """(workdir holding it, stage name) of the stage whose EMA weights a run evaluates."""
    if config.method == "finetune":
        return config.finetune.checkpoint, "finetune"
    if config.method == "gd":
        return "", f"gd_{config.gd.final_steps}steps"
    return "", "codi"


def final_stage_steps(config) -> int:
    """Train steps of the final stage (its last checkpoint's step once complete)."""
    return {"finetune": config.finetune.train, "gd": config.gd.train}.get(config.method, config.codi.train).num_steps


def _with_frozen(init_fn, space: Space):
    def init(rng):
        trainable, frozen = init_fn(rng)
        return trainable, space.with_frozen(frozen)

    return init


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


def run(config, workdir: str, stop_after: str | None = None) -> dict | None:
    """Run the job described by `config` in `workdir`; returns the evaluation report.

    Stages, each in WORKDIR/<stage> (resumed, or skipped when complete):
      teacher   the pretrained model (loaded, or pretrained here for the tiny recipes)
      finetune  conditional finetuning with the diffusion loss (method 'finetune', and the start
                of the two-stage baselines: codi.init='finetuned' (CM-II), method 'gd' (GD-II))
      codi      CoDi / PE-CoDi / CM-II and the ablations (method 'codi')
      gd_Nsteps progressive distillation rounds (method 'gd')
    then evaluation of the method's final EMA weights. `stop_after='teacher'` returns after stage 1
    (the reproduction's shared teacher).
    """
    if config.variant == "" and not config.teacher.pretrained_path:
        raise ValueError(
            "configs/sr.py (paper scale) needs a pretrained model: set "
            "--config.teacher.pretrained_path=/path/to/stable-diffusion (diffusers format), "
            "or run the offline default --config=configs/sr.py:tiny"
        )
    validate_config(config)
    check_workdir(workdir)
    evaluate.check_metric_weights(config.eval)
    t_start = time.perf_counter()
    m = build_model(config, workdir)
    config, pre, codec, space, module = m.config, m.pre, m.codec, m.space, m.module
    plain, wrapped, method_denoiser, method = m.plain, m.wrapped, m.method_denoiser, config.method
    if jax.process_index() == 0:  # what the evaluation job reads back
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh)
    timings = {}
    eval_batch = pipeline.make_eval_batch(
        config.data, task=config.task, num_examples=config.eval.num_examples, seed=config.eval.seed
    )
    teacher_images, method_images = _preview_fns(config, plain, method_denoiser, eval_batch, space)
    if jax.process_count() > 1 or not config.eval.get("previews", True):
        teacher_images = method_images = None  # previews read whole arrays on one process; metrics come at the end
    # The logical axis names the modules put on their weights, for the sharding rules.
    names = base.model_logical_names(module, config.model, space.shape[0], config.data.crop_size)
    logical = {
        "unet": names["unet"],
        "adapter": names["adapter"],
        "teacher_unet": names["unet"],
        "teacher_adapter": names["adapter"],
    }
    place = dict(mesh=mesh, rules=rules, logical=logical)

    # Stage 1: the unconditional teacher (pretrained here when none is given).
    teacher_init = _teacher_params_init(module, config)
    t0 = time.perf_counter()
    if pre is not None:
        tstate = {"ema_params": {"unet": pre.unet_params}}
    elif config.teacher.checkpoint:
        tstate = train.load_final_state(
            name="teacher",
            workdir=config.teacher.checkpoint,
            tcfg=config.pretrain,
            init_fn=teacher_init,
            seed=config.seed,
            **place,
        )
    else:
        loss_fn = functools.partial(pretrain.diffusion_loss, denoiser=plain, use_cond=False)
        if space.prompt_table is not None:
            # A text-to-image teacher of the task's images and prompts; the prompt table is a constant
            # of its step, so its checkpoint is the backbone alone (any task's runs can load it).
            loss_fn = prompts_lib.with_prompts(loss_fn, config.text.dropout, table=space.prompt_table)
        tstate = train.run_stage(
            name="teacher",
            workdir=workdir,
            tcfg=config.pretrain,
            loss_fn=loss_fn,
            init_fn=teacher_init,
            data_cfg=config.data,
            task=config.task if space.prompt_table is not None else "uncond",
            seed=config.seed,
            image_fn=teacher_images,
            **place,
        )
    teacher_unet = tstate["ema_params"]["unet"]
    timings["teacher_s"] = round(time.perf_counter() - t0, 1)
    del tstate
    if stop_after == "teacher":
        return None
    teacher_fingerprint = params_fingerprint(teacher_unet)  # metrics.json: which teacher a run started from
    keep_teacher = bool(config.eval.teacher_ddim_steps)

    def adapted_init(rng, random_backbone=False):
        """{unet: the teacher (or random), adapter: a duplicate of its encoder, mu = 0} (eq 12)."""
        params = base.init_model_params(module, config.model, rng, space.shape[0], config.data.crop_size)
        unet = params["unet"] if random_backbone else (_copy(teacher_unet) if keep_teacher else teacher_unet)
        return {"unet": unet, "adapter": adapter_lib.init_adapter_from_backbone(params["adapter"], unet)}

    def stage(name, tcfg, loss_fn, init_fn, seed_offset, image_fn=method_images, workdir_=workdir, load=False):
        """Train (or load) one stage after the teacher. Every such stage's frozen state carries the
        latent space (VAE, prompt context) that its latent loss and evaluation read."""
        t0 = time.perf_counter()
        init_fn = _with_frozen(init_fn, space)
        if load:
            state = train.load_final_state(
                name=name, workdir=workdir_, tcfg=tcfg, init_fn=init_fn, seed=config.seed + seed_offset, **place
            )
        else:
            if codec is not None:
                loss_fn = latent.latent_loss(loss_fn, codec)
            if space.prompt_table is not None:
                loss_fn = prompts_lib.with_prompts(loss_fn, config.text.dropout)
            state = train.run_stage(
                name=name,
                workdir=workdir_,
                tcfg=tcfg,
                loss_fn=loss_fn,
                init_fn=init_fn,
                data_cfg=config.data,
                task=config.task,
                seed=config.seed + seed_offset,
                image_fn=image_fn,
                **place,
            )
        timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        return state

    # Stage 2a: conditional finetuning with the plain diffusion loss (baseline, and GD-II/CM-II's first stage).
    state = None
    if method in ("finetune", "gd") or config.codi.init == "finetuned":
        f = config.finetune

        def finetune_init(rng):
            return codi.split_params(adapted_init(rng), f.mode, key="finetune")

        state = stage(
            "finetune",
            f.train,
            functools.partial(pretrain.diffusion_loss, denoiser=plain, use_cond=True),
            finetune_init,
            1,
            workdir_=f.checkpoint or workdir,
            load=bool(f.checkpoint),
            image_fn=method_images if method == "finetune" else None,
        )

    def finetuned_params():
        return base.merge(state["ema_params"], state["frozen"])

    # Stage 2b: the distillation.
    if method == "codi":
        c = config.codi

        def codi_init(rng):
            if c.init == "finetuned":
                params = finetuned_params()
            else:
                params = adapted_init(rng, random_backbone=c.init == "random")
            # A frozen teacher (zs_predictor 'teacher') is the starting model: the pretrained backbone
            # without the condition, or the finetuned model with it (CM-II).
            return codi.split_params(
                params, c.mode, c.zs_predictor, teacher_cond=c.init == "finetuned" and c.zs_predictor == "teacher"
            )

        loss_fn = functools.partial(
            codi.codi_loss,
            denoiser=wrapped,
            teacher=plain,
            cfg=c,
            decode=None if codec is None else lambda fz, z: codec.decode(fz["vae"], z),
        )
        state = stage("codi", c.train, loss_fn, codi_init, 1)
    elif method == "gd":
        g = config.gd
        for i, n in enumerate(progressive.rounds(g.start_steps, g.final_steps)):
            start = finetuned_params()  # the previous round's student (the finetuned model first)

            def gd_init(rng, start=start):
                del rng
                return codi.split_params(start, "full", teacher_cond=True)

            loss_fn = functools.partial(progressive.progressive_loss, denoiser=plain, student_steps=n)
            state = stage(f"gd_{n}steps", g.train, loss_fn, gd_init, 2 + i)

    # Stage 3: evaluation on held-out images (EMA weights, as consistency models do).
    t0 = time.perf_counter()
    frozen = state["frozen"]
    params = base.merge(state["ema_params"], frozen)
    if jax.process_count() > 1:  # every process takes part in gathering; process 0 evaluates alone
        from jax.experimental import multihost_utils

        params, teacher_unet, frozen = multihost_utils.process_allgather((params, teacher_unet, frozen), tiled=True)
    report = None
    if jax.process_index() == 0:
        report = evaluate.evaluate_task(
            denoiser=space.guided(method_denoiser),
            params=params,
            eval_batch=eval_batch,
            ecfg=config.eval,
            out_dir=workdir,
            method=method,
            task=config.task,
            data_cfg=config.data,
            teacher=plain if keep_teacher else None,
            teacher_params={"unet": teacher_unet} if keep_teacher else None,
            extra={"variant": config.variant, "timings_s": timings, "teacher_fingerprint": teacher_fingerprint},
            **space.eval_kwargs(frozen, eval_batch),
        )
        timings["eval_s"] = round(time.perf_counter() - t0, 1)
        timings["total_s"] = round(time.perf_counter() - t_start, 1)
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        from codi_jax import sample  # PE runs: the adapter on its own, for the sampling command

        sample.export_adapter(workdir, config, params)
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
