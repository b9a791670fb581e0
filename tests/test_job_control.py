"""The job under the conditions of a cloud VM: SIGTERM (preemption) stops it with a checkpoint and the
rerun ends where an uninterrupted run ends; a damaged newest checkpoint falls back to the one before;
one job per workdir; a repeated job reads its compiled programs back; a profiler trace on request."""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codi_jax import preemption, train
from codi_jax import workdir as workdir_lib
from tests import helpers
from tests.test_train import _params, _teacher_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smoke job with a CoDi stage long enough to be interrupted part-way (checkpoints every 5 steps).
JOB = [
    "--config=configs/sr.py:smoke",
    "--config.codi.train.num_steps=20",
    "--config.codi.train.checkpoint_every=5",
    "--config.codi.train.log_every=1",
    "--config.eval.previews=False",
    "--config.eval.steps=(1,)",
]


def _own_cache_env(**extra) -> dict:
    """The environment without the suite's shared cache: these jobs keep theirs beside the workdir."""
    env = dict(os.environ, **extra)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _start(workdir, *extra):
    env = _own_cache_env(PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "codi_jax.main", *JOB, f"--workdir={workdir}", *extra],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(proc, needle: str, log: list) -> None:
    """Read the job's log until a line contains `needle`."""
    for line in proc.stderr:
        log.append(line)
        if needle in line:
            return
    raise AssertionError(f"the job ended (code {proc.wait()}) before logging {needle!r}:\n{''.join(log[-30:])}")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)["metrics"]


def _checkpoints(workdir, stage="codi"):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, stage, "checkpoints")) if s.isdigit())


def _step_programs(cache_folder) -> list:
    """The train steps in JAX's persistent cache. (JAX caches only programs that took over a second to
    compile, so whether a small program is there depends on the machine's load; the steps always are.)"""
    return sorted(name for name in os.listdir(cache_folder) if name.startswith("jit_step_fn-"))


@pytest.mark.heavy(150)
def test_sigterm_saves_the_step_and_exits_75_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
    """Also: the second job beside the first reads its train steps from the compilation cache
    (config.compilation_cache_dir='auto': WORKDIR/../.jax_cache)."""
    straight = str(tmp_path / "straight")
    done = subprocess.run(
        [sys.executable, "-m", "codi_jax.main", *JOB, f"--workdir={straight}"],
        cwd=REPO,
        capture_output=True,
        env=_own_cache_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cached = _step_programs(tmp_path / workdir_lib.CACHE_FOLDER)
    assert len(cached) == 2  # the teacher's and CoDi's train step

    # SIGTERM at CoDi step 7, a second one while the preemption checkpoint is being written.
    work, log = str(tmp_path / "preempted"), []
    teacher = f"--config.teacher.checkpoint={straight}"  # the same teacher, not trained twice more
    proc = _start(work, teacher)
    _wait_for(proc, "codi step 7/20", log)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "preemption notice: saving step", log)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    code, waited = proc.wait(), time.monotonic() - t0
    log.append(rest)
    assert code == preemption.EXIT_CODE, "".join(log)[-3000:]
    assert waited < 30
    stopped = [ln for ln in rest.splitlines() if ln.startswith("stopped:")]
    assert len(stopped) == 1 and "Run the same command to resume" in stopped[0]
    assert "Traceback" not in "".join(log)
    notice = re.search(r"preemption notice: saving step (\d+)", "".join(log))
    saved = _checkpoints(work)
    assert saved[-1] == int(notice.group(1)) >= 7 and not os.path.exists(os.path.join(work, "metrics.json"))
    # Every checkpoint left reads back whole (the second signal did not corrupt any).
    for step in saved:
        meta = ocp.StandardCheckpointer().metadata(os.path.join(work, "codi", "checkpoints", str(step), "state"))
        assert meta.item_metadata.tree["params"], step
    assert not os.path.exists(os.path.join(work, workdir_lib.LOCK_FILE))  # released on the way out

    again = subprocess.run(
        [sys.executable, "-m", "codi_jax.main", *JOB, f"--workdir={work}", teacher],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_own_cache_env(),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"codi: resumed from step {saved[-1]}" in again.stderr
    assert re.search(r"teacher: freed \d+ arrays", again.stderr)  # a resumed stage frees the teacher too
    assert _metrics(work) == _metrics(straight)
    # Both later jobs ran the first job's train steps: read from the cache, no new step compiled.
    assert _step_programs(tmp_path / workdir_lib.CACHE_FOLDER) == cached


def _empty_files(folder):
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            open(path, "w").close()


@pytest.mark.heavy(40)
def test_an_emptied_newest_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, caplog):
    caplog.set_level("INFO")
    config = helpers.smoke_config()
    straight = _params(_teacher_stage(config, str(tmp_path / "a"), 3))
    work = str(tmp_path / "b")
    _teacher_stage(config, work, 3)  # checkpoints at steps 2 and 3
    ckpts = os.path.join(work, "teacher", "checkpoints")
    assert _checkpoints(work, "teacher") == [2, 3]
    _empty_files(os.path.join(ckpts, "3"))  # as a crash mid-save leaves them on some filesystems

    resumed = _params(_teacher_stage(config, work, 3))
    assert "checkpoint step 3" in caplog.text and "is unreadable (OSError" in caplog.text
    assert "resumed from step 2" in caplog.text
    # Step 3 was trained again from step 2 and saved anew; the damaged files are kept aside.
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    assert _checkpoints(work, "teacher") == [2, 3]
    assert [
        os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(work, "teacher", train.DAMAGED, "*"))
    ] == ["3"]


def test_a_second_job_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    work = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(work, workdir_lib.LOCK_FILE), "w") as f:
            json.dump(
                dict(host=socket.gethostname(), pid=holder.pid, proc_start="", started="2026-12-03 09:00:00 UTC"), f
            )
        out = subprocess.run(
            [sys.executable, "-m", "codi_jax.main", "--config=configs/sr.py:smoke", f"--workdir={work}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in out.stderr
        assert f"is in use by the job on host {socket.gethostname()}, pid {holder.pid}" in lines[0]
        assert "started 2026-12-03 09:00:00 UTC" in lines[0] and "--break_lock" in lines[0]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale on this host and taken over.
    path = workdir_lib.acquire_lock(work)
    with open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    workdir_lib.release_lock(path)
    assert not os.path.exists(path)


def test_a_lock_from_another_host_takes_break_lock(tmp_path):
    work = str(tmp_path)
    with open(os.path.join(work, workdir_lib.LOCK_FILE), "w") as f:
        json.dump(dict(host="tpu-vm-that-was-preempted", pid=1234, started="yesterday"), f)
    with pytest.raises(workdir_lib.WorkdirBusyError, match="host tpu-vm-that-was-preempted, pid 1234"):
        workdir_lib.acquire_lock(work)
    path = workdir_lib.acquire_lock(work, break_lock=True)
    with open(path) as f:
        assert json.load(f)["host"] == socket.gethostname()
    workdir_lib.release_lock(path)


def test_profile_steps_writes_a_trace_next_to_the_tensorboard_events(tmp_path):
    config = helpers.smoke_config()
    config.pretrain.profile_steps = (1, 2)
    _teacher_stage(config, str(tmp_path), 3)
    traces = glob.glob(str(tmp_path / "teacher" / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_bad_profile_steps_is_one_line():
    tcfg = helpers.smoke_config().pretrain
    tcfg.profile_steps = (5, 3)
    with pytest.raises(ValueError, match=r"pretrain.profile_steps=\(5, 3\) must be \(start, stop\)"):
        train.validate_train(tcfg, "pretrain")
