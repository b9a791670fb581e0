"""Every output of a run in a Cloud Storage bucket: the smoke job with --workdir=gs://..., its rerun,
the evaluation job and the sampler reading it, against a real GCS JSON API on 127.0.0.1 (tests/gcs.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import storage
from codi_jax import workdir as workdir_lib
from tests import gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket():
    """One emulator per test process (gcsfs caches its client, and with it the emulator's address)."""
    with gcs.emulator():
        yield f"gs://{gcs.BUCKET}"


def _run(module, *args):
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_small_files_round_trip_and_a_lock_is_taken_once(bucket):
    base = f"{bucket}/storage"
    storage.write_json(storage.join(base, "a", "m.json"), {"x": 1})
    assert storage.read_json(f"{base}/a/m.json") == {"x": 1}
    assert storage.listdir(base) == ["a"] and storage.isdir(f"{base}/a") and storage.isfile(f"{base}/a/m.json")
    assert storage.glob(f"{base}/a/*.json") == [f"{base}/a/m.json"]
    storage.move(f"{base}/a/m.json", f"{base}/b.json")
    assert not storage.exists(f"{base}/a/m.json") and storage.read_json(f"{base}/b.json") == {"x": 1}
    with pytest.raises(RuntimeError), storage.atomic_writer(f"{base}/never.bin") as f:
        f.write(b"half")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(f"{base}/never.bin")  # nothing half-written appears

    path = workdir_lib.acquire_lock(f"{bucket}/locked")
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()}"):
        workdir_lib.acquire_lock(f"{bucket}/locked")  # this process is alive: the lock holds
    workdir_lib.release_lock(path)
    assert not storage.exists(path)


@pytest.mark.heavy(120)
def test_a_job_in_a_bucket_trains_resumes_and_is_evaluated_and_sampled_from_it(bucket, tmp_path):
    run = f"{bucket}/runs/smoke"
    job = ["--config=configs/sr.py:smoke", "--config.eval.previews=False", f"--workdir={run}"]
    _run("codi_jax.main", *job)
    saved = storage.read_json(f"{run}/metrics.json")
    assert set(saved["metrics"]) == {"bicubic", "codi_1step", "codi_2step"}
    assert storage.isfile(saved["grid"]) and saved["grid"].startswith(run)
    for stage in ("teacher", "codi"):
        assert storage.listdir(f"{run}/{stage}/checkpoints") == ["8"]
        assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{run}/{stage}/tensorboard"))
        assert storage.read_json(f"{run}/{stage}/compile.json")["compile_s"] > 0
    assert storage.listdir(f"{bucket}/runs/{workdir_lib.CACHE_FOLDER}")  # compiled programs beside the run
    assert not storage.exists(f"{run}/{workdir_lib.LOCK_FILE}")

    # The same command again: both stages complete (restored from the bucket, not retrained).
    again = _run("codi_jax.main", *job)
    assert "teacher: complete at step 8" in again.stderr and "codi: complete at step 8" in again.stderr
    assert storage.read_json(f"{run}/metrics.json")["metrics"] == saved["metrics"]

    # The evaluation job reads the run from the bucket and writes its results to another folder there.
    ev = f"{bucket}/runs/smoke_eval"
    _run(
        "codi_jax.main",
        "--config=configs/eval.py",
        f"--config.checkpoint={run}",
        f"--workdir={ev}",
        "--config.steps=(1,)",
        "--config.samplers=('deterministic',)",
    )
    summary = storage.read_json(f"{ev}/eval/metrics.json")
    assert summary["metrics"]["codi_1step"]["psnr"] == pytest.approx(saved["metrics"]["codi_1step"]["psnr"], abs=1e-4)
    assert storage.isfile(f"{ev}/eval/grid.png") and storage.isfile(f"{ev}/eval/metrics_vs_steps.png")

    # The sampler: the run from the bucket, a local photo in, a PNG out in the bucket.
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((24, 24, 3), 120, np.uint8)).save(photo)
    out = f"{bucket}/samples"
    _run("codi_jax.sample", f"--run={run}", f"--inputs={photo}", "--steps=1", f"--out={out}")
    assert storage.listdir(out)[-1] == "photo.png"
    png = Image.open(storage.open_file(f"{out}/photo.png"))
    assert png.size == (16, 16)  # the smoke run's crop size
    # Every small file the job wrote is whole JSON (written in one upload).
    for name in ("config.json", "metrics.json", "codi/data.json"):
        json.loads(storage.read_text(f"{run}/{name}"))
