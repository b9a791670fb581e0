"""configs/sr.py (the paper-scale recipe) end to end on a tiny diffusers-format SD folder:
latent-space CoDi distillation from the folder's U-Net, 1-4 step sampling through the VAE, metrics."""

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from codi_jax import experiment, to_diffusers  # noqa: E402
from configs import sr  # noqa: E402
from tests import helpers, sd_folder  # noqa: E402


def _config(folder, **codi):
    config = sr.get_config("")
    config.teacher.pretrained_path = str(folder)
    config.data.crop_size = 16  # 8x8 latents with the tiny VAE's 2x factor
    config.model.adapter.conditioning_embedding_out_channels = (8, 16)  # one stride-2 conv: 2x
    config.codi.update(codi)
    config.codi.train.update(num_steps=4, batch_size=2, warmup_steps=1, log_every=2, checkpoint_every=2)
    config.model.dtype = "float32"  # bf16 compiles slowly on CPU; bf16 compute is checked in test_parity_unet
    config.eval.update(num_examples=2, batch_size=2, grid_examples=2, steps=(1, 4))
    return config


@pytest.mark.heavy(105)
def test_sr_runs_in_latent_space_on_tiny_sd_folder(tmp_path):
    folder = sd_folder.make_tiny_sd(tmp_path / "sd", prediction_type="v_prediction")
    config = _config(folder, guidance_space="pixel")
    workdir = str(tmp_path / "run")
    report = experiment.run(config, workdir)
    saved = helpers.read_metrics(workdir, {"bicubic", "codi_1step", "codi_4step"})
    assert report["metrics"] == saved["metrics"]
    assert [f for f in os.listdir(os.path.join(workdir, "cache")) if f.startswith("prompt_")]

    # Exported, the run is a whole diffusers pipeline folder: the distilled U-Net (8x8 latents) and
    # the mix adapter, beside the teacher's VAE, text encoder, tokenizer and scheduler.
    out = str(tmp_path / "diffusers")
    info = to_diffusers.export_run(workdir, out)
    assert info["teacher_components"] == list(to_diffusers.TEACHER_PARTS) and info["sample_size"] == 8
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet.config.sample_size == 8 and pipe.vae is not None and info["prediction"] == "v"
    assert (
        info["encoder_hidden_states_width"]
        == pipe.unet.config.cross_attention_dim
        == pipe.text_encoder.config.hidden_size
    )


def test_on_the_cpu_the_folders_unet_is_held_once_by_the_codi_state(tmp_path):
    """The folder's float32 U-Net is loaded as host arrays, which nothing could free while the job refers
    to them. On the CPU the teacher stage makes them device arrays (the job keeps no loaded copy), and the
    CoDi stage's state takes them over: once it exists, the teacher's own buffers are gone."""
    import jax
    import numpy as np

    from codi_jax import train

    config = _config(sd_folder.make_tiny_sd(tmp_path / "sd"))
    config.eval.teacher_ddim_steps = 0  # nothing samples the teacher after the CoDi stage starts from it
    job = experiment.setup(config, str(tmp_path / "run"))
    teacher = experiment.teacher_stage(job)
    leaves = jax.tree_util.tree_leaves(teacher)
    held = jax.tree_util.tree_leaves(job.model.pre.unet_params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves + held)
    assert not any(isinstance(x, np.ndarray) for x in held)
    # copies: a numpy view of a CPU array (np.asarray) would keep its buffer from being taken over
    before = {k: np.array(v) for k, v in jax.tree_util.tree_leaves_with_path(teacher)[:3]}

    _, init_fn = experiment.codi_parts(job, teacher, None)
    tx, _ = train.make_optimizer(config.codi.train)
    state, _ = train.initial_state(experiment._with_frozen(init_fn, job.model.space), tx, 0, **job.place)
    assert all(x.is_deleted() for x in leaves)
    # ... and the state holds the teacher's weights (eq 12 starts the student from them)
    unet = dict(jax.tree_util.tree_leaves_with_path(state["params"]["unet"]))
    assert all(np.array_equal(np.asarray(unet[k]), v) for k, v in before.items())


def test_prediction_type_mismatch_is_one_line(tmp_path):
    folder = sd_folder.make_tiny_sd(tmp_path / "sd", prediction_type="epsilon")
    config = _config(folder)
    config.model.prediction = "v"
    with pytest.raises(ValueError, match=r"model.prediction='v' but .*scheduler says the model predicts 'eps'"):
        experiment.run(config, str(tmp_path / "run"))


def test_missing_component_is_named(tmp_path):
    folder = sd_folder.make_tiny_sd(tmp_path / "sd")
    import shutil

    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"has no vae/ component"):
        experiment.run(_config(folder), str(tmp_path / "run"))
