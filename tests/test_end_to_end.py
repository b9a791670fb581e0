"""The production path at minimum size (configs/sr.py:smoke) and the CLI's answers to bad input."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import experiment, to_diffusers
from codi_jax.evaluation import diagnose, job
from configs import eval as eval_configs
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.heavy(170)
def test_smoke_run_end_to_end_then_resume(tmp_path):
    config = helpers.smoke_config()
    workdir = str(tmp_path / "runs" / "smoke")
    report = experiment.run(config, workdir)

    saved = helpers.read_metrics(workdir, {"bicubic", "codi_1step", "codi_2step"})
    for row in saved["metrics"].values():
        assert 0.0 < row["ssim"] <= 1.0
    grid = Image.open(saved["grid"])
    crop = config.data.crop_size
    assert grid.size[0] == 2 + 5 * (crop + 2)  # LR | bicubic | CoDi 1 | CoDi 2 | HR, 2 px gutters
    assert grid.size[1] > 4 * (crop + 2)  # a header and 4 example rows
    for stage in ("teacher", "codi"):
        assert glob.glob(os.path.join(workdir, stage, "tensorboard", "events.out.tfevents.*")), stage
        assert os.listdir(os.path.join(workdir, stage, "checkpoints"))

    # The same command again: both stages are complete, so nothing retrains and results repeat.
    again = experiment.run(config, workdir)
    assert again["metrics"] == report["metrics"]

    # The batch evaluation job on the finished run, split over two shards (one entry each). Its programs
    # are the run's own evaluation's (same sampler, steps and shapes: compiled once, by the cache).
    ecfg = eval_configs.get_config()
    ecfg.update(checkpoint=workdir, steps=(1, 2), samplers=("deterministic",), num_shards=2)
    out = str(tmp_path / "eval")
    ecfg.shard = 1
    assert job.run(ecfg, out) is None  # shard 0's entry is still missing
    ecfg.shard = 0
    summary = job.run(ecfg, out)
    # Same crops, seeds and weights as the run's own evaluation: the same numbers.
    for key in ("bicubic", "codi_1step", "codi_2step"):
        assert summary["metrics"][key]["psnr"] == pytest.approx(report["metrics"][key]["psnr"], abs=1e-4), key
    assert os.path.isfile(summary["grid"]) and os.path.isfile(summary["plot"])
    assert Image.open(summary["grid"]).size[0] == 2 + 5 * (crop + 2)  # LR, bicubic, 2 entries, HR
    before = os.path.getmtime(os.path.join(out, "eval", "entries", "codi_1step.json"))
    job.run(ecfg, out)  # resumes: nothing to redo
    assert os.path.getmtime(os.path.join(out, "eval", "entries", "codi_1step.json")) == before

    # The diagnosis walks the evaluation's own sampling path: its last x_hat is the evaluation's sample
    # (eps_scale's effect on the path: tests/test_sampling.py, on Gaussian data).
    diag = diagnose.diagnose(workdir, steps=(2,), eps_scales=(1.0,), log=lambda *_: None)
    path = diag["paths"]["ddim2_eps1"]
    assert [r["step"] for r in path] == [1, 2]
    assert path[-1]["psnr"] == pytest.approx(report["metrics"]["codi_2step"]["psnr"], abs=1e-4)
    assert all(r["identity_mse"] > 0 and -1 <= r["eps_corr"] <= 1 for r in diag["denoiser"])

    # The README's commands that take a run folder, typed as a user does: from the folder above the
    # run, with relative paths (the run is runs/smoke under tmp_path).
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 128).save(tmp_path / "lr.png")
    readme = {
        "codi_jax.sample": ["--run=runs/smoke", "--inputs=lr.png", "--steps=1", "--out=runs/sampled"],
        "codi_jax.main": [
            f"--config={REPO}/configs/eval.py",
            "--config.checkpoint=runs/smoke",
            "--workdir=runs/smoke_eval",
            "--config.steps=(1,)",
            "--config.samplers=('deterministic',)",
        ],
        "codi_jax.evaluation.diagnose": ["--run=runs/smoke", "--steps=1"],
    }
    for module, args in readme.items():
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=tmp_path,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (module, done.stderr[-2000:])
    assert os.path.isfile(tmp_path / "runs" / "sampled" / "lr.png")
    assert os.path.isfile(tmp_path / "runs" / "smoke_eval" / "eval" / "metrics.json")
    assert os.path.isfile(tmp_path / "runs" / "smoke" / "diagnose.json")

    # The distilled weights as diffusers folders: PyTorch's UNet2DConditionModel and ControlNet-free mix
    # adapter file, and codi_jax.json with what sampling them needs.
    out = str(tmp_path / "runs" / "smoke_diffusers")
    info = to_diffusers.export_run(workdir, out)
    assert info["components"] == {"unet": "unet", "adapter_mix": "adapter_mix.safetensors"}
    assert info["step"] == config.codi.train.num_steps and info["method"] == "codi" and info["teacher_components"] == []
    assert info["evaluated"] == report["metrics"] and info["prediction"] == config.model.prediction
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    assert unet.config.sample_size == crop and unet.config.cross_attention_dim == info["encoder_hidden_states_width"]
    with torch.no_grad():
        y = unet(torch.zeros(1, 3, crop, crop), torch.tensor([500]), torch.zeros(1, 1, 1)).sample
    assert y.shape == (1, 3, crop, crop) and bool(torch.isfinite(y).all())
    with pytest.raises(FileExistsError, match="not empty"):
        to_diffusers.export_run(workdir, out)


def _cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "codi_jax.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ["--config=configs/sr.py:smoke", "--config.codi.zs_predicter=prev"],
            "unknown config field 'zs_predicter' Did you mean \"zs_predictor\"",
        ),
        (["--config=configs/sr.py:smoke", "--config.codi.zs_predictor=bogus"], "codi.zs_predictor='bogus'"),
        (["--config=configs/sr.py:smoke", "--config.codi.delta_t=0"], "codi.delta_t=0"),
        (["--config=configs/sr.py:smokey"], "unknown variant 'smokey'"),
        (["--config=configs/sr.py:smoke", "--config.method=distill"], "method='distill' is not one of"),
        (["--config=configs/sr.py:smoke", "--config.eval.samplers=('ddim','euler')"], "eval.samplers='ddim'"),
        (["--config=configs/eval.py"], "config checkpoint is empty"),
        (["--config=configs/sr.py"], "needs a pretrained model"),
        (
            ["--config=configs/sr.py", "--config.teacher.pretrained_path=/nonexistent/sd"],
            "pretrained model folder /nonexistent/sd does not exist",
        ),
    ],
)
def test_bad_config_gives_one_clear_line(tmp_path, args, expected):
    out = _cli(*args, f"--workdir={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = _cli("--config=configs/sr.py:smoke", f"--workdir={blocker}/run")
    assert out.returncode == 2
    assert f"--workdir={blocker}/run is not writable" in out.stderr
