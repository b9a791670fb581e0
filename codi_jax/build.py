"""What a run builds from its config: the networks, their denoisers and the space samples live in.

The training job, the evaluation job, the sampler and diagnose all build their model here, so none
of them imports another (tests/test_architecture.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from codi_jax import diffusion, storage
from codi_jax.data import catalog, paired
from codi_jax.data import tasks as task_data
from codi_jax.methods import base, latent, text
from codi_jax.models import adapter as adapter_lib
from codi_jax.models import vae as vae_lib
from codi_jax.pretrained import record_cache, stable_diffusion, text_encoder


def validate_model(config) -> None:
    """One line naming the first bad field of the `model` section, or one that does not fit the task,
    the data or the teacher."""
    pretrained = bool(config.teacher.pretrained_path)
    if config.model.prediction not in diffusion.PREDICTIONS + (("auto",) if pretrained else ()):
        raise ValueError(f"config model.prediction={config.model.prediction!r} is not one of {diffusion.PREDICTIONS}")
    base.compute_dtype(config.model.dtype)
    if config.model.adapter.fusion not in adapter_lib.FUSIONS:
        raise ValueError(
            f"config model.adapter.fusion={config.model.adapter.fusion!r} is not one of {adapter_lib.FUSIONS}"
        )
    if not pretrained and config.model.unet.in_channels != 3:
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
    if config.task in task_data.PROMPT_TASKS and not pretrained and config.model.unet.cross_attention_dim is None:
        raise ValueError(
            f"config model.unet.cross_attention_dim is None but task {config.task!r} has prompts: "
            "set it to the text encoder's width"
        )


def with_pretrained(config, workdir, pre=None):
    """Load the diffusers-format teacher (or take `pre`: codi_jax.pretrained.architectures' weightless
    one); the config's model, schedule and latent size follow it."""
    prediction = config.model.prediction
    if pre is None:
        pre = stable_diffusion.load(
            config.teacher.pretrained_path,
            prompt=config.teacher.prompt,
            cache_dir=storage.join(workdir, "cache"),
            allow_pickle=config.teacher.allow_pickle,
            expect_prediction=None if prediction == "auto" else prediction,
        )
    elif prediction not in ("auto", pre.prediction):
        raise ValueError(f"config model.prediction={prediction!r} but the teacher predicts {pre.prediction!r}")
    user_unet = config.model.unet  # the run-time options survive; the architecture comes from the folder
    config = mlc.ConfigDict(config.to_dict())
    # A copy: the options below must not land in `pre` (the planner builds a second job from it).
    config.model.unet = mlc.ConfigDict(pre.unet_cfg.to_dict())
    config.model.unet.remat = user_unet.remat
    config.model.unet.attention = user_unet.attention
    config.model.prediction = pre.prediction
    config.schedule = mlc.ConfigDict(pre.schedule_cfg.to_dict())
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


@dataclasses.dataclass
class Prompts:
    """How a task with prompts gets its contexts (`text.prompt_source`, codi_jax/pretrained/text_encoder.py)."""

    source: str  # 'table' | 'encoder'
    negative: np.ndarray  # the negative prompt's embedding [1, L, D]
    table: np.ndarray | None = None  # 'table': [1 + P, L, D], row 0 the empty prompt
    encoder: text_encoder.TextEncoder | None = None  # 'encoder': run in the step on each record's tokens
    # 'encoder' with the records' cached encoder outputs (cache_fields): the step reads batch['context'],
    # the train state holds no encoder; `empty` [1, L, D] is the empty prompt's (prompt dropout)
    empty: np.ndarray | None = None

    @property
    def tokenize(self):
        """The data pipeline's prompt_fn: a record's text -> its tokens ('encoder'); None: table indices."""
        return None if self.encoder is None else text_encoder.Tokenize(self.encoder.tokenizer, self.encoder.max_length)

    def context(self, prompt) -> np.ndarray:
        """Contexts [n, L, D] of a batch's 'prompt': table indices [n] or token ids [n, L]."""
        prompt = np.asarray(prompt)
        if prompt.ndim == 2:
            return self.encoder.embed_tokens(prompt)
        return self.table[prompt + 1]

    def loss(self, loss_fn, dropout: float, constant: bool):
        """`loss_fn` with each example's context from its prompt (methods/text.py); `constant`: the table or
        the encoder's params are constants of the step (the tiny teacher's), not frozen params."""
        if self.encoder is None:
            return text.with_prompts(loss_fn, dropout, table=self.table if constant else None)
        enc = self.encoder
        if self.empty is not None:
            return text.with_prompts(loss_fn, dropout, empty_context=self.empty)
        encode = (lambda _, ids: enc.encode(enc.params, ids)) if constant else enc.encode
        empty = self.tokenize("")
        return text.with_prompts(loss_fn, dropout, encode=encode, empty_tokens=empty)

    def frozen(self) -> dict:
        if self.encoder is None:
            return {"prompt_table": self.table}
        return {} if self.empty is not None else {"text_encoder": self.encoder.params}


class Space:
    """Where samples live: pixels, or VAE latents (shape, prompt context, decoder)."""

    def __init__(self, config, pre=None, codec=None, factor=1, prompts: Prompts | None = None, cache_fields=()):
        self.codec, self.pre = codec, pre
        self.cache_fields = tuple(cache_fields)  # what the training batches carry of the records' cache
        side = config.data.crop_size // factor
        self.shape = (side, side, config.model.unet.in_channels)
        self.context = None if pre is None else pre.context
        self._decode = None if codec is None else jax.jit(codec.decode)
        self.prompts = prompts  # tasks with prompts: how contexts are made
        self.negative = None if prompts is None else prompts.negative
        self.guidance_scale = float(config.text.guidance_scale) if prompts is not None else 1.0

    @property
    def prompt_fn(self):
        """What the data pipeline makes of a record's text (None: an index into the prompt table)."""
        return None if self.prompts is None else self.prompts.tokenize

    def batch_context(self, n, prompt=None):
        """The cross-attention context of n examples (their prompts' embeddings in tasks with prompts)."""
        if self.prompts is not None:
            return self.prompts.context(prompt)
        return None if self.context is None else np.broadcast_to(self.context, (n,) + self.context.shape[1:])

    def sampling_context(self, n, prompt=None):
        """What the method's sampler takes as context: under classifier-free guidance (`guided`) the
        prompts' and the negative prompt's embeddings."""
        if self.prompts is None:
            return self.batch_context(n)
        return {"prompt": self.batch_context(n, prompt), "negative": self.negative}

    def guided(self, denoiser):
        return denoiser if self.prompts is None else text.Guided(denoiser, self.guidance_scale)

    def with_frozen(self, frozen):
        """A stage's frozen params plus what its loss and evaluation read: the VAE and prompt context
        (latent space), the prompt table or the text encoder (tasks with prompts). Copies: a stage's
        state takes over its initial arrays (train.initial_state), and these outlive the stage."""
        shared = {}
        if self.pre is not None:
            shared.update(vae=self.pre.vae_params, context=self.pre.context)
        if self.prompts is not None:
            shared.update(self.prompts.frozen())
        return dict(frozen, **jax.tree_util.tree_map(jnp.copy, shared))

    def to_pixels(self, x, frozen):
        """Samples as images; `frozen` (the train state's) holds the VAE params of latent models."""
        return np.asarray(x) if self._decode is None else np.asarray(self._decode(frozen["vae"], x))

    def eval_kwargs(self, frozen, batch):
        n, prompt = batch["image"].shape[0], batch.get("prompt")
        out = {}
        if self.codec is not None:
            out = dict(sample_shape=self.shape, to_pixels=lambda x: self.to_pixels(x, frozen))
        if self.prompts is not None or self.codec is not None:
            out.update(context=self.sampling_context(n, prompt), teacher_context=self.batch_context(n, prompt))
        return out


@dataclasses.dataclass
class Model:
    """What a run (or the evaluation job) builds from a config: the networks and the sample space."""

    config: mlc.ConfigDict  # with the pretrained folder's architecture filled in
    pre: object  # stable_diffusion.Pretrained, or None (pixel-space tiny models)
    codec: object  # latent.LatentCodec, or None
    space: Space
    module: object
    denoisers: base.Denoisers  # the network as a diffusion model (eq 8) and as CoDi's consistency function (eq 17)

    @property
    def method_denoiser(self) -> base.Denoiser:
        """CoDi samples through the boundary-wrapped consistency function; the finetuned and
        progressively distilled models are diffusion models."""
        return self.denoisers.consistency if self.config.method == "codi" else self.denoisers.diffusion


def prompt_source(config) -> str:
    """'table' or 'encoder' (`text.prompt_source`; 'auto': the table up to text.max_cached_prompts
    distinct prompts). The tiny tasks' computable prompts are table indices."""
    want = config.text.prompt_source
    d = config.data
    if d.source == "array_record":
        texts = catalog.record_kind(d) != "image"
    else:
        texts = d.source in paired.PAIRED_SOURCES
    if not texts:
        if want == "encoder":
            raise ValueError(
                f"config text.prompt_source='encoder' needs records with texts (data.source {d.source!r} gives "
                "the tiny task's computable prompts, table indices): use 'auto' or 'table'"
            )
        return "table"
    if want != "auto":
        return want
    count = catalog.record_text_count(d) if d.source == "array_record" else len(task_data.prompts(d, config.task))
    return "table" if count <= config.text.max_cached_prompts else "encoder"


def prompt_embeddings(config, workdir: str) -> Prompts | None:
    """How a task with prompts gets its contexts (`Prompts`), else None: the prompt table (computed by
    the frozen text encoder once, cached in WORKDIR/cache) or the encoder itself, run in the step."""
    if config.task not in task_data.PROMPT_TASKS:
        return None
    cache = storage.join(workdir, "cache")
    source = prompt_source(config)
    # the tiny encoder's tokenizer is made of the prompts' words; a real one needs no list
    task_prompts = (
        task_data.prompts(config.data, config.task) if source == "table" or config.text.encoder == "tiny" else []
    )
    encoder = text_encoder.make_encoder(config, task_prompts, cache)
    if encoder.width != config.model.unet.cross_attention_dim:
        raise ValueError(
            f"config text.encoder gives {encoder.width}-wide embeddings but model.unet.cross_attention_dim="
            f"{config.model.unet.cross_attention_dim}"
        )
    negative = text_encoder.prompt_table(encoder, [config.text.negative_prompt], cache, 1)[1:]
    if source == "encoder":
        logging.info("prompts: the text encoder runs in the train step on each record's tokens")
        return Prompts("encoder", negative, encoder=encoder)
    table = text_encoder.prompt_table(encoder, task_prompts, cache, config.text.max_cached_prompts)
    return Prompts("table", negative, table=table)


CACHE_MODES = ("auto", "off")


def cache_fields(config, pre, factor: int, prompts: Prompts | None) -> tuple:
    """What of the prepared records' cache (codi_jax.pretrained.record_cache) the training step uses:
    'latent' (latent-space models; replaces the VAE encoder) and 'context' (text.prompt_source 'encoder';
    replaces the text encoder). `data.cache='off'` uses neither. A cache that does not fit the run is a
    one-line error naming the manifest's field and the config key."""
    d = config.data
    if d.cache not in CACHE_MODES:
        raise ValueError(f"config data.cache={d.cache!r} is not one of {CACHE_MODES}")
    c = catalog.record_cache(d) if d.cache == "auto" else None
    if not c:
        return ()
    if pre is None:
        logging.info("data: %s carries VAE latents, but the model is in pixel space: the cache is not used", d.path)
        return ()
    where = f"data.path={d.path!r}: {storage.join(d.path, 'manifest.json')} cache"
    off = "(or set data.cache='off')"
    for field, key in (("crop_size", "crop_size"), ("image_downscale", "image_downscale")):
        if float(c[field]) != float(d[key]):
            raise ValueError(
                f"{where}.{field}={c[field]} but config data.{key}={d[key]}: re-run the cache pass with "
                f"--{field}={d[key]} {off}"
            )
    if c["downscale_resample"] != d.downscale_resample and float(c["image_downscale"]) != 1:
        raise ValueError(
            f"{where}.downscale_resample={c['downscale_resample']!r} but config data.downscale_resample="
            f"{d.downscale_resample!r} {off}"
        )
    if d.random_flip:
        raise ValueError(
            f"{where}: the cached latents are of fixed, unflipped crops but config data.random_flip=True: set "
            f"data.random_flip=False {off}"
        )
    side = d.crop_size // factor
    want = [side, side, int(config.model.unet.in_channels)]
    if list(c["latent_shape"]) != want:
        raise ValueError(f"{where}.latent_shape={c['latent_shape']} but the teacher's VAE and U-Net make {want}")
    if c["vae"]["digest"] != record_cache.param_digest(pre.vae_params):
        raise ValueError(
            f"{where}.vae: the latents were made by another VAE ({c['vae']['folder']}) than "
            f"teacher.pretrained_path={config.teacher.pretrained_path!r}'s {off}"
        )
    fields = ("latent",)
    if c.get("text_encoder") and prompts is not None and prompts.source == "encoder":
        enc = prompts.encoder
        if list(c["context_shape"]) != [enc.max_length, enc.width]:
            raise ValueError(
                f"{where}.context_shape={c['context_shape']} but config text.encoder gives "
                f"{[enc.max_length, enc.width]}"
            )
        if c["text_encoder"]["digest"] != record_cache.param_digest(enc.params):
            raise ValueError(
                f"{where}.text_encoder: the contexts were made by another text encoder "
                f"({c['text_encoder']['folder']}) than config text.encoder={config.text.encoder!r}'s {off}"
            )
        fields += ("context",)
    logging.info(
        "data: the records carry the VAE posterior of %d px crops%s: the train step skips the VAE encoder%s",
        d.crop_size, " and text-encoder outputs" if "context" in fields else "",
        " and the text encoder" if "context" in fields else "",
    )  # fmt: skip
    return fields


def build_model(config, workdir: str, pre=None) -> Model:
    """The networks and the sample space of `config` (a diffusers teacher is loaded, or `pre` given;
    caches in WORKDIR/cache)."""
    codec, factor = None, 1
    if config.teacher.pretrained_path or pre is not None:
        config, pre, factor = with_pretrained(config, workdir, pre)
        codec = latent.LatentCodec(
            pre.vae_module,
            float(pre.vae_cfg.scaling_factor),
            float(pre.vae_cfg.shift_factor),
            sample_posterior=config.teacher.sample_latents,
        )
    denoisers = base.make_denoisers(config.model, diffusion.make_schedule(config.schedule), config.codi.boundary)
    prompts = prompt_embeddings(config, workdir)
    fields = cache_fields(config, pre, factor, prompts)
    if "context" in fields:
        prompts = dataclasses.replace(prompts, empty=prompts.encoder.embed([""]))
    space = Space(config, pre, codec, factor, prompts, fields)
    return Model(config, pre, codec, space, denoisers.diffusion.module, denoisers)
