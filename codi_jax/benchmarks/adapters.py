"""What PE-CoDi's per-task adapters save: parameters, disk and memory, one backbone for N tasks.

    python -m codi_jax.benchmarks.adapters [--config=configs/sr.py] [--tasks=4]

Counts come from the model's shapes (jax.eval_shape: no weights, no compute), float32 as stored in
checkpoints and adapter files (bfloat16 halves every byte figure). With a finished run (`--run=DIR`) it
also prints the real file sizes of DIR/adapter/adapter.safetensors and of the final checkpoint.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from codi_jax import logging_utils
from codi_jax.methods import base

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sr.py", "Model config (paper scale: SD-1.5 size).")
_TASKS = flags.DEFINE_integer("tasks", 4, "Number of tasks sharing the backbone.")
_RUN = flags.DEFINE_string("run", "", "A finished PE run: also report its files' sizes.")


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv):
    del argv
    config = _CONFIG.value
    module = base.make_module(config.model)
    factor = 8 if config.model.unet.in_channels == 4 else 1
    side = config.data.crop_size // factor
    shapes = base.abstract_params(module, config.model, side, config.data.crop_size)
    backbone, adapter = _count(shapes["unet"]), _count(shapes["adapter"])
    n = _TASKS.value
    gb = lambda p: p * 4 / 1e9
    print(
        f"backbone {backbone / 1e6:.1f}M params, adapter {adapter / 1e6:.1f}M "
        f"({100 * adapter / (backbone + adapter):.1f}% of {(backbone + adapter) / 1e6:.1f}M), float32"
    )
    print(
        f"{n} tasks, separate full models: {gb(n * (backbone + adapter)):.2f} GB; "
        f"one backbone + {n} adapters: {gb(backbone + n * adapter):.2f} GB "
        f"(saves {gb((n - 1) * backbone):.2f} GB, {100 * (n - 1) * backbone / (n * (backbone + adapter)):.0f}%)"
    )
    if _RUN.value:
        a = os.path.join(_RUN.value, "adapter", "adapter.safetensors")
        ck = os.path.join(_RUN.value, "codi", "checkpoints")
        print(
            f"run {_RUN.value}: adapter file {os.path.getsize(a) / 1e6:.2f} MB; codi checkpoints "
            f"(train state: params, EMA, Adam moments; all kept steps) {_dir_bytes(ck) / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    logging_utils.run_cli(main)
