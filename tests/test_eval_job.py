"""The batch evaluation job's answers to bad input (each before any model is built)."""

import pytest

from codi_jax import build, runs
from codi_jax.data import pipeline
from codi_jax.evaluation import job
from configs import eval as eval_configs
from tests import helpers


def _run_dir(tmp_path, method="codi"):
    config = helpers.smoke_config()
    config.method = method
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort())
    return str(run)


def test_checkpoint_without_config_json(tmp_path):
    ecfg = eval_configs.get_config()
    ecfg.checkpoint = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        job.run(ecfg, str(tmp_path / "out"))


def test_checkpoint_of_another_method(tmp_path):
    run = _run_dir(tmp_path, method="finetune")
    cfg = runs.read_run_config(run)
    with pytest.raises(ValueError, match="config method='codi', but .* was trained with method 'finetune'"):
        runs.restore_final(cfg, run, expect_method="codi")


def test_unfinished_run(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no codi/checkpoints \(method 'codi'\); did the run finish"):
        runs.restore_final(runs.read_run_config(run), run)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("shard", 2, r"shard=2 must be in \[0, num_shards=2\)"),
        ("samplers", ("euler",), "samplers='euler'"),
        ("steps", (0,), "steps has 0"),
        ("checkpoint", "", "checkpoint is empty"),
    ],
)
def test_bad_job_config(tmp_path, field, value, expected):
    ecfg = eval_configs.get_config()
    ecfg.update(checkpoint="/somewhere", num_shards=2)
    ecfg[field] = value
    with pytest.raises(ValueError, match=expected):
        job.validate(ecfg)


def test_split_with_fewer_images_than_asked():
    data = helpers.smoke_config().data
    n = len(data.eval_images)
    with pytest.raises(ValueError, match=f"data split 'eval' has {n} images; at least {n + 1} asked"):
        pipeline.make_eval_batch(data, task="sr", num_examples=2, seed=0, min_images=n + 1)


@pytest.mark.parametrize(
    "change,expected",
    [
        (dict(task="depth"), "task 'depth' samples with text prompts"),
        (dict(teacher_path="/some/sd"), "a latent-space run"),
        (dict(steps=()), r"--steps=\[\] and --eps_scales"),
        (dict(eps_scales=(0.0,)), "scales > 0"),
    ],
)
def test_diagnose_refuses_what_it_cannot_read(tmp_path, change, expected):
    from codi_jax.evaluation import diagnose

    config = helpers.smoke_config()
    if "task" in change:
        config.task = change["task"]
    if "teacher_path" in change:
        config.teacher.pretrained_path = change["teacher_path"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json_best_effort())
    with pytest.raises(ValueError, match=expected):
        diagnose.diagnose(str(run), steps=change.get("steps", (4,)), eps_scales=change.get("eps_scales", (1.0,)))


def test_partial_restore_reads_only_what_evaluation_needs(tmp_path):
    import numpy as np
    import orbax.checkpoint as ocp

    state = {
        "params": {"w": np.ones((3,), np.float32)},
        "ema_params": {"w": np.full((3,), 2.0, np.float32)},
        "frozen": {},
        "opt_state": {"mu": np.zeros((3,), np.float32)},
    }
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    mgr.close()
    got = runs.restore_subtrees(str(tmp_path / "ckpt"), 5, ("ema_params",))
    assert list(got) == ["ema_params"] and got["ema_params"]["w"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"step 5's train state has no \['teacher'\]"):
        runs.restore_subtrees(str(tmp_path / "ckpt"), 5, ("ema_params", "teacher"))


def test_checkpoint_of_another_model_size(tmp_path):
    """A finished run whose weights do not fit the model its config.json builds (an edited config, a
    finetune checkpoint of another size): the parameter and both shapes are named, before sampling."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from codi_jax import train
    from codi_jax.methods import base
    from codi_jax.models import layers

    def model_and_zeros(cfg):
        model = build.build_model(cfg, str(tmp_path / "out"))
        c = model.config
        abstract = layers.unbox(base.abstract_params(model.module, c.model, model.space.shape[0], c.data.crop_size))
        return model, jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)

    run = _run_dir(tmp_path)
    model, params = model_and_zeros(runs.read_run_config(run))
    cfg = model.config
    steps = runs.final_stage_steps(cfg)
    mgr = ocp.CheckpointManager(str(tmp_path / "run" / "codi" / "checkpoints"))
    mgr.save(steps, args=ocp.args.Composite(state=ocp.args.StandardSave({"ema_params": params, "frozen": {}})))
    mgr.wait_until_finished()
    mgr.close()
    restored, _, step = runs.restore_final(cfg, run, model=model)  # the right shapes pass
    assert step == steps and set(restored) == {"unet", "adapter"}

    cfg.model.unet.block_out_channels = tuple(2 * c for c in cfg.model.unet.block_out_channels)
    wider, _ = model_and_zeros(cfg)
    with pytest.raises(
        train.CheckpointMismatchError,
        match=r"codi/checkpoints/\d+: \['params'\]\['adapter'\].* has shape \(.*\), this config's "
        r"model \(.*\): a checkpoint of another model size",
    ):
        runs.restore_final(cfg, run, model=wider)


def test_an_older_run_config_is_read_with_the_fields_added_since(tmp_path):
    """runs.read_run_config upgrades a config.json written before fields were added (the one place old
    configs are read forward): each missing field comes back with the value older runs behaved by; a
    current config comes back unchanged."""
    import json as json_lib

    from configs import sr

    current = sr.get_config("smoke").to_dict()
    old = json_lib.loads(json_lib.dumps(current))
    for dotted, _ in runs.ADDED_FIELDS:
        node, *path = old, *dotted.split(".")
        for p in path[:-1]:
            node = node[p]
        node.pop(path[-1])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json_lib.dumps(old))
    upgraded = runs.read_run_config(str(tmp_path / "old"))
    for dotted, value in runs.ADDED_FIELDS:
        node = upgraded
        for p in dotted.split("."):
            node = node[p]
        assert node == value, dotted
    assert upgraded.codi.eps_target == "wrapped"  # trained before the s = 0 fix
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text(json_lib.dumps(current))
    assert json_lib.loads(runs.read_run_config(str(tmp_path / "new")).to_json()) == json_lib.loads(
        json_lib.dumps(current)
    )
