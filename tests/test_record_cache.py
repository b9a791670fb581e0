"""The record cache (MaxDiffusion's latent and text caching): `codi_jax.pretrained.record_cache` writes the
frozen VAE's posterior of each record's crop and the text encoder's output of its text into the
records; a run on them skips both encoders in its step and sees what they would have computed there."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from codi_jax import build, experiment  # noqa: E402
from codi_jax.data import pipeline, records  # noqa: E402
from codi_jax.methods import latent  # noqa: E402
from codi_jax.pretrained import record_cache  # noqa: E402
from configs import edit  # noqa: E402
from tests import sd_folder  # noqa: E402
from tests.test_prepare import _prepare, _rewrite_record  # noqa: E402

CROP = 16  # 8 x 8 latents with the tiny VAE's 2x factor


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A tiny SD folder, the example edit JSONL prepared, and its cached copy (float32)."""
    tmp = tmp_path_factory.mktemp("cache")
    sd = str(sd_folder.make_tiny_sd(tmp / "sd"))
    m, prepared = _prepare(tmp, "edit_jsonl")
    out = str(tmp / "cached")
    record_cache.cache_records(prepared, out, sd, crop_size=CROP, dtype="float32", batch_size=3)
    mc = records.read_manifest(out)
    return dict(tmp=tmp, sd=sd, manifest=m, prepared=prepared, cached=out, cached_manifest=mc)


def _config(c, **data):
    config = edit.get_config("smoke")
    config.teacher.pretrained_path = c["sd"]
    config.model.adapter.conditioning_embedding_out_channels = (8, 16)  # one stride-2 conv: 2x
    config.model.adapter.input = edit.get_config("").model.adapter.input  # the paper-scale recipe's (latents)
    config.model.dtype = "float32"
    config.model.prediction = "auto"  # the folder's scheduler says
    config.text.encoder = "pretrained"
    config.text.prompt_source = "encoder"
    config.eval.update(previews=False, steps=(1,))
    fixed = dict(source="array_record", path=c["cached"], eval_fraction=0.2, crop_size=CROP, image_downscale=1)
    config.data.update({**fixed, "random_flip": False, **data})
    return config


def test_the_cache_pass_stores_what_the_encoders_make_of_each_records_centre_crop(cached):
    m, mc = cached["manifest"], cached["cached_manifest"]
    assert mc["num_records"] == m["num_records"] and mc["num_skipped"] == 0
    c = mc["cache"]
    assert c["latent_shape"] == [CROP // 2, CROP // 2, 4] and c["context_shape"] == [8, 32] and c["target"] == "edited"
    assert mc["content_hash"] != m["content_hash"] and mc["source"]["inputs_sha256"] == m["content_hash"]
    enc = record_cache.Encoders(cached["sd"], cached["sd"])
    codec = latent.LatentCodec(enc.vae, 1.0)
    src = records.RecordSource(mc, cache_fields=("latent", "context"))
    plain = records.RecordSource(m)
    for i in (0, len(src) - 1):
        rec, full = src[i], plain[i]
        h, w = full["b"].shape[:2]
        y, x = record_cache.centre_box(h, w, CROP)
        # The pixels are the edited image's centre crop (the target) and the input's same crop.
        np.testing.assert_array_equal(rec["pixels"]["b"], full["b"][y : y + CROP, x : x + CROP])
        np.testing.assert_array_equal(rec["pixels"]["a"], full["a"][y : y + CROP, x : x + CROP])
        mean, logvar = codec.moments(enc.vae_params, pipeline.to_signed(rec["pixels"]["b"])[None])
        np.testing.assert_allclose(rec["cache"]["latent_mean"], mean[0], atol=1e-5)
        np.testing.assert_allclose(rec["cache"]["latent_logvar"], logvar[0], atol=1e-5)
        np.testing.assert_allclose(rec["cache"]["context"], enc.text.embed([full["text"]])[0], atol=1e-5)
    # A rerun finds every shard complete and writes the same set.
    again = record_cache.cache_records(
        cached["prepared"], cached["cached"], cached["sd"], crop_size=CROP, dtype="float32"
    )
    assert again["content_hash"] == mc["content_hash"]
    with pytest.raises(ValueError, match="already a cached set"):
        record_cache.cache_records(cached["cached"], str(cached["tmp"] / "twice"), cached["sd"], crop_size=CROP)


def test_the_step_on_cached_records_sees_what_it_computes_from_pixels(cached):
    """The loss's latents and contexts from the cache equal those the encoders compute in the step from
    the same pixels and tokens, with the same posterior noise and the same dropped prompts."""
    config = _config(cached)
    model = build.build_model(config, str(cached["tmp"] / "run"))
    space = model.space
    assert space.cache_fields == ("latent", "context")
    assert "text_encoder" not in space.with_frozen({})  # the state holds no text encoder
    it = pipeline.make_train_iterator(
        config.data, task="edit", global_batch_size=4, seed=0, prompt_fn=space.prompt_fn,
        cache_fields=space.cache_fields,
    )  # fmt: skip
    batch = next(it)
    assert batch["latent_mean"].shape == (4, 8, 8, 4) and batch["context"].shape == (4, 8, 32)

    seen = {}

    def probe(params, frozen, ema, b, rng):
        seen.update(latents=b["image"], context=b["context"], pixels=b["pixels"])
        return 0.0, {}

    in_step = dataclasses.replace(space.prompts, empty=None)
    rng = jax.random.PRNGKey(3)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    out = {}
    for name, prompts, b in (
        ("cached", space.prompts, jb),
        ("in_step", in_step, {k: v for k, v in jb.items() if k not in ("latent_mean", "latent_logvar", "context")}),
    ):
        frozen = dict(vae=model.pre.vae_params, context=model.pre.context, **prompts.frozen())
        loss = prompts.loss(latent.latent_loss(probe, model.codec), 0.5, constant=False)
        loss(None, frozen, None, b, rng)
        out[name] = dict(seen)
    np.testing.assert_allclose(out["cached"]["latents"], out["in_step"]["latents"], atol=1e-4)
    np.testing.assert_allclose(out["cached"]["context"], out["in_step"]["context"], atol=1e-5)
    np.testing.assert_array_equal(out["cached"]["pixels"], out["in_step"]["pixels"])
    empty = space.prompts.empty[0]
    dropped = [bool(np.allclose(c, empty, atol=1e-6)) for c in out["cached"]["context"]]
    assert any(dropped) and not all(dropped), dropped  # dropout 0.5 dropped some of the four, not all


@pytest.mark.heavy(30)
def test_a_run_trains_on_cached_records_and_says_so(cached, caplog):
    caplog.set_level("INFO")
    config = _config(cached)
    config.codi.train.update(num_steps=4, batch_size=2, warmup_steps=1, log_every=2, checkpoint_every=2)
    report = experiment.run(config, str(cached["tmp"] / "run_cached"))
    assert all(np.isfinite(v) for v in report["metrics"]["codi_1step"].values()), report["metrics"]
    assert "the train step skips the VAE encoder and the text encoder" in caplog.text
    assert report["data"]["codi"]["skipped_records"] == 0


def test_a_cache_that_does_not_fit_the_run_is_one_line(cached):
    workdir = str(cached["tmp"] / "bad")
    for change, message in (
        (
            dict(random_flip=True),
            r"cache: the cached latents are of fixed, unflipped crops but config data.random_flip",
        ),
        (dict(crop_size=32), r"cache.crop_size=16 but config data.crop_size=32: re-run the cache pass"),
        (dict(image_downscale=2), r"cache.image_downscale=1 but config data.image_downscale=2"),
        (dict(cache="sometimes"), r"config data.cache='sometimes' is not one of \('auto', 'off'\)"),
    ):
        with pytest.raises(ValueError, match=message):
            build.build_model(_config(cached, **change), workdir)
    assert build.build_model(_config(cached, cache="off"), workdir).space.cache_fields == ()
    # Latents of another VAE (same architecture, other weights) are refused.
    other = _config(cached)
    other.teacher.pretrained_path = str(sd_folder.make_tiny_sd(cached["tmp"] / "sd_other", seed=1))
    with pytest.raises(ValueError, match=r"cache.vae: the latents were made by another VAE"):
        build.build_model(other, workdir)
    # A record without its cache fields (a mixed-up set): skipped and counted like any corrupt record.
    mixed = str(cached["tmp"] / "mixed")
    shutil.copytree(cached["cached"], mixed)
    m = records.read_manifest(mixed)
    _rewrite_record(os.path.join(mixed, m["shards"][0]["file"]), 1, lambda d: records.encode_record(
        {k: v for k, v in d.items() if k != "latent_mean"}))  # fmt: skip
    src = records.RecordSource(m, cache_fields=("latent",))
    assert not isinstance(src[0], records.Corrupt)
    assert isinstance(src[1], records.Corrupt) and "no 'latent_mean' field" in src[1].reason
