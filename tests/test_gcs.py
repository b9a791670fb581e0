"""Runs and datasets in a Cloud Storage bucket, against a real GCS JSON API on 127.0.0.1 (tests/gcs.py):
every dataset layout prepared from and to the bucket, sources read from it, and the smoke job trained on
the bucket's shards with --workdir=gs://..., its rerun, the evaluation job and the sampler reading it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import storage
from codi_jax import workdir as workdir_lib
from codi_jax.data import catalog, examples, prepare, records
from codi_jax.data.sources import Corrupt
from configs.data import get_data_config
from tests import gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bucket():
    """One emulator per test process (gcsfs caches its client, and with it the emulator's address)."""
    with gcs.emulator():
        yield f"gs://{gcs.BUCKET}"


def _run(module, *args):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # 'auto': beside the run
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, env=env)
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


def _upload_tree(local: str, remote: str) -> None:
    for rel in storage.walk_files(local):
        storage.copy(os.path.join(local, rel), f"{remote}/{rel}")


def _same_records(a, b, n: int) -> None:
    assert len(a) == len(b)
    for i in range(min(n, len(a))):
        ra, rb = a[i], b[i]
        if isinstance(ra, Corrupt):  # an input that does not decode, named by its path
            assert isinstance(rb, Corrupt) and ra.reason.split(":")[0] == rb.reason.split(":")[0], i
        elif isinstance(ra, dict):
            assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra), i
        else:
            np.testing.assert_array_equal(ra, rb)


@pytest.mark.heavy(30)
def test_every_layout_in_a_bucket_prepares_into_the_bucket_as_it_does_locally_and_reads_back(bucket, tmp_path):
    """The inputs uploaded to the bucket become, with --input and --output gs:// URLs, the same shards
    (content hash) a local preparation makes; the shards, an image folder and the paired datasets read
    from the bucket give the local records."""
    local = str(tmp_path / "in")
    inputs = {
        "folder": examples.write_folder(f"{local}/folder"),  # with a broken and an empty file
        "edit_jsonl": examples.write_edit_jsonl(local, n=4),  # with a missing image
        "ip2p_folder": examples.write_ip2p(f"{local}/ip2p", n=4),
        "depth_folder": examples.write_depth(f"{local}/depth", n=4),
        "webdataset": examples.write_webdataset(f"{local}/wds", n=6),
    }
    _upload_tree(local, f"{bucket}/in")
    for layout, path in inputs.items():
        here = prepare.prepare(path, layout, str(tmp_path / "out" / layout), records_per_shard=4)
        there_dir = f"{bucket}/out/{layout}"
        there = prepare.prepare(f"{bucket}/in/{os.path.relpath(path, local)}", layout, there_dir, records_per_shard=4)
        assert there["content_hash"] == here["content_hash"] and len(there["shards"]) == len(here["shards"]), layout
        assert there["num_skipped"] == here["num_skipped"] and there["num_texts"] == here["num_texts"], layout
        assert storage.isfile(f"{there_dir}/{records.SKIPPED_LOG}") and storage.listdir(f"{there_dir}/parts")
        _same_records(
            records.RecordSource(records.read_manifest(there_dir)),
            records.RecordSource(records.read_manifest(str(tmp_path / "out" / layout))),
            3,
        )

    # Training sources that read the files themselves (no preparation), from the bucket.
    def source(update):
        c = get_data_config()
        c.update(eval_fraction=0.25, image_downscale=1, **update)
        return catalog.make_source(c, "train", "edit" if c.source == "edit_jsonl" else "")

    for update in (
        dict(source="folder", folder="{}/folder"),
        dict(source="edit_jsonl", pairs_file="{}/edits.jsonl"),
        dict(source="depth_folder", folder="{}/depth"),
    ):
        there = source({k: v.format(f"{bucket}/in") if "{}" in v else v for k, v in update.items()})
        _same_records(there, source({k: v.format(local) if "{}" in v else v for k, v in update.items()}), 3)


@pytest.mark.heavy(120)
def test_a_job_in_a_bucket_trains_on_its_shards_resumes_and_is_evaluated_and_sampled_from_it(bucket, tmp_path):
    data = f"{bucket}/data/photos"  # shards prepared into the bucket from a folder there
    _upload_tree(examples.write_folder(str(tmp_path / "photos")), f"{bucket}/photos")
    assert prepare.prepare(f"{bucket}/photos", "folder", data, records_per_shard=5)["num_records"] == 12
    run = f"{bucket}/runs/smoke"
    job = [
        "--config=configs/sr.py:smoke",
        "--config.eval.previews=False",
        "--config.data.source=array_record",
        f"--config.data.path={data}",
        "--config.data.eval_fraction=0.25",
        f"--workdir={run}",
    ]
    first = _run("codi_jax.main", *job)
    assert f"training data: 9 records of RecordSource({data!r}" in first.stderr  # 12 minus 3 held out
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
