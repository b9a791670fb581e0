"""What every method shares: the denoiser (network output -> (x_hat, eps_hat)) and params.

Params are plain pytrees {'unet': backbone, 'adapter': eq 12 adapter}. A method splits
them into `trainable` (optimised and EMA'd) and `frozen` (neither).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from codi_jax import diffusion
from codi_jax.models import adapter as adapter_lib
from codi_jax.models import layers

MODEL_KEYS = ("unet", "adapter")


def compute_dtype(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"config model.dtype={name!r} is not one of 'float32', 'bfloat16', 'float16'") from None


def make_module(model_cfg) -> adapter_lib.AdaptedUNet:
    return adapter_lib.AdaptedUNet(model_cfg.unet, model_cfg.adapter, compute_dtype(model_cfg.dtype))


def merge(trainable, frozen):
    """Full model params from the trainable and frozen parts (top-level keys never overlap)."""
    out = {k: v for k, v in frozen.items() if k in MODEL_KEYS}
    out.update({k: v for k, v in trainable.items() if k in MODEL_KEYS})
    return out


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """Wraps the network so downstream code sees the pair (x_hat, eps_hat) (eq 8).

    `boundary` = (sigma_data, time_scale) applies eq 17/18 to the signal prediction.
    """

    module: Any
    schedule: diffusion.Schedule
    prediction: str
    boundary: tuple[float, float] | None = None

    def raw(self, params, z, t, cond=None, context=None):
        return self.module.apply({"params": params}, z, t, cond, context)

    def __call__(self, params, z, t, cond=None, context=None):
        return self.both(params, z, t, cond, context)[1]

    def both(self, params, z, t, cond=None, context=None):
        """((x_hat, eps_hat) of the network, eq 8; the same with the boundary scalings, eq 17),
        from one network pass (the two are equal without `boundary`)."""
        t = jnp.broadcast_to(jnp.asarray(t), (z.shape[0],))
        alpha, sigma = self.schedule.alpha_sigma(t)
        out = self.raw(params, z, t, cond, context)
        net = diffusion.to_x_eps(out, z, alpha, sigma, self.prediction)
        if self.boundary is None:
            return net, net
        sigma_data, time_scale = self.boundary
        return net, diffusion.apply_boundary(net[0], z, t, alpha, sigma, sigma_data=sigma_data, time_scale=time_scale)


@dataclasses.dataclass(frozen=True)
class Denoisers:
    """One network, two readings: a diffusion model (eq 8) and CoDi's consistency function, the same
    with the boundary scalings of eq 17/18 (equal to it when `codi.boundary.enabled` is off)."""

    diffusion: Denoiser
    consistency: Denoiser


def make_denoisers(model_cfg, schedule: diffusion.Schedule, boundary_cfg) -> Denoisers:
    """The (diffusion, consistency) denoisers of config sections `model` and `codi.boundary`."""
    module = make_module(model_cfg)
    b = boundary_cfg
    boundary = (float(b.sigma_data), float(b.time_scale)) if b.enabled else None
    return Denoisers(
        Denoiser(module, schedule, model_cfg.prediction),
        Denoiser(module, schedule, model_cfg.prediction, boundary),
    )


def _dummy_inputs(model_cfg, image_size: int, cond_size: int | None):
    ch = model_cfg.unet.in_channels
    z = jnp.zeros((1, image_size, image_size, ch), jnp.float32)
    cs = cond_size or image_size
    cond = jnp.zeros((1, cs, cs, model_cfg.adapter.cond_channels), jnp.float32)
    ctx = None
    if model_cfg.unet.cross_attention_dim is not None:
        ctx = jnp.zeros((1, 1, model_cfg.unet.cross_attention_dim), jnp.float32)
    return z, jnp.zeros((1,)), cond, ctx


_INIT_CACHE: dict = {}


def _init_programs(module, model_cfg, image_size: int, cond_size: int | None):
    """(jitted init, abstract params) of this module and input sizes, built once per process.

    Keyed by the module's repr (a dataclass: every attribute, the whole config) and the dummy
    inputs' shapes. Every stage, restore and sampler initialises the same model: without the
    cache each traced the whole network again (~2 s for the smoke U-Net, more at SD size).
    """
    inputs = _dummy_inputs(model_cfg, image_size, cond_size)
    key = (repr(module), tuple((x.shape, str(x.dtype)) if x is not None else None for x in inputs))
    if key not in _INIT_CACHE:
        if len(_INIT_CACHE) >= 16:
            _INIT_CACHE.pop(next(iter(_INIT_CACHE)))
        init = jax.jit(lambda rng: module.init(rng, *_dummy_inputs(model_cfg, image_size, cond_size))["params"])
        _INIT_CACHE[key] = (init, jax.eval_shape(init, jax.random.PRNGKey(0)))
    return _INIT_CACHE[key]


def init_model_params(module, model_cfg, rng, image_size: int, cond_size: int | None = None):
    """Random init of {'unet', 'adapter'} with shapes from a dummy batch of one.

    image_size: side of z_t (pixels, or latents); cond_size: side of the condition c
    (default image_size; the pixel size for latent models).
    """
    init, _ = _init_programs(module, model_cfg, image_size, cond_size)
    return layers.unbox(init(rng))  # jitted: eager init is slow


def abstract_params(module, model_cfg, image_size: int, cond_size: int | None = None):
    """Shapes of {'unet', 'adapter'} with their logical-name boxes (no compute: jax.eval_shape)."""
    return _init_programs(module, model_cfg, image_size, cond_size)[1]


def model_logical_names(module, model_cfg, image_size: int, cond_size: int | None = None):
    """{'unet': ..., 'adapter': ...} trees of the logical axis names the modules put on weights."""
    return layers.logical_names(abstract_params(module, model_cfg, image_size, cond_size))


def example_keys(rng, batch_size: int):
    """Per-example PRNG keys, shape (batch_size, 2).

    The train step passes one key per example (split from the step's key over the global
    batch), so every example's noise and t are the same however the batch is sharded or
    split into accumulation microbatches. Given a single key, split it here.
    """
    rng = jnp.asarray(rng)
    if rng.ndim == 2:
        if rng.shape[0] != batch_size:
            raise ValueError(f"{rng.shape[0]} per-example keys for a batch of {batch_size}")
        return rng
    return jax.random.split(rng, batch_size)


def split_each(keys, num: int = 2):
    """Split every per-example key: a tuple of `num` key arrays of keys' shape."""
    parts = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(parts[:, i] for i in range(num))


def normal_each(keys, shape, dtype=jnp.float32):
    """Standard normal noise of `shape` (batch first), drawn example by example."""
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)


def per_batch_or_sample(keys, batch_size, per_sample: bool, low: int, high: int):
    """Integer timesteps in [low, high]: one per sample, or one shared by the batch (drawn
    from the first example's key: one per microbatch under gradient accumulation)."""
    keys = example_keys(keys, batch_size)
    if per_sample:
        return jax.vmap(lambda k: diffusion.sample_timesteps(k, (), low=low, high=high))(keys)
    t = diffusion.sample_timesteps(keys[0], (), low=low, high=high)
    return jnp.broadcast_to(t, (batch_size,))


def adapted(params, unet=None):
    """Eq 12's starting point from freshly initialised {'unet', 'adapter'} params: {unet: `unet` (the
    pretrained backbone; params' own random one when None), adapter: a duplicate of its encoder
    (conv_in, time embedding, down and mid blocks) with mu = 0 / zero convolutions}, so the adapted
    model equals the backbone exactly."""
    unet = params["unet"] if unet is None else unet
    return {"unet": unet, "adapter": adapter_lib.init_adapter_from_backbone(params["adapter"], unet)}


def init_adapted_params(module, model_cfg, rng, image_size: int, cond_size: int | None = None, unet=None):
    """`adapted` on a random init of the model (shapes from `init_model_params`)."""
    return adapted(init_model_params(module, model_cfg, rng, image_size, cond_size), unet)
