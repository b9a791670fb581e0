"""Device mesh, logical axis rules, and the shardings of the train state and batches.

Modules never name a mesh axis. They put *logical* names on their weights
(`models/layers.py`: 'embed', 'mlp', 'heads', 'conv_in', 'conv_out', 'vocab') and on
activations ('batch', 'height', 'width', 'channels'); `config.mesh.rules` maps each
logical name to a tuple of mesh axes. With the default rules:
  - batches are split over ('data', 'fsdp'): FSDP is data parallel too;
  - each weight's input dimension ('embed' / 'conv_in') is split over 'fsdp', so online
    params, EMA params and both Adam moments are stored 1/fsdp per device (ZeRO-3 style;
    the compiler all-gathers a layer's weights where they are used);
  - output dimensions ('mlp', 'heads', 'conv_out', 'vocab') go over 'tensor' (Megatron-style
    tensor parallelism when mesh.ici has tensor > 1).
A dimension that a mesh axis does not divide stays whole (logged once per stage), and a
mesh axis is used at most once per array. Biases and norm scales carry no names: replicated.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


# ----------------------------------------------------------------------------------------------
# Mesh


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici, dcn) sizes per axis from config; one -1 in `mesh.ici` takes the devices left over."""
    axes, ici, dcn = tuple(mesh_cfg.axes), list(mesh_cfg.ici), list(mesh_cfg.dcn)
    if not (len(axes) == len(ici) == len(dcn)):
        raise ValueError(f"config mesh.axes {axes}, mesh.ici {tuple(ici)} and mesh.dcn {tuple(dcn)} differ in length")
    if any(d < 1 for d in dcn) or math.prod(dcn) != num_slices:
        raise ValueError(f"config mesh.dcn={tuple(dcn)} must multiply to the number of slices ({num_slices})")
    per_slice = num_devices // num_slices
    if ici.count(-1) > 1:
        raise ValueError(f"config mesh.ici={tuple(ici)} has more than one -1")
    if -1 in ici:
        known = math.prod(x for x in ici if x != -1)
        if known < 1 or per_slice % known:
            raise ValueError(
                f"config mesh.ici={tuple(ici)}: {per_slice} devices per slice are not divisible by {known}"
            )
        ici[ici.index(-1)] = per_slice // known
    if any(x < 1 for x in ici) or math.prod(ici) != per_slice:
        raise ValueError(f"config mesh.ici={tuple(ici)} uses {math.prod(ici)} devices per slice; there are {per_slice}")
    return tuple(ici), tuple(dcn)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The device mesh of `config.mesh` (axes, ici sizes, dcn sizes across slices)."""
    devices = list(jax.devices() if devices is None else devices)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_shape(mesh_cfg, len(devices), num_slices)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):  # topologies mesh_utils does not know
            grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, tuple(mesh_cfg.axes))


# ----------------------------------------------------------------------------------------------
# Logical names -> mesh axes


def rules_from_config(mesh_cfg) -> dict[str, tuple[str, ...]]:
    """`config.mesh.rules`: {logical name: tuple of mesh axes} (a bare string is one axis)."""
    rules = {}
    for name, axes in dict(mesh_cfg.rules).items():
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in axes if a not in mesh_cfg.axes]
        if bad:
            raise ValueError(
                f"config mesh.rules.{name}={axes} names mesh axes {bad} not in mesh.axes={tuple(mesh_cfg.axes)}"
            )
        rules[name] = axes
    return rules


def logical_to_spec(names, shape, mesh: Mesh, rules: Mapping[str, tuple[str, ...]], dropped=None) -> P:
    """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

    A dimension keeps only the mesh axes (of size > 1) that divide it and that no earlier
    dimension took. `dropped` collects (name, dim, axis) that did not divide.
    """
    if names is None:
        return P()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match an array of shape {tuple(shape)}")
    used, out = set(), []
    for name, dim in zip(names, shape):
        axes = []
        size = 1
        for axis in rules.get(name, ()) if name is not None else ():
            n = mesh.shape[axis]
            if n == 1 or axis in used:
                continue
            if dim % (size * n):
                if dropped is not None:
                    dropped.append((name, dim, axis))
                continue
            axes.append(axis)
            used.add(axis)
            size *= n
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def tree_shardings(shapes, logical, mesh: Mesh, rules, dropped=None):
    """NamedShardings for a tree of arrays/ShapeDtypeStructs; `logical` is a matching tree of
    logical-name tuples (None: replicated), or None for a wholly replicated tree."""
    if logical is None:
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), shapes)
    return jax.tree_util.tree_map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh, rules, dropped)),
        logical,
        shapes,
        is_leaf=lambda n: n is None or isinstance(n, tuple),
    )


def state_shardings(state_shapes: dict, logical: Mapping[str, Any], mesh: Mesh, rules, tx, name: str = "state"):
    """Shardings of the train state {step, params, ema_params, opt_state, rng, frozen}.

    `logical` maps the top-level keys of params/frozen ('unet', 'adapter', 'vae', ...) to
    trees of logical names; keys it lacks are replicated. Adam's moments follow their
    params (optax.tree_map_params); the step, counters and the RNG are replicated.
    """
    dropped = []

    def part(tree):
        return {k: tree_shardings(v, logical.get(k), mesh, rules, dropped) for k, v in tree.items()}

    params_sh = part(state_shapes["params"])
    repl = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        state_shapes["opt_state"],
        params_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    out = {
        "step": repl,
        "params": params_sh,
        "ema_params": part(state_shapes["ema_params"]),
        "opt_state": opt_sh,
        "rng": repl,
        "frozen": part(state_shapes["frozen"]),
    }
    if dropped:
        kinds = sorted({f"{n}={d} by {a}({mesh.shape[a]})" for n, d, a in dropped})
        logging.info(
            "%s: %d weight dimensions stay whole (mesh axis does not divide them): %s",
            name,
            len(dropped),
            ", ".join(kinds[:8]) + (" ..." if len(kinds) > 8 else ""),
        )
    return out


def describe(shardings) -> str:
    """A one-line summary: how many leaves are sharded, and over which axes."""
    specs = [s.spec for s in jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))]
    axes = sorted({a for spec in specs for dim in spec if dim for a in ((dim,) if isinstance(dim, str) else dim)})
    return f"{sum(1 for s in specs if any(s))}/{len(specs)} arrays sharded over {axes or 'nothing'}"


# ----------------------------------------------------------------------------------------------
# Batches


def batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    return tuple(a for a in rules.get("batch", ()) if mesh.shape[a] > 1)


def batch_sharding(mesh: Mesh, rules=None, ndim: int = 1) -> NamedSharding:
    axes = batch_axes(mesh, rules if rules is not None else {"batch": ("data", "fsdp")})
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(first))


def batch_shards(mesh: Mesh, rules) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def put_batch(batch: dict, mesh: Mesh, rules=None) -> dict:
    """Process-local numpy batch -> global jax arrays, split over the batch axes.

    Each process passes its own rows (grain's per-process share); the global batch is
    the processes' rows in process order.
    """
    sh = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, key: str, rules=None):
    rules = rules if rules is not None else {"batch": ("data", "fsdp")}
    n = batch_shards(mesh, rules)
    if batch_size % n:
        raise ValueError(
            f"config {key}={batch_size} is not divisible by the {n} batch shards (mesh axes {batch_axes(mesh, rules)})"
        )
    if batch_size % jax.process_count():
        raise ValueError(f"config {key}={batch_size} is not divisible by the {jax.process_count()} processes")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------------------------
# Activation constraints (used by models/layers.constrain at trace time)

_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """While tracing inside this context, `layers.constrain` pins activations to the rules."""
    prev = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVE.value = prev


def active():
    """(mesh, rules) while tracing inside `activation_rules`, else None."""
    return getattr(_ACTIVE, "value", None)


def active_platform() -> str:
    """The platform the program being traced is for: the active mesh's devices (an AOT compile for a TPU
    topology traces on a CPU host), else JAX's default backend."""
    act = active()
    return act[0].devices.flat[0].platform if act is not None else jax.default_backend()


def constrain(x, names):
    """with_sharding_constraint by logical names; a no-op outside `activation_rules`."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


# ----------------------------------------------------------------------------------------------
# Multi-host


def sync_processes(name: str) -> None:
    """A barrier across processes (nothing with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize_distributed(
    coordinator: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    heartbeat_timeout_s: int = 60,
    initialization_timeout_s: int = 300,
) -> bool:
    """`jax.distributed.initialize` from flags, or from the environment where JAX detects the
    cluster itself (TPU pods, SLURM, ...). Returns whether more than one process runs.

    heartbeat_timeout_s: a process that stops answering for this long makes the coordination
    service fail the others (they exit with an error instead of hanging in a collective).
    """
    kw = dict(initialization_timeout=initialization_timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
    if coordinator:
        if num_processes < 1 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id, **kw
        )
    else:
        jax.distributed.initialize(**kw)  # cluster auto-detection (TPU VM metadata, SLURM, MPI, ...)
    logging.info(
        "process %d of %d; %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return jax.process_count() > 1


def abstract(tree, shardings):
    """ShapeDtypeStructs carrying shardings (for AOT lowering and Orbax restore targets)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=s), tree, shardings
    )
