"""Each task's production path at minimum size (configs/{inpaint,depth,edit}.py:smoke): teacher ->
CoDi -> evaluation with the task's baseline, metrics and grid."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from codi_jax import experiment, runs, sample
from codi_jax.data import pipeline
from codi_jax.data import tasks as task_data
from codi_jax.evaluation import evaluate, job
from configs import depth, edit, inpaint
from configs import eval as eval_configs


def _finite_rows(report, rows):
    assert set(rows) <= set(report["metrics"]), report["metrics"].keys()
    for name in rows:
        for key, v in report["metrics"][name].items():
            assert np.isfinite(v), (name, key)


def _grid_columns(report, crop):
    width = Image.open(report["grid"]).size[0]
    return (width - 2) // (crop + 2)


def _smoke(module):
    """The task's smoke config; the TensorBoard previews are left to the sr end-to-end test (time)."""
    config = module.get_config("smoke")
    config.eval.previews = False
    return config


@pytest.mark.heavy(75)
def test_inpaint_smoke(tmp_path):
    config = _smoke(inpaint)
    report = experiment.run(config, str(tmp_path))
    _finite_rows(report, ["input", "codi_1step", "codi_2step"])
    for row in ("input", "codi_1step"):
        assert {"psnr_hole", "psnr_known"} <= set(report["metrics"][row])
    # The input baseline leaves the known pixels exact and the hole at 0.
    assert report["metrics"]["input"]["psnr_known"] == pytest.approx(100.0)
    assert report["metrics"]["input"]["psnr_hole"] < 40
    assert report["task"] == "inpaint" and report["grid"].endswith("inpaint_grid.png")
    assert _grid_columns(report, config.data.crop_size) == 4  # masked | CoDi 1 | CoDi 2 | target

    # The batch evaluation job on the inpainting run: the task's baseline and metrics, the same numbers.
    ecfg = eval_configs.get_config()
    ecfg.update(checkpoint=str(tmp_path), steps=(1,), samplers=("deterministic",))
    summary = job.run(ecfg, str(tmp_path / "eval"))
    for key in ("input", "codi_1step"):
        for metric in ("psnr", "psnr_hole"):
            assert summary["metrics"][key][metric] == pytest.approx(report["metrics"][key][metric], abs=1e-3), key
    assert Image.open(summary["grid"]).size[0] == 2 + 3 * (config.data.crop_size + 2)  # masked | CoDi 1 | target
    ecfg.guidance_scale = 2.0
    with pytest.raises(ValueError, match="task 'inpaint'\\) has no prompts to guide with"):
        job.run(ecfg, str(tmp_path / "eval2"))


@pytest.mark.heavy(200)
def test_depth_and_edit_adapters_share_one_backbone(tmp_path):
    """PE-CoDi across tasks: a depth run (which trains the text-to-image teacher) and an edit run on the
    same teacher, each writing its adapter; the sampler loads the backbone once and switches."""
    config = _smoke(depth)
    config.codi.mode = "pe"
    config.eval.steps = (1,)
    depth_dir = str(tmp_path / "depth")
    report = experiment.run(config, depth_dir)
    _finite_rows(report, ["codi_1step"])
    m = report["metrics"]["codi_1step"]
    assert 0.0 <= m["colour_acc_object"] <= 1.0 and 0.0 <= m["colour_acc_wall"] <= 1.0
    assert "input" not in report["metrics"]  # no baseline for depth
    assert _grid_columns(report, config.data.crop_size) == 3  # depth | CoDi 1 | target
    caches = os.listdir(os.path.join(depth_dir, "cache"))
    assert any(f.startswith("prompts_") for f in caches) and "tiny_tokenizer" in caches

    ecfg = _smoke(edit)
    ecfg.codi.mode = "pe"
    ecfg.eval.steps = (1,)
    ecfg.text.guidance_scale = 2.0  # classifier-free guidance: two passes a step
    ecfg.teacher.checkpoint = depth_dir
    edit_dir = str(tmp_path / "edit")
    ereport = experiment.run(ecfg, edit_dir)
    _finite_rows(ereport, ["input", "codi_1step"])
    assert not os.path.exists(os.path.join(edit_dir, "teacher"))  # the depth run's teacher was loaded
    with open(os.path.join(edit_dir, "config.json")) as f:
        assert json.load(f)["text"]["guidance_scale"] == 2.0

    s = sample.AdapterSampler(depth_dir, str(tmp_path / "sampler"))
    s.add("edit", edit_dir, expect_task="edit")
    mem = s.memory()
    assert mem["shared_total_bytes"] < mem["separate_models_bytes"]
    assert mem["backbone_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(s.backbone))

    # The switched-in adapter reproduces its own run's evaluation (same conditions, prompts, guidance, seed,
    # batches); one sampler compile only (time).
    for name, cfg, rep in (("edit", ecfg, ereport),):
        batch = pipeline.make_eval_batch(
            cfg.data, task=cfg.task, num_examples=cfg.eval.num_examples, seed=cfg.eval.seed
        )
        words = task_data.prompts(cfg.data, cfg.task)
        x = s.sample(
            name,
            batch["cond"],
            [words[int(k)] for k in batch["prompt"]],
            steps=1,
            seed=cfg.eval.seed,
            batch_size=cfg.eval.batch_size,
        )
        assert x.shape == batch["image"].shape
        psnr = evaluate.all_metrics(x, batch["image"], cfg.eval)["psnr"]
        assert psnr == pytest.approx(rep["metrics"]["codi_1step"]["psnr"], abs=1e-3), name

    # Bad input: the wrong task, another backbone, a missing prompt, a mask of the wrong size.
    with pytest.raises(ValueError, match="trained for task 'edit', not 'depth'"):
        s.add("x", edit_dir, expect_task="depth")
    with pytest.raises(ValueError, match="needs a prompt for each of the 4 inputs"):
        s.sample("edit", batch["cond"], None, steps=1)
    with pytest.raises(ValueError, match="takes 3-channel conditions"):
        s.sample("edit", batch["cond"][..., :1], None, steps=1)
    s.backbone = jax.tree_util.tree_map(lambda a: a + 1.0, s.backbone)  # another backbone
    s.fingerprint = runs.backbone_fingerprint(s.backbone)
    with pytest.raises(ValueError, match="trained against backbone"):
        s.add("edit2", edit_dir)
