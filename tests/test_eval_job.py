"""The batch evaluation job's answers to bad input (each before any model is built)."""


import pytest

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
    cfg = job.read_run_config(run)
    with pytest.raises(ValueError, match="config method='codi', but .* was trained with method 'finetune'"):
        job.restore_final(cfg, run, expect_method="codi")


def test_unfinished_run(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no codi/checkpoints \(method 'codi'\); did the run finish"):
        job.restore_final(job.read_run_config(run), run)


@pytest.mark.parametrize("field,value,expected", [
    ("shard", 2, r"shard=2 must be in \[0, num_shards=2\)"),
    ("samplers", ("euler",), "samplers='euler'"),
    ("steps", (0,), "steps has 0"),
    ("checkpoint", "", "checkpoint is empty"),
])
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
