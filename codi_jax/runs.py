"""A run's folder as the readers of a finished run meet it: its config (upgraded), the final stage's
EMA weights, and PE-CoDi's adapter files.

    RUN/config.json              the run's whole config, written at its start
    RUN/<stage>/checkpoints/     Orbax train states of each stage (teacher, finetune, codi, gd_Nsteps)
    RUN/adapter/                 adapter.safetensors + adapter.json, for runs whose backbone stayed frozen

The training job writes these; the evaluation job, the sampler and diagnose read them through this
module, so none of them imports the training job.
"""

from __future__ import annotations

import hashlib
import json

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from codi_jax import storage, train
from codi_jax.methods import base
from codi_jax.models import layers
from codi_jax.pretrained import safetensors_io

CONFIG_FILE = "config.json"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
_SEP = "/"

# Fields added to the run config after runs were first written, with the value that reproduces how
# those older runs behaved. `upgrade_config` fills them in: the one place old configs are read forward.
ADDED_FIELDS = (
    ("codi.consistency_space", "eps"),
    ("codi.eps_target", "wrapped"),
    ("eval.previews", True),
    ("model.unet.remat", "none"),
    ("model.unet.attention", "auto"),
    ("teacher.allow_pickle", False),
    ("data.pairs_file", ""),
    ("data.depth.model_path", ""),
    ("data.eval_folder", ""),
    ("data.downscale_resample", "box"),
    ("data.read_threads", 1),
    ("data.prefetch_batches", 2),
    ("data.worker_count", 0),
    ("pretrain.mu_lr_multiplier", 1.0),
    ("pretrain.grad_accum_steps", 1),
    ("codi.train.mu_lr_multiplier", 1.0),
    ("codi.train.grad_accum_steps", 1),
    ("finetune.train.mu_lr_multiplier", 1.0),
    ("finetune.train.grad_accum_steps", 1),
    ("gd.train.mu_lr_multiplier", 1.0),
    ("gd.train.grad_accum_steps", 1),
    ("compilation_cache_dir", "auto"),
    ("pretrain.profile_steps", (0, 0)),
    ("codi.train.profile_steps", (0, 0)),
    ("finetune.train.profile_steps", (0, 0)),
    ("gd.train.profile_steps", (0, 0)),
)


def upgrade_config(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """A run config written by an older version, with every field added since (ADDED_FIELDS)."""
    for dotted, value in ADDED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            if p not in node:
                node = None
                break
            node = node[p]
        if node is not None and leaf not in node:
            node[leaf] = value
    return config


def read_run_config(run_dir: str) -> mlc.ConfigDict:
    """RUN/config.json, upgraded to the current fields."""
    path = storage.join(run_dir, CONFIG_FILE)
    if not storage.isfile(path):
        raise FileNotFoundError(
            f"config checkpoint={run_dir!r}: no config.json there (not a finished codi_jax run's workdir?)"
        )
    return upgrade_config(mlc.ConfigDict(storage.read_json(path)))


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


def restore_final(run_cfg, run_dir: str, expect_method: str = "", model=None):
    """EMA params merged with the frozen ones, from the final stage's latest checkpoint; checked
    parameter by parameter against `model` (build.build_model's) when given."""
    if expect_method and expect_method != run_cfg.method:
        raise ValueError(f"config method={expect_method!r}, but {run_dir} was trained with method {run_cfg.method!r}")
    where, stage = final_stage(run_cfg)
    ckpt_dir = storage.join(where or run_dir, stage, "checkpoints")
    if not storage.isdir(ckpt_dir):
        raise FileNotFoundError(f"{run_dir}: no {stage}/checkpoints (method {run_cfg.method!r}); did the run finish?")
    mgr = ocp.CheckpointManager(storage.absolute(ckpt_dir))  # orbax takes absolute paths only
    step = mgr.latest_step()
    want = final_stage_steps(run_cfg)
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
    path = storage.absolute(storage.join(ckpt_dir, str(step), "state"))  # a relative run folder works too
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


def param_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def backbone_fingerprint(unet_params) -> str:
    """Identifies a backbone's weights: every parameter's path, shape and a strided sample of its values."""
    h = hashlib.sha1()
    flat = jax.tree_util.tree_flatten_with_path(unet_params)[0]
    for path, x in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(x, np.float32).ravel()
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(a[:: max(1, a.size // 64)].tobytes())
    return h.hexdigest()[:20]


def backbone_frozen(config) -> bool:
    """Did the run's final stage leave the backbone as it was (PE-CoDi / the 'pe' finetuned baseline)?"""
    if config.method == "codi":
        return config.codi.mode == "pe" and config.codi.init == "pretrained"
    if config.method == "finetune":
        return config.finetune.mode == "pe"
    return False


def _flat(tree):
    name = lambda path: _SEP.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return {name(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat):
    out = {}
    for name, x in flat.items():
        node = out
        *parents, leaf = name.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = x
    return out


def export_adapter(run_dir: str, config, params) -> str | None:
    """Write RUN_DIR/adapter/ for a run whose backbone stayed frozen; None (and a log line) otherwise."""
    if not backbone_frozen(config):
        logging.info(
            "adapter: not written (method %s trained the backbone too: the whole model is the result)", config.method
        )
        return None
    out = storage.join(run_dir, ADAPTER_DIR)
    weights = _flat(params["adapter"])
    safetensors_io.save(storage.join(out, ADAPTER_WEIGHTS), weights, metadata={"format": "codi_jax"})
    meta = {
        "task": config.task,
        "method": config.method,
        "backbone": backbone_fingerprint(params["unet"]),
        "adapter_params": int(sum(x.size for x in weights.values())),
        "backbone_params": int(sum(np.asarray(x).size for x in jax.tree_util.tree_leaves(params["unet"]))),
        "config": json.loads(config.to_json_best_effort()),
    }
    storage.write_json(storage.join(out, ADAPTER_META), meta)
    logging.info("adapter: %s (%d params, backbone %s)", out, meta["adapter_params"], meta["backbone"])
    return out


def load_adapter_files(folder: str):
    """(meta, adapter params) of an adapter folder (RUN_DIR/adapter or RUN_DIR)."""
    if storage.isdir(storage.join(folder, ADAPTER_DIR)):
        folder = storage.join(folder, ADAPTER_DIR)
    meta_path = storage.join(folder, ADAPTER_META)
    if not storage.isfile(meta_path):
        raise FileNotFoundError(f"adapter {folder}: no {ADAPTER_META} (written at the end of a PE-CoDi run)")
    return storage.read_json(meta_path), _unflat(safetensors_io.load(storage.join(folder, ADAPTER_WEIGHTS)))
