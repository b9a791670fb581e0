"""Small shared builders for the tests: the smoke config and its model pieces."""

import functools
import json
import os

import jax
import numpy as np

from codi_jax import diffusion
from codi_jax.data import pipeline
from codi_jax.methods import base, codi
from configs import sr


def smoke_config(**codi_overrides):
    config = sr.get_config("smoke")
    config.codi.update(codi_overrides)
    return config


def denoisers(config):
    """(diffusion denoiser, consistency denoiser with the eq 17 boundary) of `config`'s model."""
    d = base.make_denoisers(config.model, diffusion.make_schedule(config.schedule), config.codi.boundary)
    return d.diffusion, d.consistency


def codi_setup(config, seed=0):
    """(trainable, frozen, loss_fn, batch) for a CoDi run of `config` with a random-init backbone."""
    plain, wrapped = denoisers(config)
    module = plain.module
    params = base.init_model_params(module, config.model, jax.random.PRNGKey(seed), config.data.crop_size)
    params = base.adapted(params)
    trainable, frozen = codi.split_params(params, config.codi.mode, config.codi.zs_predictor)
    loss_fn = functools.partial(codi.codi_loss, denoiser=wrapped, teacher=plain, cfg=config.codi)
    batch = next(pipeline.make_train_iterator(config.data, task="sr", global_batch_size=4, seed=seed))
    return trainable, frozen, loss_fn, batch


def read_metrics(workdir, expected_rows):
    """The job's metrics.json, checked: exactly `expected_rows`, finite PSNR, non-negative SWD, a grid file."""
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    assert set(saved["metrics"]) == set(expected_rows)
    for row in saved["metrics"].values():
        assert np.isfinite(row["psnr"]) and row["swd_mean"] >= 0.0
    assert os.path.isfile(saved["grid"])
    return saved
