"""Train state, the jitted sharded step, and the training loop (one loop for every method).

State is a plain dict pytree, so jit, sharding and Orbax see it directly:
  step, params (trainable), ema_params (EMA of params: theta^- and eval weights),
  opt_state, rng, frozen (params that neither train nor EMA, e.g. PE-CoDi's backbone).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview

from codi_jax import hardware, logging_utils, preemption, sharding, storage
from codi_jax.data import pipeline


class NonFiniteLossError(FloatingPointError):
    pass


def _scale_named_leaves(name: str, factor: float) -> optax.GradientTransformation:
    """Multiply the updates of every leaf called `name` by `factor`."""

    def scale(updates, params=None):
        del params
        is_named = lambda path: getattr(path[-1], "key", None) == name
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor if is_named(p) else u, updates)

    return optax.stateless(scale)


def validate_train(tcfg, prefix: str) -> None:
    """One line naming the first bad field of a stage's `train` config section (`prefix`: its path)."""
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum_steps"):
        if tcfg[key] < 1:
            raise ValueError(f"config {prefix}.{key}={tcfg[key]} must be >= 1")
    lo, hi = profile_range(tcfg)
    if (lo, hi) != (0, 0) and not 0 <= lo < hi <= tcfg.num_steps:
        raise ValueError(
            f"config {prefix}.profile_steps={(lo, hi)} must be (start, stop) with 0 <= start < stop <= "
            f"num_steps={tcfg.num_steps} (steps start+1..stop are traced), or (0, 0) for none"
        )


def profile_range(tcfg) -> tuple[int, int]:
    lo, hi = tuple(tcfg.profile_steps)
    return int(lo), int(hi)


def make_optimizer(tcfg):
    """AdamW with global-norm clipping and linear warmup to a constant rate; returns (tx, lr schedule).

    The scalar mu of eq 12 gets `mu_lr_multiplier` times the rate: Adam moves each
    parameter by about lr per step, so at lr 2e-4 a lone scalar could not travel from
    0 towards 1 in a few hundred steps.
    """
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, tcfg.lr, max(tcfg.warmup_steps, 1)), optax.constant_schedule(tcfg.lr)],
        [max(tcfg.warmup_steps, 1)],
    )
    parts = [
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(lr, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay),
    ]
    if tcfg.mu_lr_multiplier != 1.0:
        parts.append(_scale_named_leaves("mu", tcfg.mu_lr_multiplier))
    return optax.chain(*parts), lr


def create_state(params, frozen, tx, rng) -> dict:
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": copy(params),  # Algorithm 1: theta^- <- theta
        "opt_state": tx.init(params),
        "rng": rng,
        "frozen": frozen,
    }


def ema_update(ema, params, decay):
    """theta^- <- stopgrad(gamma theta^- + (1 - gamma) theta) (Algorithm 1)."""
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(step, decay: float, warmup: bool):
    """The EMA decay used at `step`: constant (Algorithm 1's gamma), or warmed up as
    min(decay, (1 + step) / (10 + step)) so that a model trained from random weights
    is not averaged with its initialisation for thousands of steps."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _microbatches(tree, k: int):
    """(B, ...) -> (k, B/k, ...), microbatch i holding rows i, i+k, i+2k, ...: each device's
    contiguous block of the batch keeps an equal share of every microbatch."""
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), tree)


def make_train_step(
    loss_fn: Callable, tx, lr_schedule, ema_decay: float, ema_warmup: bool = False, grad_accum_steps: int = 1
):
    """One update. A non-finite loss or gradient leaves the state untouched (the host then stops).

    The loss gets one PRNG key per example (split from the step's key over the global batch),
    so an example's noise and t do not depend on sharding or on `grad_accum_steps`, which
    scans the loss and gradient over that many microbatches and averages them before the
    single optimiser update: the same update as the whole batch at once, in less memory.
    """

    def grads_of(params, frozen, ema, batch, keys):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, metrics), grads = grad_fn(params, frozen, ema, batch, keys)
        return grads, dict(metrics, loss=loss)

    def step_fn(state, batch):
        rng, key = jax.random.split(state["rng"])
        batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        keys = jax.random.split(key, batch_size)
        args = (state["params"], state["frozen"], state["ema_params"])
        if grad_accum_steps == 1:
            grads, metrics = grads_of(*args, batch, keys)
        else:
            micro = _microbatches((batch, keys), grad_accum_steps)

            def body(acc, mb):
                g, m = grads_of(*args, *mb)
                return jax.tree_util.tree_map(jnp.add, acc, (g, m)), None

            zeros = jax.tree_util.tree_map(
                jnp.zeros_like, jax.eval_shape(grads_of, *args, *jax.tree_util.tree_map(lambda x: x[0], micro))
            )
            total, _ = jax.lax.scan(body, zeros, micro)
            grads, metrics = jax.tree_util.tree_map(lambda x: x / grad_accum_steps, total)
        loss = metrics["loss"]
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = {
            "step": state["step"] + 1,
            "params": params,
            "ema_params": ema_update(state["ema_params"], params, ema_decay_at(state["step"], ema_decay, ema_warmup)),
            "opt_state": opt_state,
            "rng": rng,
            "frozen": state["frozen"],
        }
        keep_old = lambda n, o: jnp.where(finite, n, o)
        out = {
            k: (new[k] if k in ("step", "rng", "frozen") else jax.tree_util.tree_map(keep_old, new[k], state[k]))
            for k in new
        }
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state["step"]), finite=finite)
        return out, metrics

    return step_fn


def compile_step(step_jit, state, batch, mesh, rules, name: str = "step", check_memory: bool = True):
    """Lower and compile ahead of time, so that compile time and memory are known before step 1.

    Returns (compiled executable, stats): compile seconds, per-device bytes of arguments,
    outputs and temporaries, and the FLOPs of one step from XLA's cost analysis. A step that needs
    more memory per device than the device holds stops here with a one-line `hardware.DoesNotFitError`
    naming the config fields to change (`check_memory=False`: report it, the planner's choice).
    """
    t0 = time.perf_counter()
    with sharding.activation_rules(mesh, rules):
        lowered = step_jit.lower(state, batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA's own "does not fit" (the TPU compiler checks HBM) -> one line
        if not hardware.is_out_of_memory(e):
            raise
        raise hardware.DoesNotFitError(
            f"{name}: the train step does not fit in a {mesh.devices.flat[0].device_kind}'s memory "
            f"({logging_utils.one_line_error(e)[:300]}): {hardware.what_to_change(name)}"
        ) from None
    stats = {"compile_s": round(time.perf_counter() - t0, 2)}
    try:
        mem = compiled.memory_analysis()
        for key in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            if hasattr(mem, key):
                stats[key] = int(getattr(mem, key))
    except Exception as e:  # noqa: BLE001 - not every backend reports memory
        logging.info("%s: no memory analysis (%s)", name, e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        stats["flops"] = float(cost.get("flops", 0.0))
    except Exception as e:  # noqa: BLE001
        logging.info("%s: no cost analysis (%s)", name, e)
    gib = lambda k: stats.get(k, 0) / 2**30
    logging.info(
        "%s: compiled in %.1f s; per device: arguments %.3f GiB, temporaries %.3f GiB, outputs %.3f GiB; "
        "%.3g GFLOP per step",
        name,
        stats["compile_s"],
        gib("argument_size_in_bytes"),
        gib("temp_size_in_bytes"),
        gib("output_size_in_bytes"),
        stats.get("flops", 0.0) / 1e9,
    )
    if check_memory:
        hardware.check_fits(stats, mesh.devices.flat[0], name)
    return compiled, stats


def checkpoint_manager(directory: str, tcfg) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=tcfg.keep_checkpoints, create=True, enable_async_checkpointing=True
    )
    return ocp.CheckpointManager(storage.absolute(directory), options=options)


class CheckpointMismatchError(ValueError):
    """A checkpoint that holds another model or method than the config describes."""


MODEL_PARTS = ("params", "ema_params", "frozen")


def shapes_by_path(tree) -> dict:
    """{"['params']['unet']...": shape} of every leaf of `tree`."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(getattr(v, "shape", ())) for path, v in flat}


def _model_parts(tree) -> dict:
    """The model parts of a train state (optimiser states are namedtuples, which the checkpoint's
    metadata stores as plain containers, so their paths do not compare)."""
    return {k: tree[k] for k in MODEL_PARTS if k in tree}


def check_shapes(stored: dict, wanted: dict, where: str) -> None:
    """One-line error naming the first parameter whose presence or shape differs between `stored`
    (what a checkpoint holds) and `wanted` (what this config's model builds); {path: shape} each."""
    for key in sorted(set(wanted) | set(stored)):
        if key not in stored:
            raise CheckpointMismatchError(
                f"{where} lacks {key} that this config's model has: a checkpoint of another method or model?"
            )
        if key not in wanted:
            raise CheckpointMismatchError(
                f"{where} holds {key} that this config's model lacks: a checkpoint of another method or model?"
            )
        if stored[key] != wanted[key]:
            raise CheckpointMismatchError(
                f"{where}: {key} has shape {stored[key]}, this config's model "
                f"{wanted[key]}: a checkpoint of another model size?"
            )


def check_checkpoint_matches(mgr: ocp.CheckpointManager, step: int, init_state) -> None:
    """check_shapes between the checkpoint at `step` and the state this config builds (orbax's own
    message names neither the parameter nor the shapes)."""
    # Read from the step folder (a fresh manager knows no handlers, and its item_metadata is None).
    meta = ocp.StandardCheckpointer().metadata(storage.join(str(mgr.directory), str(step), "state"))
    meta = getattr(meta, "item_metadata", None) or meta
    tree = getattr(meta, "tree", meta)
    if not isinstance(tree, dict) or "params" not in tree:
        raise OSError(f"checkpoint {mgr.directory}/{step}/state holds no readable parameter metadata")
    check_shapes(
        shapes_by_path(_model_parts(tree)),
        shapes_by_path(_model_parts(init_state)),
        f"checkpoint {mgr.directory}/{step}",
    )


def restore_state(mgr: ocp.CheckpointManager, step: int, init_state, state_sharding, data_iter=None):
    """Restore state (resharded to `state_sharding`) and, if given, the data iterator position."""
    check_checkpoint_matches(mgr, step, init_state)
    items = {"state": ocp.args.StandardRestore(sharding.abstract(init_state, state_sharding))}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return mgr.restore(step, args=ocp.args.Composite(**items))["state"]


DAMAGED = "damaged_checkpoints"


def restore_newest_readable(mgr, target, state_sharding, data_iter, stage_dir: str, name: str):
    """(state, step, manager) from the newest checkpoint that reads into `target` (the state's shapes and
    shardings, `abstract_initial_state`); (None, None, manager) if none.

    A checkpoint that does not read (files emptied or cut short by a crash mid-save on a filesystem
    without atomic renames, a lost object) is named in a warning and moved, whole, to
    STAGE/damaged_checkpoints/<step> (kept for inspection, out of orbax's way: the run will save that
    step again); the next older one (orbax keeps `keep_checkpoints`) is tried. A checkpoint that reads
    but holds another model (CheckpointMismatchError) stops the run: that is a config error.
    """
    damaged = []
    state, step = None, None
    for candidate in sorted(mgr.all_steps(), reverse=True):
        try:
            state, step = restore_state(mgr, candidate, target, state_sharding, data_iter), candidate
            break
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is a damaged checkpoint
            logging.warning(
                "%s: checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                name,
                candidate,
                mgr.directory,
                type(e).__name__,
                logging_utils.one_line_error(e),
            )
            damaged.append(candidate)
    if damaged:
        if jax.process_index() == 0:
            for bad in damaged:
                dest = storage.join(stage_dir, DAMAGED, f"{bad}.{time.strftime('%Y%m%d-%H%M%S')}")
                storage.makedirs(storage.dirname(dest))
                storage.move(storage.join(str(mgr.directory), str(bad)), dest)
                logging.warning("%s: moved the unreadable checkpoint step %d to %s", name, bad, dest)
        sharding.sync_processes(f"{name}_damaged_checkpoints")
        mgr.reload()  # forget the moved steps
        if step is None:
            logging.warning("%s: no readable checkpoint; starting from step 0", name)
    return state, step, mgr


def _first_nonfinite(pending):
    for step, m in pending:
        if not bool(m["finite"]):
            return step, m
    return None


def initial_state(
    init_fn: Callable, tx, seed: int, mesh, rules=None, logical=None, name: str = "state", state_sharding=None
):
    """(state, its shardings): init_fn's params placed by the logical axis rules.

    `logical` maps top-level param keys ('unet', 'adapter', ...) to trees of logical names
    (methods.base.model_logical_names); keys it lacks, and everything when it is None, are
    replicated. The state is built by a jitted function with those output shardings, so
    EMA params and Adam moments are created sharded. The state takes over init_fn's arrays (they are
    donated): a pretrained backbone is held once, not once by the caller and once by the state (3.4 GB
    at SD size). init_fn must therefore return arrays nobody else reads afterwards (copy what must stay).
    `state_sharding`: the shardings when the caller has them already (`abstract_initial_state`).
    """
    rules = rules if rules is not None else {}
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    params, frozen = init_fn(init_rng)
    multihost = jax.process_count() > 1
    if multihost:  # process-local arrays -> host values, identical on every process
        params, frozen = jax.tree_util.tree_map(np.asarray, (params, frozen))
    make = lambda p, f, r: create_state(p, f, tx, r)
    if state_sharding is None:
        shapes = jax.eval_shape(make, params, frozen, state_rng)
        state_sharding = sharding.state_shardings(shapes, logical or {}, mesh, rules, tx, name=name)
    donate = ()  # host values of several processes: nothing on the devices to take over
    if not multihost:
        # Laid out as the state first (no copy where they already are): XLA only reuses an input buffer
        # for an output of the same per-device shape.
        where = (state_sharding["params"], state_sharding["frozen"])
        params, frozen = jax.device_put((params, frozen), where, donate=True)
        donate = (0, 1)
    with warnings.catch_warnings():  # buffers of another shape or device cannot be reused: that is fine
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        state = jax.jit(make, out_shardings=state_sharding, donate_argnums=donate)(params, frozen, state_rng)
    return state, state_sharding


def check_stage_batch(name: str, tcfg, mesh, rules) -> None:
    """One line naming `name.train.batch_size` or `grad_accum_steps` when the mesh cannot split them."""
    sharding.check_batch_size(tcfg.batch_size, mesh, f"{name}.train.batch_size", rules)
    accum = tcfg.grad_accum_steps
    if accum < 1 or (tcfg.batch_size // sharding.batch_shards(mesh, rules)) % accum:
        raise ValueError(
            f"config {name} grad_accum_steps={accum} must be >= 1 and divide the per-device batch "
            f"({tcfg.batch_size} / {sharding.batch_shards(mesh, rules)} shards)"
        )


def jit_train_step(loss_fn: Callable, tcfg, tx, lr_schedule, state_sharding, mesh, rules):
    """The stage's jitted step: state in and out on its shardings (donated), the batch split over the
    batch axes, metrics replicated. The training job and the memory planner compile this same program."""
    return jax.jit(
        make_train_step(loss_fn, tx, lr_schedule, tcfg.ema_decay, tcfg.ema_warmup, tcfg.grad_accum_steps),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh, rules)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def abstract_initial_state(init_fn: Callable, tx, mesh, rules=None, logical=None, *args, name: str = "state"):
    """(state shapes carrying their shardings, the shardings): what `initial_state` would build, without
    computing or holding a byte of it (jax.eval_shape). `init_fn(rng, *args)`; `args` may be
    ShapeDtypeStructs (a pretrained backbone's shapes)."""
    rules = rules if rules is not None else {}

    def make(rng, *args):
        init_rng, state_rng = jax.random.split(rng)
        params, frozen = init_fn(init_rng, *args)
        return create_state(params, frozen, tx, state_rng)

    shapes = jax.eval_shape(make, jax.random.PRNGKey(0), *args)
    state_sharding = sharding.state_shardings(shapes, logical or {}, mesh, rules, tx, name=name)
    logging.info("%s: %s", name, sharding.describe(state_sharding["params"]))
    return sharding.abstract(shapes, state_sharding), state_sharding


def run_stage(
    *,
    name: str,
    workdir: str,
    tcfg,
    loss_fn: Callable,
    init_fn: Callable,
    data_cfg,
    task: str,
    seed: int,
    mesh,
    image_fn: Callable | None = None,
    rules=None,
    logical=None,
    prompt_fn: Callable | None = None,
    cache_fields: tuple = (),
    on_state: Callable | None = None,
):
    """Train one stage in WORKDIR/NAME, resuming from its latest checkpoint; returns the final state.

    init_fn(rng) -> (trainable params, frozen params). A stage whose latest checkpoint
    is at `tcfg.num_steps` is complete: it is restored, not retrained.
    image_fn(state) -> {name: images} is called for TensorBoard images.
    rules / logical: the logical axis rules (sharding.rules_from_config) and the params'
    logical names (see `initial_state`); None: batch over 'data' and 'fsdp', state replicated.
    prompt_fn: a record's text -> its 'prompt' (data.pipeline; None: prompt table indices).
    cache_fields: what of the records' cache the batches carry (build.cache_fields).
    on_state(): called once the state exists (restored or initialised), to free what only init_fn read.
    """
    rules = rules if rules is not None else {"batch": ("data", "fsdp")}
    stage_dir = storage.join(workdir, name)
    if preemption.requested():  # a notice that arrived after the previous stage's last step
        raise preemption.Preempted(f"{name}: not started: a preemption notice arrived. Run the same command to resume.")
    check_stage_batch(name, tcfg, mesh, rules)
    accum = tcfg.grad_accum_steps
    tx, lr_schedule = make_optimizer(tcfg)
    # The restore target is shapes only: a resumed run never holds a second, freshly initialised state.
    target, state_sharding = abstract_initial_state(init_fn, tx, mesh, rules, logical, name=name)

    data_iter = pipeline.make_train_iterator(
        data_cfg,
        task=task,
        global_batch_size=tcfg.batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prompt_fn=prompt_fn,
        cache_fields=cache_fields,
    )

    mgr = checkpoint_manager(storage.join(stage_dir, "checkpoints"), tcfg)
    t0 = time.perf_counter()
    state, latest, mgr = restore_newest_readable(mgr, target, state_sharding, data_iter, stage_dir, name)
    if latest is not None:
        logging.info("%s: resumed from step %d (%s) in %.1f s", name, latest, mgr.directory, time.perf_counter() - t0)
    else:
        state, _ = initial_state(init_fn, tx, seed, mesh, rules, logical, name=name, state_sharding=state_sharding)
    if on_state is not None:
        on_state()
    _give_back_host_memory(name, "the state exists")
    start = int(state["step"])
    if start >= tcfg.num_steps:
        logging.info("%s: complete at step %d; skipping training", name, start)
        mgr.close()
        return state

    step_jit = jit_train_step(loss_fn, tcfg, tx, lr_schedule, state_sharding, mesh, rules)
    is_main = jax.process_index() == 0
    writer = logging_utils.MetricWriter(storage.join(stage_dir, "tensorboard"), enabled=is_main)
    progress = logging_utils.Progress(tcfg.num_steps, start_step=start, every_n_steps=tcfg.log_every, name=name)
    pending = []  # (step, device metrics) not yet checked on the host
    first_batch = sharding.put_batch(next(data_iter), mesh, rules)
    step_fn, compile_stats = compile_step(step_jit, state, first_batch, mesh, rules, name=name)
    if is_main:
        write_parameter_table(stage_dir, name, state["params"])
        storage.write_json(
            storage.join(stage_dir, "compile.json"),
            dict(
                compile_stats,
                devices=jax.device_count(),
                mesh=dict(mesh.shape),
                batch_size=tcfg.batch_size,
                grad_accum_steps=accum,
            ),
        )

    def flush_pending():
        bad = _first_nonfinite(pending)
        if bad is not None:
            mgr.wait_until_finished()
            raise NonFiniteLossError(
                f"{name}: non-finite loss at step {bad[0]} (loss={float(bad[1]['loss'])}); stopped. "
                f"Last good checkpoint (step {mgr.latest_step()}) kept in {mgr.directory}"
            )
        if pending:
            step, scalars = pending[-1][0], window_means([m for _, m in pending])
            skipped = data_iter.skipped_records  # corrupt records dropped so far (data.max_skipped_fraction)
            writer.write_scalars(step, dict(scalars, skipped_records=skipped))
            progress.update(step, **scalars, **({"skipped_records": skipped} if skipped else {}))
        pending.clear()

    profile_lo, profile_hi = profile_range(tcfg)
    tracing = False
    try:
        for step in range(start + 1, tcfg.num_steps + 1):
            batch = first_batch if step == start + 1 else sharding.put_batch(next(data_iter), mesh, rules)
            if profile_lo < step <= profile_hi and not tracing:  # TensorBoard's profile plugin reads it
                jax.profiler.start_trace(writer.logdir)
                tracing = True
            state, metrics = step_fn(state, batch)
            if tracing and step == profile_hi:
                tracing = _stop_trace(state, name, profile_lo, profile_hi, writer.logdir)
            pending.append((step, metrics))
            last = step == tcfg.num_steps
            if step % tcfg.log_every == 0 or last:
                flush_pending()
            if tcfg.image_every and step % tcfg.image_every == 0 and image_fn is not None:
                writer.write_images(step, image_fn(state))
            preempted = preemption.reached(step)  # SIGTERM here, or on any host: every process agrees
            if step % tcfg.checkpoint_every == 0 or last or preempted:
                flush_pending()  # never save a state that followed a non-finite step
                if preempted:
                    logging.warning("%s: preemption notice: saving step %d, then stopping", name, step)
                t0 = time.perf_counter()
                mgr.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)
                    ),
                    force=preempted,
                )
                logging.info(
                    "%s: checkpoint step %d: training resumed after %.1f s; the write continues in the background",
                    name, step, time.perf_counter() - t0,
                )  # fmt: skip
                if is_main:
                    write_data_stats(stage_dir, step, data_iter.skipped_records)
            if preempted and not last:
                mgr.wait_until_finished()
                raise preemption.Preempted(
                    f"{name}: stopped at step {step} on a preemption notice; checkpoint saved in {mgr.directory}. "
                    f"Run the same command to resume."
                )
        if image_fn is not None:
            writer.write_images(tcfg.num_steps, image_fn(state))
    finally:
        if tracing:
            _stop_trace(state, name, profile_lo, profile_hi, writer.logdir)
        t0 = time.perf_counter()
        mgr.wait_until_finished()
        logging.info("%s: checkpoint writes finished (waited %.1f s at the end)", name, time.perf_counter() - t0)
        mgr.close()
        writer.close()
        _give_back_host_memory(name, "the checkpoint writes finished")
    return state


def _give_back_host_memory(name: str, when: str) -> None:
    """What the host freed (a teacher read into numpy, initialisation's buffers, checkpoint copies) returned
    to the operating system, not kept by the allocator: the next stage, or another process, gets it."""
    before = hardware.process_memory_bytes(os.getpid())
    if hardware.release_free_host_memory():
        freed = max(before - hardware.process_memory_bytes(os.getpid()), 0)
        logging.info("%s: %.2f GiB of freed host memory given back to the OS (%s)", name, freed / 2**30, when)


def _stop_trace(state, name, lo, hi, logdir) -> bool:
    jax.block_until_ready(state)  # the traced steps' device work, not only their dispatch
    jax.profiler.stop_trace()
    logging.info("%s: profiler trace of steps %d-%d in %s (TensorBoard's profile tab)", name, lo + 1, hi, logdir)
    return False


def window_means(step_metrics: list[dict]) -> dict[str, float]:
    """Each metric averaged over the steps since the last log line (clu.metrics.Average): the logged loss
    is the window's, not one batch's."""
    keys = [k for k in step_metrics[0] if k != "finite"]
    stacked = {k: jnp.stack([jnp.asarray(m[k], jnp.float32) for m in step_metrics]) for k in keys}
    return {k: float(clu_metrics.Average.from_model_output(v).compute()) for k, v in stacked.items()}


PARAMETER_TABLE = "parameters.txt"


def write_parameter_table(stage_dir: str, name: str, params) -> None:
    """STAGE/parameters.txt: every trained parameter's name, shape and size (clu.parameter_overview),
    and their count in the log."""
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    path = storage.join(stage_dir, PARAMETER_TABLE)
    storage.write_text(path, table + "\n")
    logging.info("%s: %s trained parameters (%s)", name, f"{parameter_overview.count_parameters(params):,}", path)


DATA_STATS = "data.json"


def write_data_stats(stage_dir: str, step: int, skipped: int) -> None:
    """The stage's data counts at its latest checkpoint (metrics.json gathers them)."""
    storage.write_json(storage.join(stage_dir, DATA_STATS), {"step": int(step), "skipped_records": int(skipped)})


def data_stats(workdir: str) -> dict:
    """{stage: its data counts} of the stages trained in `workdir`."""
    out = {}
    for name in storage.listdir(workdir):
        path = storage.join(workdir, name, DATA_STATS)
        if storage.isfile(path):
            out[name] = storage.read_json(path)
    return out


def load_final_state(*, name: str, workdir: str, tcfg, init_fn: Callable, seed: int, mesh, rules=None, logical=None):
    """The final state of a completed stage (error if it is not complete)."""
    del seed  # the state comes from the checkpoint; init_fn gives its shapes only
    tx, _ = make_optimizer(tcfg)
    target, state_sharding = abstract_initial_state(init_fn, tx, mesh, rules, logical, name=name)
    mgr = checkpoint_manager(storage.join(workdir, name, "checkpoints"), tcfg)
    latest = mgr.latest_step()
    if latest is None or latest < tcfg.num_steps:
        raise FileNotFoundError(
            f"{name}: no complete checkpoint in {mgr.directory} (latest step {latest}, want {tcfg.num_steps})"
        )
    state = restore_state(mgr, latest, target, state_sharding)
    mgr.close()
    return state
