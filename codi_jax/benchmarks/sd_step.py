"""CoDi train-step cost at Stable Diffusion size: compile time, step time, peak memory.

  python -m codi_jax.benchmarks.sd_step --unet=sd15 --batch_sizes=1,4,16 --out=sd_step.json
  python -m codi_jax.benchmarks.sd_step --unet=tiny --latent=8 --batch_sizes=1,2   # CPU smoke

Random weights (the shapes are what costs), the U-Net plus its eq 12 adapter, the real CoDi
loss and train step of `codi_jax.train` (AdamW, EMA, donation) on `--latent`-sized latents
with a pixel condition 8x larger, compute in `--dtype`. The step is compiled ahead of time,
so compile time is measured apart from step time. Peak memory comes from the device's
memory_stats where the backend reports it (GPUs, TPUs; not the CPU).
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from codi_jax import diffusion, logging_utils, train
from codi_jax.methods import base, codi
from configs import common

_UNET = flags.DEFINE_enum("unet", "sd15", ["sd15", "tiny"], "U-Net size.")
_LATENT = flags.DEFINE_integer("latent", 64, "Latent side (64 = 512 px for SD).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Global batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per batch size (after one warm-up step).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_FUSION = flags.DEFINE_enum("fusion", "mix", ["mix", "residual"], "Adapter fusion.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "U-Net remat policy.")
_OUT = flags.DEFINE_string("out", "", "Write the figures as JSON here.")


def _config():
    unet = common.sd15_unet() if _UNET.value == "sd15" else common.tiny_unet()
    if _UNET.value == "tiny":
        unet.in_channels = unet.out_channels = 4
        unet.cross_attention_dim = 32
    unet.remat = _REMAT.value
    model = common.model(unet)
    model.prediction = "eps"
    model.dtype = _DTYPE.value
    model.adapter.fusion = _FUSION.value
    model.adapter.conditioning_embedding_out_channels = (16, 32, 96, 256)
    cfg = common.codi_method()
    cfg.train = common.train(num_steps=100, batch_size=1, lr=1e-5)
    return model, cfg


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(batch_size: int) -> dict:
    model_cfg, cfg = _config()
    denoisers = base.make_denoisers(model_cfg, _sd_schedule(), cfg.boundary)
    module = denoisers.diffusion.module
    side = _LATENT.value
    params = jax.jit(lambda r: base.init_model_params(module, model_cfg, r, side, side * 8))(jax.random.PRNGKey(0))
    params = base.adapted(params)
    trainable, frozen = codi.split_params(params, "full", "prev")
    tx, lr = train.make_optimizer(cfg.train)
    state = train.create_state(trainable, frozen, tx, jax.random.PRNGKey(1))
    del params, trainable
    loss_fn = functools.partial(codi.codi_loss, denoiser=denoisers.consistency, teacher=denoisers.diffusion, cfg=cfg)
    step = jax.jit(train.make_train_step(loss_fn, tx, lr, 0.9999), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((batch_size, side, side, 4)), jnp.float32),
        "cond": jnp.asarray(rng.uniform(-1, 1, (batch_size, side * 8, side * 8, 3)), jnp.float32),
        "context": jnp.asarray(rng.standard_normal((batch_size, 77, model_cfg.unet.cross_attention_dim)), jnp.float32),
    }
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops") if hasattr(compiled, "cost_analysis") else None
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    step_s = (time.perf_counter() - t0) / _STEPS.value
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
    return {
        "batch_size": batch_size,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "images_per_s": round(batch_size / step_s, 2),
        "trainable_params": int(n_params),
        "flops_per_step": flops,
        "peak_bytes": _peak_bytes(),
        "loss": float(m["loss"]),
    }


def _sd_schedule():
    import ml_collections as mlc

    return diffusion.make_schedule(
        mlc.ConfigDict(dict(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012))
    )


def main(argv):
    del argv
    rows = []
    for b in [int(v) for v in _BATCHES.value]:
        row = measure(b)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "unet": _UNET.value,
        "latent": _LATENT.value,
        "dtype": _DTYPE.value,
        "fusion": _FUSION.value,
        "remat": _REMAT.value,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


if __name__ == "__main__":
    logging_utils.run_cli(main)
