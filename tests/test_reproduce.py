"""The reproduction command on the smoke recipe: shared teacher, a finetune run, the GD-II run
that starts from it, the report; then a second invocation that finds everything done."""

import json
import os
import time

import numpy as np
import pytest

from codi_jax import reproduce
from codi_jax.evaluation import repro_report
from configs import repro, sr


@pytest.mark.heavy(125)
def test_reproduce_two_stage_baseline_and_report(tmp_path):
    rcfg = repro.get_config("smoke")
    rcfg.common = (("eval.previews", False),)  # every run's (the TensorBoard previews: the sr end-to-end test's)
    workdir = str(tmp_path / "repro")
    reproduce.run_all(rcfg, workdir, seeds=[0], names=["gd"])  # 'gd' brings its finetune run first
    for name in ("finetune", "gd"):
        assert os.path.isfile(os.path.join(workdir, "seed0", name, "metrics.json")), name
        with open(os.path.join(workdir, "seed0", name, "wall.json")) as f:
            times = json.load(f)
        assert times["wall_s"] > 0 and times["cpu_s"] > 0, (name, times)
    assert os.path.isdir(os.path.join(workdir, "pretrained", "teacher", "checkpoints"))
    # GD-II started from the finetune run: it trained no finetune stage of its own.
    assert not os.path.exists(os.path.join(workdir, "seed0", "gd", "finetune"))
    assert os.path.isdir(os.path.join(workdir, "seed0", "gd", "gd_2steps", "checkpoints"))

    results = str(tmp_path / "docs" / "results.md")
    repro_report.write_report(rcfg, workdir, [0], results, "python -m codi_jax.reproduce --test")
    text = open(results).read()
    for row in ("| Finetuned (DDIM) | 2 |", "| Finetuned + DPM++2M | 2 |", "| GD-II | 2 |", "| bicubic upsampling |"):
        assert row in text, row
    assert "(every run, `eval.previews=False`)" in text
    # Both runs name the shared teacher they started from, and the report says it is one teacher.
    prints = {
        json.load(open(os.path.join(workdir, "seed0", n, "metrics.json")))["teacher_fingerprint"]
        for n in ("finetune", "gd")
    }
    assert len(prints) == 1 and f"same teacher (fingerprint {prints.pop()}" in text
    with open(os.path.join(workdir, "seed0", "gd", "config.json")) as f:
        assert json.load(f)["eval"]["previews"] is False
    assert "2 of 12 runs" in text and "| finetune |" in text and "| gd |" in text and "| run | wall s | CPU s |" in text
    # One step count per run in the smoke recipe: no line to draw, so no (empty) plot.
    assert "(no run with two step counts yet)" in text and "ablations against steps" not in text
    assert not os.path.exists(tmp_path / "docs" / "images" / "results_steps.png")
    assert os.path.isfile(tmp_path / "docs" / "images" / "results_grid_finetune.png")
    # The runs side by side, read back from their grids: LR | bicubic | FT 2 | FT 2 | FT DPM 2 | GD-II | HR
    # (the smoke recipe's few-step count and the finetune run's largest are both 2); no CoDi-family run yet.
    from codi_jax.evaluation import grids

    cells = grids.read_cells(tmp_path / "docs" / "images" / "results_compare.png", 64)
    pictures = repro_report.run_pictures(os.path.join(workdir, "seed0", "gd"))
    assert cells.shape[:2] == (7, 4) and set(pictures) == {"lr", "bicubic", "hr", ("deterministic", 2)}
    np.testing.assert_array_equal(cells[5, :, ::4, ::4], pictures[("deterministic", 2)])  # 16 px cells at 64
    np.testing.assert_array_equal(cells[-1, :, ::4, ::4], pictures["hr"])
    assert "finetuned DDIM at 2 and 2 steps" in text and "results_compare_ablations" not in text

    # Again: both runs are finished, so nothing is retrained or re-evaluated.
    stamp = os.path.getmtime(os.path.join(workdir, "seed0", "gd", "metrics.json"))
    reproduce.run_all(rcfg, workdir, seeds=[0], names=["gd"])
    assert os.path.getmtime(os.path.join(workdir, "seed0", "gd", "metrics.json")) == stamp


def test_run_configs_follow_the_run_list():
    rcfg = repro.get_config("tiny")
    by_name = {r.name: r for r in rcfg.runs}
    cfg = reproduce.run_config(rcfg, by_name["cm_frozen"], 2, "/w", "/t")
    assert (cfg.seed, cfg.teacher.checkpoint, cfg.finetune.checkpoint) == (2, "/t", "/w/seed2/finetune")
    assert (cfg.codi.init, cfg.codi.zs_predictor, cfg.codi.consistency_space, cfg.codi.guidance_weight) == (
        "finetuned",
        "teacher",
        "x",
        0.0,
    )
    assert tuple(cfg.eval.steps) == (1, 2, 4)
    cfg = reproduce.run_config(rcfg, by_name["finetune"], 0, "/w", "/t")
    assert cfg.method == "finetune" and tuple(cfg.eval.steps) == (4, 8, 20, 50)
    assert tuple(cfg.eval.samplers) == ("deterministic", "dpmpp_2m")
    assert repro_report.parse_key("finetune_dpmpp_2m_4step") == ("dpmpp_2m", 4)
    assert repro_report.parse_key("codi_1step") == ("deterministic", 1)
    # `common` reaches every run (and so the teacher, made from the first run's config) under its own overrides.
    rcfg.common = (("data.source", "folder"), ("data.folder", "/my/images"), ("codi.guidance_weight", 0.5))
    for name in ("finetune", "codi", "no_guidance"):
        cfg = reproduce.run_config(rcfg, by_name[name], 0, "/w", "/t")
        assert (cfg.data.source, cfg.data.folder) == ("folder", "/my/images"), name
    assert reproduce.run_config(rcfg, by_name["codi"], 0, "/w", "/t").codi.guidance_weight == 0.5
    assert reproduce.run_config(rcfg, by_name["no_guidance"], 0, "/w", "/t").codi.guidance_weight == 0.0
    rcfg.common = (("data.no_such_field", 1),)
    with pytest.raises(KeyError, match="override 'data.no_such_field' names no config field"):
        reproduce.run_config(rcfg, by_name["codi"], 0, "/w", "/t")


def test_bad_run_list():
    with pytest.raises(KeyError, match="override 'codi.no_such_field' names no config field"):
        reproduce.apply_overrides(sr.get_config("smoke"), {"codi.no_such_field": 1})
    with pytest.raises(ValueError, match=r"--runs has unknown names \['nope'\]"):
        reproduce.run_all(repro.get_config("smoke"), "/nonexistent", [0], names=["nope"])


def test_teacher_fingerprint_tells_teachers_apart(tmp_path):
    import jax
    import jax.numpy as jnp

    from codi_jax import experiment

    params = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones((4,), jnp.bfloat16)}}
    assert experiment.params_fingerprint(params) == "59"  # 0+1+4+9+16+25 + 4
    moved = jax.tree_util.tree_map(lambda x: x * (1 + 1e-3), params)
    assert experiment.params_fingerprint(moved) != experiment.params_fingerprint(params)
    # The report flags runs that started from different teachers, naming them.
    rcfg = repro.get_config("smoke")
    for seed, fingerprint in ((0, "12.5"), (1, "12.5"), (2, "13.1")):
        os.makedirs(tmp_path / f"seed{seed}" / "codi")
        with open(tmp_path / f"seed{seed}" / "codi" / "metrics.json", "w") as f:
            json.dump({"metrics": {}, "teacher_fingerprint": fingerprint}, f)
    line_of = lambda seeds: repro_report.teacher_line(repro_report.collect(rcfg, str(tmp_path), seeds)[3])
    assert "same teacher (fingerprint 12.5" in line_of([0, 1])
    line = line_of([0, 1, 2])
    assert "2 different teachers" in line and "12.5: codi (seed 0), codi (seed 1); 13.1: codi (seed 2)" in line
    assert line_of([3]) == ""  # no run: no line


def test_wall_times_prefer_cleanly_timed_seeds():
    # Seed 0 was timed before CPU time was recorded (its wall time may include pauses).
    assert repro_report.wall_summary([(9000.0, None, False), (800.0, 1200.0, True), (900.0, 1300.0, True)]) == (
        850.0,
        None,
    )
    assert repro_report.wall_summary([(800.0, 1200.0, True), (900.0, 1400.0, True)]) == (850.0, 1300.0)
    assert repro_report.wall_summary([(9000.0, None, False)]) == (9000.0, None)
    # An interrupted, resumed run has its CPU time but is not a clean timing.
    assert repro_report.wall_summary([(1500.0, 2000.0, False), (800.0, 1200.0, True)]) == (800.0, 1600.0)


def test_an_interrupted_run_keeps_its_time_and_is_marked(tmp_path, monkeypatch):
    """Ctrl-C or `kill` part-way: the run's time so far is kept and the run marked; the next invocation
    resumes it and adds its own time. (experiment.run is replaced: this checks the bookkeeping only.)"""
    calls = []

    def run(config, run_dir, stop_after=None):
        calls.append(run_dir)
        time.sleep(0.2)
        if len(calls) == 1:
            raise KeyboardInterrupt
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(reproduce.experiment, "run", run)
    rcfg = repro.get_config("smoke")
    wall = os.path.join(str(tmp_path), "seed0", "finetune", "wall.json")
    with pytest.raises(KeyboardInterrupt):
        reproduce.run_all(rcfg, str(tmp_path), [0], names=["finetune"], teacher_checkpoint="/teacher")
    with open(wall) as f:
        first = json.load(f)
    assert first["interrupted"] == 1 and first["wall_s"] >= 0.2 and first["cpu_s"] is not None
    reproduce.run_all(rcfg, str(tmp_path), [0], names=["finetune"], teacher_checkpoint="/teacher")
    with open(wall) as f:
        second = json.load(f)
    assert second["interrupted"] == 1 and second["wall_s"] >= first["wall_s"] + 0.2
    assert repro_report.read_times(wall)[2] is False and len(calls) == 2


def test_ordering_checks_compare_paired_seeds():
    rcfg = repro.get_config("tiny")

    def row(psnr, seeds):
        return {"psnr": psnr, "ssim": [0.3] * len(seeds), "swd_mean": [0.2] * len(seeds), "seed": seeds}

    rows = {
        ("codi", "codi_4step"): row([21.0, 20.0, 21.5], [0, 1, 2]),
        ("finetune", "finetune_4step"): row([20.5, 20.5], [0, 2]),  # seed 1 not finished
        ("gd", "gd_4step"): row([19.0], [0]),
    }
    lines = {ln.split(":")[0]: ln for ln in repro_report.ordering_checks(rcfg, rows)}
    ft = lines["- CoDi 4 steps vs finetuned, DDIM 4 steps (paper"]
    assert "PSNR 21.25 vs 20.5 (CoDi better; better on 2 of 2 seeds)" in ft  # means over seeds 0 and 2
    assert "SSIM 0.3 vs 0.3 (CoDi worse; better on 0 of 2 seeds)" in ft  # a tie is not a win
    gd = lines["- CoDi 4 steps vs GD-II 4 steps (paper"]
    assert "PSNR 21 vs 19 (CoDi better)" in gd and "seeds" not in gd  # one paired seed: no tally
    assert not any("CM-II" in k for k in lines)  # not finished: no line
    ablations = repro_report.ablation_checks(rcfg, {**rows, ("t_per_batch", "codi_4step"): row([21.2], [0])})
    assert ablations == [
        "- CoDi 4 steps vs one t per batch (the paper's choice) (paper: ahead of one t per sample): "
        "PSNR 21 vs 21.2 (CoDi worse); SSIM 0.3 vs 0.3 (CoDi worse); SWD 0.2 vs 0.2 (CoDi worse)"
    ]


def test_eta_uses_each_runs_time_on_the_seeds_that_finished_it(tmp_path):
    rcfg = repro.get_config("tiny")
    by_name = {r.name: r for r in rcfg.runs}

    def finished(seed, name, wall, **extra):
        d = tmp_path / f"seed{seed}" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text("{}")
        (d / "wall.json").write_text(json.dumps(dict(wall_s=wall, cpu_s=2 * wall, **extra)))

    todo = [(s, by_name[n]) for s in (0, 1) for n in ("finetune", "codi", "gd")]
    assert reproduce.estimate_left(str(tmp_path), todo) is None  # nothing timed yet
    finished(0, "finetune", 900.0)
    finished(0, "codi", 700.0)
    finished(0, "gd", 5000.0, interrupted=1)  # not a clean timing: ignored
    # Left: seed 1's runs; gd has no clean time, so the mean of the cleanly timed runs (800).
    assert reproduce.estimate_left(str(tmp_path), todo) == pytest.approx(900 + 700 + 800)


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch):
    """A run that raises leaves its traceback and the others go on; runs that start from a failed
    finetune run are skipped with the reason; the command's error names every failed run; the report
    of what finished is written and marks the failures; a later attempt clears the old traceback."""
    broken = {"finetune", "codi"}
    ran = []

    def run(config, run_dir, stop_after=None):
        name = os.path.basename(run_dir)
        ran.append(name)
        if name in broken:
            raise ValueError(f"config codi.something: bad value in {name}\nsecond line")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump({"metrics": {}}, f)

    monkeypatch.setattr(reproduce.experiment, "run", run)
    rcfg = repro.get_config("smoke")
    names = ["finetune", "gd", "cm", "pe_codi", "codi", "dx_huber"]
    with pytest.raises(reproduce.RunsFailed) as err:
        reproduce.run_all(rcfg, str(tmp_path), [0], names=names, teacher_checkpoint="/teacher")
    assert ran == ["finetune", "pe_codi", "codi", "dx_huber"]  # gd and cm need the finetune run
    msg = str(err.value)
    assert msg.startswith(
        "4 of 6 runs failed: seed 0 finetune: ValueError: config codi.something: bad value in finetune;"
    )
    assert "seed 0 gd: not run: seed 0's finetune run, which it starts from, failed" in msg
    assert "second line" not in msg
    trace = (tmp_path / "seed0" / "codi" / repro_report.ERROR_FILE).read_text()
    assert "Traceback" in trace and "bad value in codi" in trace

    out = tmp_path / "docs" / "results.md"
    repro_report.write_report(rcfg, str(tmp_path), [0], str(out), "python -m codi_jax.reproduce --test")
    assert "codi (seed 0, failed: `seed0/codi/error.txt`)" in out.read_text()

    broken.clear()  # fixed: the next attempt finishes
    reproduce.run_all(rcfg, str(tmp_path), [0], names=names, teacher_checkpoint="/teacher")
    assert not (tmp_path / "seed0" / "codi" / repro_report.ERROR_FILE).exists()
    repro_report.write_report(rcfg, str(tmp_path), [0], str(out), "python -m codi_jax.reproduce --test")
    walls = [ln for ln in out.read_text().splitlines() if ln.startswith(("| codi |", "| pe_codi |"))]
    assert walls[0].endswith("| 1 |") and walls[1].endswith("| 1 (0 timed in one go) |"), walls  # pe_codi, codi
