"""Splash attention (Pallas TPU flash attention) for the U-Net's self-attention, partitioned with
shard_map.

XLA's attention materialises each head's [q_len, kv_len] score matrix; at SD's 64x64 latents that is
4096 x 4096 per head and example, kept for the backward pass. JAX's splash kernel streams blocks of it
instead (`jax.experimental.pallas.ops.tpu.splash_attention`). A Pallas kernel is one device's program:
the GSPMD partitioner cannot split it, so it runs under `jax.shard_map` over the batch and head axes
the logical rules give those dimensions (as MaxText and MaxDiffusion wrap it), each device attending
over its own examples and heads: no collective is needed.

The kernel wants head_dim a multiple of 128 and sequence lengths a multiple of its blocks; SD's heads
are 40, 80, 160 (SD 1.x) or 64 wide (SD 2.x), so q, k and v are zero-padded to the next multiple of 128
(zeros add nothing to q.k, and the padded output columns are dropped). Off TPU the kernel runs in
Pallas' interpreter (tests compare it with XLA's attention on the CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from codi_jax import sharding

LANES = 128  # the TPU's vector lane width: head_dim and sequence blocks come in multiples of it
MAX_BLOCK = 512


def supports(q_len: int, kv_len: int) -> bool:
    """Whether splash can take these lengths (each a multiple of the lane width)."""
    return q_len % LANES == 0 and kv_len % LANES == 0


def _block(n: int) -> int:
    return math.gcd(n, MAX_BLOCK)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    bq, bkv = _block(q_len), _block(kv_len)
    sizes = splash_kernel.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q_len, kv_len))] * heads)
    with jax.ensure_compile_time_eval():  # its block tables as constants, not tracers of the first caller
        return splash_kernel.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q [B, Lq, H, D], k and v [B, Lkv, H, D] (jax.nn.dot_product_attention's
    layout), computed by the splash kernel; the result in q's dtype."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    if not supports(q_len, kv_len):
        raise ValueError(f"splash attention needs lengths that are multiples of {LANES}; got q {q_len}, kv {kv_len}")
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale
    pad = (-head_dim) % LANES
    to_bhld = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3)
    q, k, v = to_bhld(q), to_bhld(k), to_bhld(v)
    platform = sharding.active_platform()
    interpret = platform != "tpu"
    act = sharding.active()

    def per_shard(q, k, v):
        kernel = _kernel(q.shape[1], q_len, kv_len, interpret)
        return jax.vmap(kernel)(q, k, v)

    if act is None:
        out = per_shard(q, k, v)
    else:
        mesh, rules = act
        spec = sharding.logical_to_spec(("batch", "heads", None, None), q.shape, mesh, rules)
        out = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return out.transpose(0, 2, 1, 3)[..., :head_dim].astype(q.dtype)
