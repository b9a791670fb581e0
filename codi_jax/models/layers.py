"""Dense and conv layers whose kernels carry logical axis names (see codi_jax/sharding.py).

Kernels are boxed with `nn.with_logical_partitioning` at init; `init_params` strips the
boxes, so params stay plain arrays, and `logical_names` reads the names back for the
sharding rules. Biases and norm scales are left unnamed (replicated: they are small).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from codi_jax import sharding

DENSE = ("embed", "mlp")  # (in, out) of a projection that widens or keeps the width
DENSE_OUT = ("mlp", "embed")  # (in, out) of a projection back to the residual width
QKV = ("embed", "heads")
ATTN_OUT = ("heads", "embed")
CONV = (None, None, "conv_in", "conv_out")
IMAGE = ("batch", "height", "width", "channels")


def dense(features, name, dtype, names=DENSE, use_bias=True, **kw):
    init = kw.pop("kernel_init", nn.linear.default_kernel_init)
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, name=name, kernel_init=nn.with_logical_partitioning(init, names), **kw
    )


def conv(features, kernel, name, dtype, *, strides=1, padding="SAME", zero=False, **kw):
    init = nn.initializers.zeros if zero else kw.pop("kernel_init", nn.linear.default_kernel_init)
    if zero:
        kw["bias_init"] = nn.initializers.zeros
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        name=name,
        kernel_init=nn.with_logical_partitioning(init, CONV),
        **kw,
    )


def constrain(x, names=IMAGE):
    """Pin an activation's sharding by logical names (no-op outside sharding.activation_rules)."""
    return sharding.constrain(x, names)


def _is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
    """Plain arrays (or ShapeDtypeStructs) from a tree that may hold logical-partitioning boxes."""
    return nn.meta.unbox(tree)


def logical_names(tree):
    """The logical-name tuple of every boxed leaf; None (replicated) for unboxed ones."""
    return jax.tree_util.tree_map(
        lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None, tree, is_leaf=_is_box
    )
