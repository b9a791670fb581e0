"""Subprocess body of tests/test_sharding.py and tests/test_multiprocess.py (not collected by pytest).

python -m tests.sharding_worker meshes OUT.json          8 simulated devices: CoDi steps on several meshes
python -m tests.sharding_worker train WORKDIR OUT.npz [--coordinator=H:P --process_id=I --num_processes=N]
    the teacher stage on 4 steps through train.run_stage (multi-process when a coordinator is given);
    with --single_reads=N, one process reads the data shares of N processes (the same global batches)
python -m tests.sharding_worker restore WORKDIR OUT.npz  restore a finished stage on one process
python -m tests.sharding_worker die --coordinator=... --process_id=I   process 1 dies; process 0 must be stopped
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _setup_smoke(batch_size=8):
    from tests import helpers

    config = helpers.smoke_config()
    config.codi.train.update(batch_size=batch_size, warmup_steps=1, lr=1e-3)
    return config


def _codi_pieces(config):
    from codi_jax import diffusion
    from codi_jax.data import pipeline
    from codi_jax.methods import base, codi

    denoisers = base.make_denoisers(config.model, diffusion.make_schedule(config.schedule), config.codi.boundary)
    wrapped, plain, module = denoisers.consistency, denoisers.diffusion, denoisers.diffusion.module
    size = config.data.crop_size

    def init_fn(rng):
        params = base.init_adapted_params(module, config.model, rng, size)
        return codi.split_params(params, config.codi.mode, config.codi.zs_predictor)

    names = base.model_logical_names(module, config.model, size)
    logical = {"unet": names["unet"], "adapter": names["adapter"]}
    loss_fn = functools.partial(codi.codi_loss, denoiser=wrapped, teacher=plain, cfg=config.codi)
    batch = next(
        pipeline.make_train_iterator(config.data, task="sr", global_batch_size=config.codi.train.batch_size, seed=0)
    )
    return init_fn, logical, loss_fn, batch


def _spec_str(sh):
    return str(tuple(sh.spec))


def run_meshes(out_path):
    """Two CoDi steps on a single device and on the mesh (data, fsdp) = (2, 4); the placements of (8, 1)
    and (1, 8). (2, 4) reduces over both axes at once; (1, 8) adds no new collective, so its step is
    not compiled (one 8-device CoDi step compile less: suite time)."""
    from codi_jax import sharding, train

    config = _setup_smoke()
    init_fn, logical, loss_fn, batch_np = _codi_pieces(config)
    tcfg = config.codi.train
    tx, sched = train.make_optimizer(tcfg)
    rules = sharding.rules_from_config(config.mesh)
    results = {}
    conv = ("unet", "down_blocks_0", "resnets_0", "conv1", "kernel")  # (3, 3, 16, 16): conv_in -> fsdp
    qkv = ("unet", "mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")  # (16, 16)
    init_once = functools.lru_cache(maxsize=None)(lambda: init_fn(jax.random.split(jax.random.PRNGKey(0))[0]))
    # The same initial params for every mesh, built once; copies, since each state takes over its arrays.
    shared_init = lambda rng: jax.tree_util.tree_map(jnp.copy, init_once())
    get = lambda tree, path: functools.reduce(lambda t, k: t[k], path, tree)

    def specs(state, batch):
        adam = state["opt_state"][1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
        return {
            "conv_kernel": _spec_str(get(state["params"], conv).sharding),
            "conv_kernel_ema": _spec_str(get(state["ema_params"], conv).sharding),
            "conv_kernel_adam_mu": _spec_str(get(adam.mu, conv).sharding),
            "qkv_kernel": _spec_str(get(state["params"], qkv).sharding),
            "image_batch": _spec_str(batch["image"].sharding),
        }

    # (8, 1), pure data parallel, and (1, 8), pure FSDP: placement only.
    for shape in [(8, 1), (1, 8), (1, 1), (2, 4)]:
        n = shape[0] * shape[1]
        mesh_cfg = config.mesh.copy_and_resolve_references()
        mesh_cfg.ici = (shape[0], shape[1], 1)
        mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n])
        t0 = time.time()
        state, state_sh = train.initial_state(shared_init, tx, 0, mesh, rules, logical)
        print(f"{shape}: state {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        if shape in ((8, 1), (1, 8)):
            results[f"{shape[0]}x{shape[1]}"] = {"specs": specs(state, sharding.put_batch(batch_np, mesh, rules))}
            continue
        step_jit = jax.jit(
            train.make_train_step(loss_fn, tx, sched, tcfg.ema_decay),
            in_shardings=(state_sh, sharding.batch_sharding(mesh, rules)),
            out_shardings=(state_sh, sharding.replicated(mesh)),
            donate_argnums=(0,),
        )
        batch = sharding.put_batch(batch_np, mesh, rules)
        step, stats = train.compile_step(step_jit, state, batch, mesh, rules)
        print(f"{shape}: compiled {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        losses = []
        for _ in range(2):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        results[f"{shape[0]}x{shape[1]}"] = {
            "losses": losses,
            "specs": specs(state, batch),
            "compile_s": stats["compile_s"],
        }
        print(f"{shape}: ran {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(state["params"])])
        if shape == (1, 1):  # the single-device reference, and how far its two steps moved the params
            reference, initial = (
                flat,
                np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(init_once()[0])]),
            )
            results["1x1"]["max_param_update"] = float(np.max(np.abs(flat - initial)))
        results[f"{shape[0]}x{shape[1]}"]["max_param_diff"] = float(np.max(np.abs(flat - reference)))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)


class _Concat:
    """One process reading the shares of `n` processes, concatenated in process order."""

    def __init__(self, its):
        self.its = its

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @property
    def skipped_records(self):
        return sum(it.skipped_records for it in self.its)

    def get_state(self):
        return json.dumps([it.get_state() for it in self.its]).encode()

    def set_state(self, state):
        for it, s in zip(self.its, json.loads(state)):
            it.set_state(s)


def _teacher(workdir, num_steps):
    from codi_jax import diffusion, sharding, train
    from codi_jax.methods import base, pretrain

    config = _setup_smoke()
    config.mesh.ici = (-1, 2, 1) if jax.device_count() % 2 == 0 else (-1, 1, 1)
    denoiser = base.make_denoisers(
        config.model, diffusion.make_schedule(config.schedule), config.codi.boundary
    ).diffusion
    module = denoiser.module
    tcfg = config.pretrain
    tcfg.update(num_steps=num_steps, checkpoint_every=2, log_every=1, batch_size=8, warmup_steps=1)
    names = base.model_logical_names(module, config.model, config.data.crop_size)

    def init_fn(rng):
        return {"unet": base.init_model_params(module, config.model, rng, config.data.crop_size)["unet"]}, {}

    mesh = sharding.make_mesh(config.mesh)
    kw = dict(
        name="teacher",
        workdir=workdir,
        tcfg=tcfg,
        init_fn=init_fn,
        seed=0,
        mesh=mesh,
        rules=sharding.rules_from_config(config.mesh),
        logical={"unet": names["unet"]},
    )
    if num_steps is None:
        tcfg.num_steps = 4
        return train.load_final_state(**kw)
    return train.run_stage(
        loss_fn=functools.partial(pretrain.diffusion_loss, denoiser=denoiser, use_cond=False),
        data_cfg=config.data,
        task="uncond",
        **kw,
    )


def _save_params(state, out_path):
    from jax.experimental import multihost_utils

    params = state["params"]
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        np.savez(out_path, step=int(np.asarray(jax.device_get(state["step"]))), **flat)


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("paths", nargs="*")
    p.add_argument("--coordinator", default="")
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=2)
    p.add_argument("--single_reads", type=int, default=1)
    p.add_argument("--heartbeat", type=int, default=10)
    a = p.parse_args(argv)
    if a.coordinator:
        from codi_jax import sharding

        sharding.initialize_distributed(a.coordinator, a.num_processes, a.process_id, heartbeat_timeout_s=a.heartbeat)
    if a.mode == "meshes":
        run_meshes(a.paths[0])
    elif a.mode == "train":
        if a.single_reads > 1:
            from codi_jax.data import pipeline

            real = pipeline.make_train_iterator

            def concat(*args, **kw):
                kw.update(process_count=a.single_reads)
                return _Concat([real(*args, **dict(kw, process_index=i)) for i in range(a.single_reads)])

            pipeline.make_train_iterator = concat
        _save_params(_teacher(a.paths[0], 4), a.paths[1])
    elif a.mode == "restore":
        _save_params(_teacher(a.paths[0], None), a.paths[1])
    elif a.mode == "die":
        # Process 1 crashes at once; process 0 keeps running cross-process collectives (as a train
        # step would) and must be stopped by the coordination service, not hang.
        from jax.experimental import multihost_utils

        if jax.process_index() == 1:
            os._exit(3)
        t0 = time.time()
        try:
            while time.time() - t0 < 600:
                multihost_utils.sync_global_devices("step")
                time.sleep(0.5)
        finally:
            print(f"survivor ran {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        raise SystemExit("the survivor was never stopped")
    else:
        raise SystemExit(f"unknown mode {a.mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
