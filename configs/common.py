"""The recipe every task shares, the two shrinks of it, and the config pieces they are made of.

Configs are the only home of numbers a user might change; every field is documented where it is set.
docs/design-choices.md explains the choices that the paper leaves open. A task file (configs/sr.py,
inpaint.py, depth.py, edit.py) is `recipe(task)` plus its own fields, then one block per variant:

    config = common.recipe("sr")      # the paper-scale recipe (a Stable Diffusion folder is required)
    if variant == "tiny":
        common.shrink_to_tiny(config)  # pixel space, embedded images, a teacher trained here
    elif variant == "smoke":
        common.shrink_to_smoke(config) # the same path at minimum size (the end-to-end tests)
"""

import ml_collections as mlc
from ml_collections import config_dict

from configs import data as data_configs

VARIANTS = ("", "tiny", "smoke")


def required(field_type):
    """A field the user must set: left unset (None), the job stops at once with one line naming it
    (codi_jax/experiment.py `check_required`). A placeholder rather than ml_collections'
    required_placeholder, which cannot be locked (config_flags locks every --config)."""
    return config_dict.placeholder(field_type)


def tiny_unet():
    """A ~1.3M-parameter pixel-space U-Net with diffusers' UNet2DConditionModel layout."""
    return mlc.ConfigDict(
        dict(
            in_channels=3,  # channels of z_t (3 in pixel space, 4 for SD latents)
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            attention_head_dim=4,  # as in diffusers/SD: the number of heads per block
            num_attention_heads=None,  # overrides attention_head_dim when set
            cross_attention_dim=None,  # None: no text cross-attention (attn2 absent)
            transformer_layers_per_block=1,
            norm_num_groups=8,
            norm_eps=1e-5,
            use_linear_projection=False,  # SD 1.x: conv proj_in/out; SD 2.x: linear
            flip_sin_to_cos=True,
            freq_shift=0,
            remat="none",  # rematerialisation of ResNet/transformer blocks in the backward pass:
            # 'none' | 'full' (recompute all) | 'dots' (keep matmul/conv outputs) |
            # 'dots_no_batch' (keep weight-only matmuls); less memory, more compute
            attention="auto",  # 'auto' (cuDNN flash attention on GPUs in bf16/fp16 where shapes allow) | 'xla' | 'cudnn'
        )
    )


def sd15_unet():
    """SD 1.x UNet2DConditionModel sizes (860M parameters), for benchmarks and loading."""
    cfg = tiny_unet()
    cfg.update(
        dict(
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    )
    cfg.cross_attention_dim = 768
    return cfg


def model(unet):
    return mlc.ConfigDict(
        dict(
            prediction="v",  # what the backbone predicts: 'eps' | 'v' | 'x' (eq 8 converts)
            dtype="float32",  # compute dtype ('float32' | 'bfloat16'); params stay float32
            unet=unet,
            adapter=dict(
                fusion="mix",  # 'mix': eq 12, learnable mu (init 0); 'residual': ControlNet zero convs
                conditioning_embedding_out_channels=(16,),  # len-1 stride-2 convs; SD latents: (16, 32, 96, 256)
                cond_channels=3,  # channels of the image condition c
                # What the duplicated encoder sees: 'sample_and_cond' z_t + embed(c) (ControlNet);
                # 'cond' embed(c) only (eq 12's h_eta(c)); 'cond_as_sample' c in z_t's place + embed(c)
                # (zero-initialised), for pixel-space conditions of the sample's shape.
                input="sample_and_cond",
                mu_per_feature=False,  # 'mix': one mu per fused feature (each skip and the mid block) instead of one scalar
            ),
        )
    )


def schedule_cosine():
    return mlc.ConfigDict(
        dict(
            kind="cosine",  # 'cosine' (continuous, models trained here) | 'scaled_linear' | 'linear' (SD)
            num_timesteps=1000,  # T: timesteps are in [0, T]
            logsnr_min=-10.0,  # cosine: log-SNR at t = T (alpha_T ~ 7e-3)
            logsnr_max=8.0,  # cosine: log-SNR at t = 0 (sigma_0 ~ 0.018, near SD's 0.029)
            beta_start=0.00085,  # discrete schedules only
            beta_end=0.012,
        )
    )


def train(num_steps, batch_size, lr):
    """Optimisation and bookkeeping of one training stage."""
    return mlc.ConfigDict(
        dict(
            num_steps=num_steps,
            batch_size=batch_size,  # global batch, split over the 'data' mesh axis and processes
            lr=lr,  # peak learning rate of AdamW
            warmup_steps=100,  # linear warmup, then constant
            weight_decay=0.0,
            mu_lr_multiplier=1.0,  # learning-rate factor for the scalar mu of eq 12 (Adam moves it ~lr a step)
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,  # global-norm clip
            grad_accum_steps=1,  # microbatches per update (scan; same update as the whole batch, less memory)
            ema_decay=0.999,  # EMA of the trainable params (theta^- for CoDi, eval weights)
            ema_warmup=False,  # decay min(ema_decay, (1+step)/(10+step)): for training from random init
            log_every=25,  # progress line + TensorBoard scalars
            checkpoint_every=200,  # Orbax saves (async); the last step is always saved
            keep_checkpoints=2,
            image_every=0,  # TensorBoard sample images every N steps (0: only at the end)
            profile_steps=(
                0,
                0,
            ),  # (start, stop): a JAX profiler trace of steps start+1..stop in tensorboard/ ((0, 0): none)
        )
    )


def codi_method():
    """CoDi (Algorithm 1, eq 14, 15) and the choices of the paper and its ablations."""
    return mlc.ConfigDict(
        dict(
            mode="full",  # 'full': CoDi, everything trains; 'pe': PE-CoDi, backbone frozen (sec 4.4)
            zs_predictor="prev",  # z_s from: 'prev' (eq 14), 'ddim' (own eps_hat, eq 7), 'teacher' (frozen pretrained)
            d_eps="l2",  # noise-consistency distance: 'l2' | 'pseudo_huber'
            d_x="l2",  # conditional-guidance distance: 'l2' | 'pseudo_huber'
            huber_c=0.03,  # pseudo-Huber constant (per-element error scale)
            guidance_weight=1.0,  # lambda on d_x in eq 15; 0 switches conditional guidance off
            guidance_space="latent",  # d_x on 'latent's or on 'pixel's through the VAE decoder (Fig. 2); same for pixel models
            consistency_weight=1.0,  # weight on the consistency term (0: none at all, an ablation)
            consistency_space="eps",  # consistency in 'eps' (noise space, eq 15) or 'x' (signal space, as consistency
            # models; Table 3's "- noise-consistency" row and the CM-II baseline)
            eps_target="noise_boundary",  # eq 15's noise target near s = 0: 'noise_boundary' (eq 17 in noise space: at
            # s = 0 the noise that built z_s, elsewhere the EMA network's own eps) | 'wrapped'
            # (eps re-derived from the boundary-wrapped x', ~0.01 z_0 at s = 0: the old
            # behaviour, docs/design-choices.md)
            init="pretrained",  # start from: 'pretrained' (teacher backbone + duplicated encoder, eq 12),
            # 'finetuned' (the finetune stage's model: CM-II; a 'teacher' z_s predictor is
            # then the frozen finetuned model, given the condition), 'random' (Fig. 7)
            delta_t=20,  # s = t - delta_t, in timesteps (Algorithm 1 says 1; public code 20)
            t_per_sample=False,  # False: one t shared by the batch, the paper's choice (sec 5.3 "Sampling of z_t",
            # Fig. 7); True: one t per sample, the "previous protocol" of [23, 36]. The
            # tiny recipes use True: measured better there (docs/results-notes.md)
            boundary=dict(
                enabled=True,  # eq 17/18 skip scalings on the signal prediction
                sigma_data=0.5,
                time_scale=10.0,  # u = time_scale * t (t in timesteps), as diffusers' LCM
            ),
        )
    )


def finetune(num_steps, batch_size, lr):
    """Conditional finetuning with the plain diffusion loss: the paper's finetuned-LDM / ControlNet
    baseline, and the first stage of the two-stage baselines (CM-II, GD-II)."""
    return mlc.ConfigDict(
        dict(
            mode="full",  # 'full': backbone and adapter train (LDM row); 'pe': adapter only (ControlNet)
            checkpoint="",  # a workdir whose finetune/ stage is complete: load it instead of training
            train=train(num_steps, batch_size, lr),
        )
    )


def progressive_distillation(num_steps, batch_size, lr):
    """GD-II: progressive distillation of the finetuned model (Salimans & Ho 2022), one stage per halving."""
    return mlc.ConfigDict(
        dict(
            start_steps=16,  # DDIM steps of the finetuned teacher of the first round
            final_steps=4,  # the last round's student steps (start_steps / final_steps a power of two)
            train=train(num_steps, batch_size, lr),  # per round
        )
    )


def evaluation():
    return mlc.ConfigDict(
        dict(
            num_examples=48,  # held-out crops evaluated
            steps=(1, 2, 4),  # few-step sampler step counts evaluated
            samplers=("deterministic",),  # each of: 'deterministic' (DDIM/PF-ODE, eq 7) | 'stochastic' (fresh noise
            # per step, consistency multistep) | 'dpmpp_2m' (DPM-Solver++ 2M); all x all steps
            teacher_ddim_steps=0,  # >0 also samples the unconditional teacher with N-step DDIM (sanity grid)
            grid_examples=8,  # rows in each PNG grid
            previews=True,  # TensorBoard sample images at the end of each stage (and every train.image_every)
            preview_examples=4,  # held-out crops in each preview picture
            preview_teacher_steps=16,  # DDIM steps of the teacher's preview samples (teacher_ddim_steps when > 0)
            fid_weights="",  # local FID InceptionV3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth,
            # or .safetensors): adds 'fid' (docs/metrics.md says where to get them)
            lpips_weights="",  # 'alexnet.pth,alex.pth': torchvision AlexNet + the lpips package's lin weights: adds 'lpips'
            clip_model="",  # a local transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14 saved with
            # save_pretrained): adds 'clip_score' for tasks with prompts (depth, edit)
            batch_size=16,
            seed=1234,
        )
    )


def text():
    """Text conditioning of the tasks with prompts (depth captions, editing instructions):
    codi_jax/pretrained/text_encoder.py (encoder, prompt table) and codi_jax/methods/text.py (dropout, guidance)."""
    return mlc.ConfigDict(
        dict(
            encoder="tiny",  # 'tiny' (seeded random CLIP text model + a tokenizer of the prompts' words: offline
            # recipes) | 'pretrained' (teacher.pretrained_path's text_encoder/ + tokenizer/) |
            # a folder holding text_encoder/ and tokenizer/
            dropout=0.1,  # training: probability that an example's prompt is replaced by the empty one
            # (needed by classifier-free guidance)
            guidance_scale=1.0,  # sampling: classifier-free guidance weight w (1: off, one model pass per step)
            negative_prompt="",  # sampling: the prompt guidance steers away from
            max_cached_prompts=4096,  # distinct prompts whose embeddings are cached (in device memory)
            # How a training example's prompt becomes its context: 'table' (the embeddings of the dataset's
            # distinct prompts, computed once, looked up in the step) | 'encoder' (each record's tokens
            # travel with it; the frozen text encoder runs inside the jitted step: any number of prompts) |
            # 'auto' (table up to max_cached_prompts distinct prompts, else encoder)
            prompt_source="auto",
            tiny=dict(width=32, intermediate=64, layers=2, heads=2, max_length=16, seed=0),  # the 'tiny' encoder
        )
    )


def mesh():
    """Device mesh and the logical axis rules (codi_jax/sharding.py).

    Examples: 8 GPUs data parallel: ici=(-1, 1, 1); FSDP over 8: ici=(1, -1, 1);
    a 2-slice TPU pod with FSDP inside each slice: ici=(1, -1, 1), dcn=(2, 1, 1).
    """
    return mlc.ConfigDict(
        dict(
            axes=("data", "fsdp", "tensor"),
            ici=(-1, 1, 1),  # devices per axis inside a slice (or host group); one -1 takes the rest
            dcn=(1, 1, 1),  # slices per axis (multi-slice TPU); must multiply to the number of slices
            # Logical name -> mesh axes. Modules name weight dimensions (embed/mlp/heads/conv_in/conv_out/
            # vocab) and activations (batch/height/width/channels); a name left out is replicated.
            rules=dict(
                batch=("data", "fsdp"),  # batches: data parallel over data and fsdp
                embed=("fsdp",),  # weights' input dims: FSDP (params, EMA, Adam moments stored 1/fsdp)
                conv_in=("fsdp",),
                mlp=("tensor",),  # weights' output dims: tensor parallel
                heads=("tensor",),
                conv_out=("tensor",),
                vocab=("tensor",),
                height=(),
                width=(),
                channels=(),
            ),
        )
    )


def teacher():
    """The model CoDi starts from."""
    return mlc.ConfigDict(
        dict(
            # A diffusers-format folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/): latent-space CoDi;
            # model.unet, the schedule and the prediction type follow it. Required by the paper recipe;
            # '' (the tiny recipes) trains a pixel-space teacher here with `pretrain`.
            pretrained_path=required(str),
            checkpoint="",  # a teacher checkpoint dir of ours (a finished run's WORKDIR); '' = pretrain one in WORKDIR/teacher
            prompt="",  # text prompt of the training context (SD's empty prompt: unconditional)
            allow_pickle=False,  # accept .bin/.ckpt weights (pickle can run code); safetensors otherwise
            sample_latents=True,  # targets: a sample of the VAE posterior (SD training) or its mean
        )
    )


def recipe(task: str) -> mlc.ConfigDict:
    """The paper-scale recipe: latent-space CoDi from Stable Diffusion weights (SD 1.x/2.x), 512 px,
    bf16, AdamW lr 1e-5, global batch 128 (the public code's recipe: batch 2 per device on 64), one t
    per batch (sec 5.3), EMA 0.9999."""
    config = mlc.ConfigDict()
    config.variant = ""  # the variant the task file was asked for ('', 'tiny', 'smoke'): recorded, never tested
    config.task = task  # 'sr' | 'inpaint' | 'depth' | 'edit'
    config.seed = 0
    # XLA's compiled programs kept across runs (JAX's persistent compilation cache): 'auto' =
    # $JAX_COMPILATION_CACHE_DIR if set, else a .jax_cache folder beside the workdir (WORKDIR/../.jax_cache);
    # '' = off; else a folder (gs:// too).
    config.compilation_cache_dir = "auto"
    config.method = "codi"  # 'codi' (CoDi, PE-CoDi, CM-II and ablations, by codi.*) | 'finetune' | 'gd' (GD-II)
    config.data = data_configs.get_data_config()
    config.data.crop_size = 512
    config.schedule = schedule_cosine()
    config.schedule.kind = "scaled_linear"  # SD's; replaced by the folder's scheduler config
    config.model = model(sd15_unet())  # the U-Net is replaced by the folder's unet/config.json
    config.model.prediction = "auto"  # from the folder's scheduler config (eps for SD 1.x, v for SD 2.x)
    config.model.adapter.conditioning_embedding_out_channels = (16, 32, 96, 256)  # 8x: pixels -> latents
    config.model.dtype = "bfloat16"
    config.teacher = teacher()
    # Pretraining a teacher from scratch (only without teacher.pretrained_path: the tiny recipes).
    config.pretrain = train(num_steps=100_000, batch_size=128, lr=1e-4)
    config.pretrain.update(ema_decay=0.9999, log_every=100, checkpoint_every=2000)
    config.codi = codi_method()
    config.codi.train = train(num_steps=100_000, batch_size=128, lr=1e-5)
    config.codi.train.update(ema_decay=0.9999, log_every=100, checkpoint_every=2000)
    config.finetune = finetune(num_steps=100_000, batch_size=128, lr=1e-5)
    config.finetune.train.update(ema_decay=0.9999, log_every=100, checkpoint_every=2000)
    config.gd = progressive_distillation(num_steps=10_000, batch_size=128, lr=1e-5)
    config.gd.update(start_steps=64, final_steps=4)
    config.gd.train.update(ema_decay=0.9999, log_every=100, checkpoint_every=2000)
    config.eval = evaluation()
    config.text = text()  # used by tasks with prompts (depth, edit)
    config.text.encoder = "pretrained"
    config.mesh = mesh()  # devices, axes and logical axis rules (default: all devices data parallel)
    return config


def shrink_to_tiny(config: mlc.ConfigDict) -> None:
    """The tiny recipe: pixel space, the embedded photographs, a ~1.3M-parameter teacher pretrained
    here; the whole path on a CPU (about 20-35 minutes on 2 cores)."""
    config.teacher.pretrained_path = ""
    config.data.crop_size = 32
    config.schedule = schedule_cosine()
    config.model = model(tiny_unet())
    config.text.encoder = "tiny"
    config.pretrain = train(num_steps=1200, batch_size=16, lr=1e-3)
    config.pretrain.update(ema_decay=0.995, ema_warmup=True)  # from random init: warm the EMA up
    # theta^- starts at the teacher; a 0.99 EMA follows a 600-step run (0.999 would still be ~55% the
    # initial model at the end). mu needs a larger rate to move in 600 steps.
    config.codi.train = train(num_steps=600, batch_size=16, lr=1e-3)
    config.codi.train.update(ema_decay=0.99, mu_lr_multiplier=5.0)
    config.finetune.train = train(num_steps=600, batch_size=16, lr=1e-3)
    config.finetune.train.update(ema_decay=0.99, mu_lr_multiplier=5.0)
    config.gd.update(start_steps=16, final_steps=4)
    config.gd.train = train(num_steps=300, batch_size=16, lr=1e-4)
    config.gd.train.update(ema_decay=0.99, warmup_steps=20)
    # One t per sample, not the paper's one per batch: at this scale it is the better of the two
    # (the reproduction's Fig. 7 rows, docs/results-notes.md).
    config.codi.t_per_sample = True


def shrink_to_smoke(config: mlc.ConfigDict) -> None:
    """The tiny path at minimum size, for the end-to-end tests: every layer kind, the shortest compile."""
    shrink_to_tiny(config)
    config.data.crop_size = 16
    # One down/up block (with attention) and the mid block.
    config.model.unet.update(
        block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        norm_num_groups=4,
    )
    config.model.adapter.conditioning_embedding_out_channels = (8,)
    # One checkpoint per stage, at its end (Orbax pays ~4 ms per array per save; resumption is
    # tested in tests/test_train.py with its own cadence).
    config.pretrain.update(num_steps=8, batch_size=4, warmup_steps=2, log_every=4, checkpoint_every=8)
    config.codi.train.update(num_steps=8, batch_size=4, warmup_steps=2, log_every=4, checkpoint_every=8)
    config.finetune.train.update(num_steps=4, batch_size=4, warmup_steps=2, log_every=4, checkpoint_every=4)
    config.gd.update(start_steps=4, final_steps=2)
    config.gd.train.update(num_steps=2, batch_size=4, warmup_steps=1, log_every=2, checkpoint_every=2)
    config.eval.update(num_examples=4, batch_size=4, grid_examples=4, steps=(1, 2))


def check_variant(variant: str, path: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of {path}; use 'tiny', 'smoke' or none")
