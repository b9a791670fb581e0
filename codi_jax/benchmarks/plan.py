"""Will the train step compile and fit, and how fast can it be, on hardware you have not rented yet?

  python -m codi_jax.benchmarks.plan --config=configs/sr.py --topology=v5e:2x4 --arch=sd15 \\
      --batch_per_device=2 --config.codi.mode=pe --config.mesh.ici='(1,-1,1)' --out=plan.json
  python -m codi_jax.benchmarks.plan --config=configs/sr.py:smoke --topology=cpu:8

Builds the config's trained stage exactly as the job does (experiment.stage_program: the same loss,
`train.jit_train_step` with its shardings and donation, the same optimizer and logical axis rules) on
the devices of `--topology`, with the teacher's weights as shapes only (`--arch`: a preset or a
diffusers folder's config files, codi_jax/pretrained/architectures.py), compiles it ahead of time and
prints one JSON line (also written to `--out`): compile seconds, bytes per device (arguments =
params + EMA + Adam moments + frozen + batch; temporaries; outputs; aliased), the device's memory and
whether the step fits, FLOPs per device from XLA's cost analysis, and the bound it puts on step time
(FLOPs / the chip's peak: the step cannot be faster, MFU 100%).

Topologies: a TPU topology name as JAX spells it ('v5e:2x4', 'v4:2x2x1', 'v5p:2x2x1', 'v6e:2x4'; with
`--num_slices`), an accelerator type ('v5e-8', 'v4-8', 'v5p-8': as Cloud TPU names them), 'cpu:N'
(N simulated CPU devices), or 'device' (this machine's devices: a GPU's real memory). A TPU topology
needs libtpu (`pip install -e '.[tpu]'`) but no TPU: JAX compiles for it on the CPU. The planner then
runs with JAX_PLATFORMS=cpu and lets libtpu load beside other processes (ALLOW_MULTIPLE_LIBTPU_LOAD), so
training jobs and tests keep running on the CPU beside it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from importlib import metadata

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from codi_jax import experiment, hardware, logging_utils, sharding, storage, train
from codi_jax import workdir as workdir_lib
from codi_jax.data import pipeline
from codi_jax.pretrained import architectures

_CONFIG = config_flags.DEFINE_config_file("config", None, "The job's config file (configs/sr.py, ...).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", "cpu:8", "TPU topology ('v5e:2x4'), accelerator type ('v5e-8'), cpu:N or device."
)
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice: the mesh's dcn axes span them).")
_ARCH = flags.DEFINE_string(
    "arch",
    "",
    "Teacher architecture: a preset (sd15, sd21-base, sd21) or a diffusers folder (configs only); "
    "'' = the config's teacher.pretrained_path, or none for pixel-space configs.",
)
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "Pixel crop size (data.crop_size); 0 = the config's.")
_BATCH = flags.DEFINE_integer(
    "batch_per_device", 0, "Examples per batch shard: sets the stage's train.batch_size; 0 = the config's."
)
_CACHED = flags.DEFINE_bool(
    "cached_latents",
    True,
    "Latent models: batches carry the records' cached VAE posterior (docs/data.md), so the step skips "
    "the VAE encoder; False: the step encodes the pixels.",
)
_OUT = flags.DEFINE_string("out", "", "Also write the JSON to this file.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "auto",
    "JAX's persistent compilation cache: 'auto' = $JAX_COMPILATION_CACHE_DIR or ./.jax_cache; '' = off.",
)

# Cloud TPU accelerator types -> (JAX topology name, chip config). v4 and v5p types count TensorCores
# (2 per chip, one megacore device); v5e and v6e types count chips.
ACCELERATOR_TYPES = {
    "v4-8": ("v4:2x2x1", "megacore"),
    "v4-16": ("v4:2x2x2", "megacore"),
    "v4-32": ("v4:2x2x4", "megacore"),
    "v5p-8": ("v5p:2x2x1", "megacore"),
    "v5p-16": ("v5p:2x2x2", "megacore"),
    "v5e-4": ("v5e:2x2", "default"),
    "v5e-8": ("v5e:2x4", "default"),
    "v5e-16": ("v5e:4x4", "default"),
    "v5e-32": ("v5e:4x8", "default"),
    "v5e-64": ("v5e:8x8", "default"),
    "v6e-8": ("v6e:2x4", "default"),
    "v6e-16": ("v6e:4x4", "default"),
}


def _topology_devices(topology: str, num_slices: int):
    """The devices to compile for. TPU: abstract devices of the topology (no TPU needed)."""
    if num_slices != 1 and (topology == "device" or topology.startswith("cpu:")):
        raise ValueError(f"--num_slices={num_slices} is for TPU topologies; --topology={topology} is one slice")
    if topology == "device":
        return jax.devices()
    m = re.fullmatch(r"cpu:(\d+)", topology)
    if m:
        n = int(m.group(1))
        if len(jax.devices("cpu")) < n:
            raise ValueError(
                f"--topology={topology}: {len(jax.devices('cpu'))} CPU devices in this process; JAX fixed their "
                "number when it started (run the planner in a fresh process)"
            )
        return jax.devices("cpu")[:n]
    name, chip_config = ACCELERATOR_TYPES.get(topology, (topology, None))
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
        raise ValueError(
            f"--topology={topology!r} is not a TPU topology (v5e:2x4), an accelerator type "
            f"({', '.join(ACCELERATOR_TYPES)}), cpu:N or device"
        )
    if chip_config is None:  # v4 and v5p chips are one megacore device each, as on a TPU VM
        chip_config = "megacore" if name.startswith(("v4:", "v5p:")) else "default"
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name=chip_config, num_slices=num_slices
        )
    except Exception as e:  # noqa: BLE001 - libtpu missing, or a name it does not know
        raise ValueError(
            f"--topology={topology!r}: JAX could not describe it ({str(e).splitlines()[0][:200]}); "
            "a TPU topology needs libtpu: pip install -e '.[tpu]'"
        ) from None
    return desc.devices


def _prepare_environment(topology: str) -> None:
    """Before JAX starts its backends: CPU as the platform (the TPU plugin still describes topologies),
    libtpu allowed to load beside other processes, and the CPU device count for cpu:N."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no /tmp/libtpu_lockfile fight with other jobs
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # silences libtpu's host probing
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if topology != "device":
        jax.config.update("jax_platforms", "cpu")
    m = re.fullmatch(r"cpu:(\d+)", topology)
    if m:
        jax.config.update("jax_num_cpu_devices", int(m.group(1)))


def _train_example(config, space):
    """One training example of the config's data, as the pipeline makes it: the batch's fields and shapes."""
    ds = pipeline.make_train_dataset(
        config.data, task=config.task, global_batch_size=1, seed=0, prompt_fn=space.prompt_fn
    )
    return next(iter(ds))


def abstract_batch(example: dict, batch_size: int, sharding, latent_shape=None) -> dict:
    """ShapeDtypeStructs of a global batch like `example` (one row); `latent_shape`: add the cached VAE
    posterior (float16, as the record cache stores it)."""
    spec = {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in example.items()}
    if latent_shape is not None:
        for k in ("latent_mean", "latent_logvar"):
            spec[k] = jax.ShapeDtypeStruct((batch_size,) + tuple(latent_shape), np.float16)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.items()}


def per_device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs (the arithmetic the compiled
    argument sizes are checked against)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def _count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def plan(config, topology: str, num_slices: int = 1, arch: str = "", cached_latents: bool = True) -> dict:
    """Compile the config's trained stage for `topology` and return its figures (see the module doc)."""
    devices = _topology_devices(topology, num_slices)
    arch = arch or config.teacher.pretrained_path or ""
    pre = architectures.abstract(arch) if arch else None
    if pre is not None:
        config.teacher.pretrained_path = arch
    elif config.teacher.pretrained_path is None:
        raise ValueError("config teacher.pretrained_path is unset: give --arch (sd15, sd21-base, sd21 or a folder)")
    job = experiment.planning_job(config, pre, devices)
    name, tcfg, loss_fn, init_fn = experiment.stage_program(job)
    mesh, rules, logical = job.place["mesh"], job.place["rules"], job.place["logical"]
    train.check_stage_batch(name, tcfg, mesh, rules)
    tx, lr_schedule = train.make_optimizer(tcfg)
    teacher = (
        None
        if pre is None
        else jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), pre.unet_params)
    )
    state, state_sharding = train.abstract_initial_state(init_fn, tx, mesh, rules, logical, teacher, name=name)
    example = _train_example(job.config, job.model.space)
    latent = job.model.space.shape if (pre is not None and cached_latents) else None
    batch = abstract_batch(example, tcfg.batch_size, sharding.batch_sharding(mesh, rules), latent)
    step_jit = train.jit_train_step(loss_fn, tcfg, tx, lr_schedule, state_sharding, mesh, rules)
    model_flops = step_flops(config, pre, state, batch)
    stats, kernels = {}, None
    try:
        compiled, stats = train.compile_step(step_jit, state, batch, mesh, rules, name=name, check_memory=False)
        kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
        error = None
    except hardware.DoesNotFitError as e:
        error = str(e)
    device = devices[0]
    limit, peak = hardware.memory_limit(device), hardware.peak_flops(device)
    need = hardware.step_bytes(stats) if "argument_size_in_bytes" in stats else None
    flops = model_flops / len(devices)
    m, c = job.config.model, job.config
    mode = c.codi.mode if c.method == "codi" else c.finetune.mode if c.method == "finetune" else "full"
    parts = {k: per_device_bytes(state[k]) for k in ("params", "ema_params", "opt_state", "frozen")}
    parts["batch"] = per_device_bytes(batch)
    report = {
        "config": c.task + (f":{c.variant}" if c.variant else ""),
        "arch": arch or "pixel",
        "prediction": m.prediction,
        "method": c.method,
        "mode": mode,
        "stage": name,
        "resolution": c.data.crop_size,
        "sample_shape": list(job.model.space.shape),
        "cached_latents": latent is not None,
        "dtype": m.dtype,
        "remat": m.unet.remat,
        "attention": m.unet.attention,
        "pallas_kernels": kernels,  # Pallas (splash attention) calls in the compiled TPU program
        "global_batch": tcfg.batch_size,
        "batch_per_device": tcfg.batch_size // sharding.batch_shards(mesh, rules),
        "grad_accum_steps": tcfg.grad_accum_steps,
        "topology": topology,
        "num_slices": num_slices,
        "devices": len(devices),
        "device_kind": device.device_kind,
        "mesh": dict(mesh.shape),
        "trainable_params": _count(state["params"]),
        "frozen_params": _count(state["frozen"]),
        "arithmetic_bytes": parts,  # per device, from the shardings: params, EMA, Adam moments, frozen, batch
        "compile_s": stats.get("compile_s"),
        "bytes": {k: stats[k] for k in stats if k.endswith("_in_bytes")},
        "step_bytes": need,
        "memory_bytes": limit,
        "fits": None if limit is None else (error is None and need is not None and need <= limit),
        "flops_per_device": flops,  # the step's arithmetic (see step_flops) / devices
        "compiled_flops_per_device": stats.get("flops"),  # the executable's count: no custom calls
        "peak_flops": peak,
        "min_step_s": None if not (flops and peak) else flops / peak,
        "error": error,
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "jax": jax.__version__,
        "libtpu": _version("libtpu"),
    }
    if report["min_step_s"]:  # MFU 100%
        report["images_per_s_bound"] = report["global_batch"] / report["min_step_s"]
    return report


def step_flops(config, pre, state, batch) -> float:
    """FLOPs of one whole step (all devices together), from XLA's cost analysis of the step lowered with
    XLA's attention for one host CPU device, before compilation. The compiled executable's own count leaves
    out custom calls (the Pallas splash kernels on a TPU; on a GPU the cuDNN convolutions and attention),
    and a TPU topology's compile-only client gives no cost analysis of a lowering; the global program's
    arithmetic does not depend on where it runs. A remat policy's recompute is counted. Multi-slice
    configs lower as one slice (mesh.dcn all 1): one device has no slices to span."""
    config = config.copy_and_resolve_references()
    config.model.unet.attention = "xla"
    config.mesh.dcn = (1,) * len(config.mesh.dcn)
    job = experiment.planning_job(config, pre, jax.devices("cpu")[:1])
    _, tcfg, loss_fn, _ = experiment.stage_program(job)
    tx, lr_schedule = train.make_optimizer(tcfg)
    step = jax.jit(
        train.make_train_step(loss_fn, tx, lr_schedule, tcfg.ema_decay, tcfg.ema_warmup, tcfg.grad_accum_steps)
    )
    plain = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    cost = step.lower(plain(state), plain(batch)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _version(pkg: str):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        raise ValueError("--config is required (e.g. --config=configs/sr.py)")
    _prepare_environment(_TOPOLOGY.value)
    workdir_lib.enable_compilation_cache(_CACHE.value, os.path.join(os.getcwd(), "plan"))  # a rerun reads it back
    if _RESOLUTION.value:
        config.data.crop_size = _RESOLUTION.value
    if _BATCH.value:
        stage = {"codi": config.codi.train, "finetune": config.finetune.train}.get(config.method, config.gd.train)
        stage.batch_size = _BATCH.value * _batch_shards(config, _TOPOLOGY.value, _SLICES.value)
    report = plan(config, _TOPOLOGY.value, _SLICES.value, _ARCH.value, _CACHED.value)
    line = json.dumps(report)
    print(line, flush=True)
    if _OUT.value:
        storage.write_text(_OUT.value, json.dumps(report, indent=2) + "\n")
        logging.info("plan written to %s", _OUT.value)


def _batch_shards(config, topology: str, num_slices: int) -> int:
    """How many batch shards the config's mesh makes on the topology (the rules' batch axes)."""
    devices = _topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(config.mesh, devices)
    return sharding.batch_shards(mesh, sharding.rules_from_config(config.mesh))


if __name__ == "__main__":
    logging_utils.run_cli(main)
