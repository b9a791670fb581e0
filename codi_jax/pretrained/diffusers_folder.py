"""A diffusers-format Stable Diffusion folder: configs and weights into our configs and params.

Layout read (as written by diffusers' `save_pretrained`):
  model_index.json
  unet/config.json          + diffusion_pytorch_model[.fp16].safetensors (or a sharded .index.json)
  vae/config.json           + diffusion_pytorch_model[.fp16].safetensors
  text_encoder/config.json  + model[.fp16].safetensors
  tokenizer/                  (CLIPTokenizer files)
  scheduler/scheduler_config.json

Weights are read from safetensors. Pickle-based files (.bin, .ckpt, .pt) can run code when
loaded, so they are refused unless the caller opts in (`allow_pickle`, config
`teacher.allow_pickle`); then torch loads them with `weights_only=True`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from codi_jax.models import clip_text
from codi_jax.models import vae as vae_lib
from codi_jax.pretrained import convert, safetensors_io

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def component_config(folder: str, what: str) -> dict:
    """config.json of one component folder (one-line errors naming what is missing)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    return read_json(os.path.join(folder, "config.json"))


def check_folder(folder: str, components=("unet", "scheduler")) -> dict:
    """model_index.json of a diffusers pipeline folder, after checking the components exist."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"pretrained model folder {folder} does not exist")
    index = read_json(os.path.join(folder, "model_index.json"))
    for comp in components:
        if not os.path.isdir(os.path.join(folder, comp)):
            raise FileNotFoundError(f"pretrained model folder {folder} has no {comp}/ component")
    return index


# --------------------------------------------------------------------------- weights


def weights_path(component_dir: str, stem: str, *, allow_pickle: bool = False) -> str:
    """The weights file of one component: `stem.safetensors`, its fp16 variant, or a shard index."""
    for name in (
        f"{stem}.safetensors",
        f"{stem}.fp16.safetensors",
        f"{stem}.safetensors.index.json",
        f"{stem}.fp16.safetensors.index.json",
    ):
        path = os.path.join(component_dir, name)
        if os.path.isfile(path):
            return path
    if not os.path.isdir(component_dir):
        raise FileNotFoundError(f"{component_dir} does not exist")
    pickled = sorted(f for f in os.listdir(component_dir) if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        if allow_pickle:
            return os.path.join(component_dir, pickled[0])
        raise ValueError(
            f"{os.path.join(component_dir, pickled[0])} is a pickle-based checkpoint, which can run "
            "arbitrary code when loaded; convert it to safetensors, or opt in with "
            "--config.teacher.allow_pickle=True if you trust its source"
        )
    raise FileNotFoundError(f"{component_dir} has no {stem}.safetensors weights")


def load_weights(path: str) -> dict[str, np.ndarray]:
    """A flat name -> array dict from a safetensors file, a shard index, or (opted in) a pickle."""
    if path.endswith(".index.json"):
        index = read_json(path)
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(safetensors_io.load(os.path.join(os.path.dirname(path), shard)))
        return out
    if path.endswith(".safetensors"):
        return safetensors_io.load(path)
    import torch  # only for the opted-in pickle formats

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


# --------------------------------------------------------------------------- U-Net


def _require(d: dict, key: str, allowed, what: str):
    value = d.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(f"{what} config {key}={value!r} is not supported (supported: {list(allowed)})")


def unet_config_from_diffusers(d: dict, what: str = "unet") -> mlc.ConfigDict:
    """Our U-Net config from a diffusers `UNet2DConditionModel` (or `ControlNetModel`) config.json."""
    for key, allowed in (
        ("act_fn", ("silu",)),
        ("center_input_sample", (False,)),
        ("time_embedding_type", ("positional",)),
        ("class_embed_type", (None,)),
        ("addition_embed_type", (None,)),
        ("encoder_hid_dim", (None,)),
        ("conv_in_kernel", (3,)),
        ("conv_out_kernel", (3,)),
        ("resnet_time_scale_shift", ("default",)),
        ("dual_cross_attention", (False,)),
        ("only_cross_attention", (False,)),
        ("time_cond_proj_dim", (None,)),
        ("num_class_embeds", (None,)),
        ("mid_block_type", ("UNetMidBlock2DCrossAttn",)),
        ("downsample_padding", (1,)),
        ("mid_block_scale_factor", (1, 1.0)),
        ("timestep_post_act", (None,)),
    ):
        _require(d, key, allowed, what)
    for key in ("layers_per_block", "transformer_layers_per_block"):
        if not isinstance(d.get(key, 1), int):
            raise ValueError(f"{what} config {key}={d[key]!r}: only one value for all blocks is supported")
    heads = d.get("attention_head_dim", 8)
    n_heads = d.get("num_attention_heads")
    return mlc.ConfigDict(
        dict(
            in_channels=int(d.get("in_channels", 4)),
            out_channels=int(d.get("out_channels", 4)),
            block_out_channels=tuple(d["block_out_channels"]),
            down_block_types=tuple(d.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))),
            up_block_types=tuple(d.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)),
            layers_per_block=int(d.get("layers_per_block", 2)),
            attention_head_dim=heads if isinstance(heads, int) else tuple(heads),
            num_attention_heads=n_heads if n_heads is None or isinstance(n_heads, int) else tuple(n_heads),
            cross_attention_dim=d.get("cross_attention_dim", 1280),
            transformer_layers_per_block=int(d.get("transformer_layers_per_block", 1)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
            freq_shift=float(d.get("freq_shift", 0)),
            remat="none",
            attention="auto",
        )
    )


def unet_config_to_diffusers(cfg, sample_size: int) -> dict:
    """The config.json of a diffusers `UNet2DConditionModel` equal to our U-Net config."""
    heads = cfg.attention_head_dim
    n_heads = cfg.get("num_attention_heads")
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": int(sample_size),
        "in_channels": int(cfg.in_channels),
        "out_channels": int(cfg.out_channels),
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": list(cfg.down_block_types),
        "up_block_types": list(cfg.up_block_types),
        "layers_per_block": int(cfg.layers_per_block),
        "attention_head_dim": heads if isinstance(heads, int) else list(heads),
        "num_attention_heads": n_heads if n_heads is None or isinstance(n_heads, int) else list(n_heads),
        "cross_attention_dim": cfg.cross_attention_dim,
        "transformer_layers_per_block": int(cfg.transformer_layers_per_block),
        "norm_num_groups": int(cfg.norm_num_groups),
        "norm_eps": float(cfg.norm_eps),
        "use_linear_projection": bool(cfg.use_linear_projection),
        "flip_sin_to_cos": bool(cfg.flip_sin_to_cos),
        "freq_shift": float(cfg.freq_shift),
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }


def schedule_config_from_diffusers(d: dict) -> tuple[mlc.ConfigDict, str]:
    """(our schedule config, our prediction type) from `scheduler/scheduler_config.json`."""
    kind = d.get("beta_schedule", "linear")
    if kind not in ("scaled_linear", "linear"):
        raise ValueError(f"scheduler config beta_schedule={kind!r} is not supported (supported: scaled_linear, linear)")
    if d.get("trained_betas") is not None:
        raise ValueError("scheduler config trained_betas is set: explicit beta tables are not supported")
    pred = d.get("prediction_type", "epsilon")
    if pred not in _PREDICTION:
        raise ValueError(f"scheduler config prediction_type={pred!r} is not one of {sorted(_PREDICTION)}")
    cfg = mlc.ConfigDict(
        dict(
            kind=kind,
            num_timesteps=int(d.get("num_train_timesteps", 1000)),
            logsnr_min=-10.0,
            logsnr_max=8.0,
            beta_start=float(d.get("beta_start", 0.0001)),
            beta_end=float(d.get("beta_end", 0.02)),
        )
    )
    return cfg, _PREDICTION[pred]


def load_params(component_dir: str, stem: str, target, *, what: str, allow_pickle: bool = False, **kw):
    """Read a component's weights and fill the Flax tree `target` (shapes) with them."""
    state = load_weights(weights_path(component_dir, stem, allow_pickle=allow_pickle))
    return convert.torch_to_flax(state, target, what=what, **kw)


def unet_param_shapes(cfg, sample_size: int = 8):
    """Shapes of our U-Net's params for `cfg` (no compute: jax.eval_shape)."""
    import jax
    import jax.numpy as jnp

    from codi_jax.models import layers
    from codi_jax.models import unet as unet_lib

    module = unet_lib.UNet(cfg)
    ctx = None if cfg.cross_attention_dim is None else jnp.zeros((1, 1, cfg.cross_attention_dim))
    z = jnp.zeros((1, sample_size, sample_size, cfg.in_channels))
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), z, jnp.zeros((1,)), ctx))["params"]
    return module, layers.unbox(shapes)


def load_unet(unet_dir: str, *, allow_pickle: bool = False):
    """(our U-Net config, float32 params) from a diffusers `unet/` folder."""
    cfg = unet_config_from_diffusers(component_config(unet_dir, "unet"))
    _, shapes = unet_param_shapes(cfg)
    params = load_params(
        unet_dir, "diffusion_pytorch_model", shapes, what=f"unet ({unet_dir})", allow_pickle=allow_pickle
    )
    return cfg, params


def load_vae(folder: str, dtype=jnp.float32, *, allow_pickle: bool = False):
    """(module, params, cfg) from a diffusers VAE folder (config.json + safetensors weights)."""
    cfg = vae_lib.vae_config_from_diffusers(component_config(folder, "VAE"))
    weights = weights_path(folder, "diffusion_pytorch_model", allow_pickle=allow_pickle)
    module = vae_lib.AutoencoderKL(cfg, dtype=dtype)
    state = load_weights(weights)
    try:
        params = convert.torch_to_flax(
            state, vae_lib.init_shapes(module, cfg), what="vae", dtype=np.float32, rename=vae_lib.OLD_ATTENTION_NAMES
        )
    except convert.ConversionError as e:
        raise convert.ConversionError(f"{weights}: {e}") from None
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return module, params, cfg


def load_text_encoder(folder: str, dtype=jnp.float32, *, allow_pickle: bool = False):
    """(module, params, cfg) from a transformers text-encoder folder (`config.json` and
    `model.safetensors`, or `model.fp16.safetensors` when the former is absent). The
    weights, whatever their float dtype, become float32 parameters."""
    cfg = clip_text.clip_text_config_from_transformers(component_config(folder, "text encoder"))
    state = load_weights(weights_path(folder, "model", allow_pickle=allow_pickle))

    module = clip_text.CLIPTextModel(cfg, dtype=dtype)
    ids = jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)
    target = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]
    params = convert.torch_to_flax(
        state,
        target,
        what="text_encoder",
        # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix.
        rename={r"^(?!text_model\.)": "text_model."},
        # A non-persistent buffer, present in checkpoints written by old transformers versions.
        ignore=("text_model.embeddings.position_ids",),
    )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return module, params, cfg


def load_tokenizer(folder: str):
    """transformers' `CLIPTokenizer` from a local folder (vocab.json + merges.txt or tokenizer.json)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
