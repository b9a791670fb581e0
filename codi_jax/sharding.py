"""Device mesh and shardings. The model code never names a mesh axis.

For now: a 'data' axis over all devices (batch sharded, state replicated). FSDP and
logical axis rules widen this module (issue 4).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_cfg) -> Mesh:
    devices = jax.devices()
    n = mesh_cfg.data if mesh_cfg.data != -1 else len(devices)
    if n < 1 or len(devices) % n:
        raise ValueError(f"config mesh.data={mesh_cfg.data} does not divide the {len(devices)} devices")
    return Mesh(np.asarray(devices[:n]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> global jax arrays sharded over 'data'."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, key: str):
    n = mesh.shape["data"] * 1
    if batch_size % n or batch_size % jax.process_count():
        raise ValueError(f"config {key}={batch_size} is not divisible by the {n} devices on the 'data' axis")
