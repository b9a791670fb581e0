"""Every entry point answers bad input the same way: one `error: ...` line naming what is wrong, exit
code 2, no traceback (codi_jax/logging_utils.py `run_cli`)."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

CASES = [
    # (module, arguments, what the line must name)
    (
        "codi_jax.main",
        ["--config=configs/sr.py:smoke", "--config.codi.mode=half", "--workdir=WORK"],
        "codi.mode='half'",
    ),
    ("codi_jax.main", ["--config=configs/eval.py", "--config.checkpoint=no_such_run", "--workdir=WORK"], "no_such_run"),
    ("codi_jax.sample", ["--run=no_such_run", "--inputs=x.png", "--out=OUT"], "no_such_run"),
    ("codi_jax.sample", ["--inputs=x.png", "--out=OUT"], "--run"),
    ("codi_jax.evaluation.diagnose", ["--run=no_such_run"], "no_such_run"),
    ("codi_jax.reproduce", ["--seeds=0"], "--workdir is required"),
    ("codi_jax.reproduce", ["--workdir=WORK", "--runs=codi,no_such_method", "--report_only=false"], "no_such_method"),
    ("codi_jax.benchmarks.step", ["--config=configs/sr.py:smoke", "--config.model.unet.remat=most"], "remat"),
    ("codi_jax.benchmarks.sd_step", ["--unet=sd99"], "--unet"),
    ("codi_jax.benchmarks.adapters", ["--config=configs/sr.py:smoke", "--config.model.unet.widht=3"], "widht"),
    ("codi_jax.benchmarks.plan", ["--config=configs/sr.py:smoke", "--topology=tpu8"], "--topology='tpu8'"),
    ("codi_jax.benchmarks.plan", ["--config=configs/sr.py", "--topology=cpu:2"], "teacher.pretrained_path"),
    ("codi_jax.benchmarks.plan", ["--config=configs/sr.py", "--arch=sd99", "--topology=cpu:2"], "sd99"),
    (
        "codi_jax.benchmarks.plan",
        ["--config=configs/sr.py:smoke", "--topology=cpu:4", "--num_slices=2"],
        "--num_slices=2",
    ),
    ("codi_jax.benchmarks.sd_job", ["--workdir=WORK"], "run exists"),  # WORK/run made below
    ("codi_jax.benchmarks.plan_table", [], "--run"),
]


@pytest.mark.parametrize(
    "module,args,named", CASES, ids=[f"{m.split('.')[-1]}-{i}" for i, (m, _, _) in enumerate(CASES)]
)
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, module, args, named):
    args = [a.replace("OUT", str(tmp_path / "out")).replace("WORK", str(tmp_path / "work")) for a in args]
    (tmp_path / "work" / "run").mkdir(parents=True)  # an earlier run: only sd_job refuses it
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and named in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
