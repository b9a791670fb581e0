"""Prepared ArrayRecord data: every input layout through `codi_jax.data.prepare` and a smoke training run
on the shards it wrote; resumable and process-count-independent preparation; two processes reading
one set; a crash and resume that loses and repeats no record; corrupt records, missing shards and
manifests that do not match."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import experiment
from codi_jax.data import catalog, examples, pipeline, prepare, records, sources
from configs import data as data_configs
from configs import depth, edit, inpaint, sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare(tmp_path, layout, name=None, **kw):
    """examples' input of `layout` -> prepared shards in tmp_path/records/<name>."""
    src = tmp_path / "inputs"
    writers = {
        "folder": lambda: examples.write_folder(str(src / "folder")),
        "edit_jsonl": lambda: examples.write_edit_jsonl(str(src)),
        "ip2p_folder": lambda: examples.write_ip2p(str(src / "ip2p")),
        "depth_folder": lambda: examples.write_depth(str(src / "depth")),
        "webdataset": lambda: examples.write_webdataset(str(src / "webdataset")),
    }
    if layout == "tfds":
        examples.write_tfds(str(src / "tfds"))
        path, kw = examples.TFDS_NAME, dict(kw, kind="edit", tfds_data_dir=str(src / "tfds"))
    else:
        path = writers[layout]()
    out = str(tmp_path / "records" / (name or layout))
    manifest = prepare.prepare(path, layout, out, records_per_shard=4, **kw)
    return (records.read_manifest(out) if manifest else None), out


def _smoke(module, data_path, **data):
    config = module.get_config("smoke")
    config.eval.previews = False
    config.eval.steps = (1,)
    config.data.update(dict(source="array_record", path=data_path, eval_fraction=0.2), **data)
    return config


def _rewrite_record(path, index, change):
    """Rewrite one shard with record `index` changed by change(fields) -> bytes (a corrupt record)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    reader = ArrayRecordReader(path)
    raws = reader.read(list(range(reader.num_records())))
    reader.close()
    raws[index] = change(records.decode_fields(raws[index]))
    writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
    for r in raws:
        writer.write(r)
    writer.close()


def _finite(report, row):
    assert all(np.isfinite(v) for v in report["metrics"][row].values()), report["metrics"][row]


@pytest.mark.heavy(110)
def test_image_layouts_prepare_and_train_sr_and_inpaint(tmp_path):
    """A folder (recursive, captions beside images, one broken and one empty file) and webdataset tars
    become shards that an SR and an inpainting smoke run train on; a record corrupted after preparation
    is skipped and counted in metrics.json."""
    m, folder = _prepare(tmp_path, "folder")
    assert m["kind"] == "image" and m["num_records"] == 12 and m["num_skipped"] == 2
    log = open(os.path.join(folder, records.SKIPPED_LOG)).read()
    assert "a/empty.jpg\t" in log and "b/broken.png\t" in log and "does not decode" in log
    assert m["image_size"]["min_h"] == 96 and m["image_size"]["max_w"] == 128
    assert "photograph number 0" in json.load(open(os.path.join(folder, records.PROMPTS)))
    # The bytes are the files' own (no re-encoding): a JPEG stays the same JPEG.
    first = records.decode_fields(records.RecordSource(m)._source[0])
    assert first["key"] == "a/photo001.png"
    assert first["image"] == open(tmp_path / "inputs" / "folder" / "a" / "photo001.png", "rb").read()

    _rewrite_record(
        os.path.join(folder, m["shards"][0]["file"]), 1, lambda d: records.encode_record(dict(d, image=d["image"][:50]))
    )
    report = experiment.run(_smoke(sr, folder), str(tmp_path / "sr"))
    _finite(report, "codi_1step")
    skipped = report["data"]
    assert set(skipped) == {"teacher", "codi"} and skipped["codi"]["skipped_records"] >= 1, skipped

    mw, tars = _prepare(tmp_path, "webdataset")
    assert mw["num_records"] == 12 and mw["num_skipped"] == 0 and len(mw["shards"]) == 3
    assert json.load(open(os.path.join(tars, records.PROMPTS)))[0] == "a photograph, crop 0"
    config = _smoke(inpaint, tars)
    config.teacher.checkpoint = str(tmp_path / "sr")  # the same unconditional teacher
    report = experiment.run(config, str(tmp_path / "inpaint"))
    _finite(report, "codi_1step")
    assert report["data"]["codi"]["skipped_records"] == 0


@pytest.mark.heavy(170)
def test_paired_layouts_prepare_and_train_depth_and_edit(tmp_path):
    """The depth folder, the edit JSONL, InstructPix2Pix's folders and a tfds dataset become shards of
    their kinds, which the training pipeline batches; an edit run trains on the JSONL's shards. (The
    train step is the same whatever the source: one run stands for all; a depth run on records of the
    depth folder's kind is test_tasks_end_to_end's.)"""
    md, depth_dir = _prepare(tmp_path, "depth_folder")
    assert md["kind"] == "depth" and md["num_records"] == 10
    rec = records.RecordSource(md)[0]
    with Image.open(os.path.join(tmp_path, "inputs", "depth", "images", "scene000.png")) as im:
        np.testing.assert_array_equal(rec["a"], np.asarray(im.convert("RGB")))
    z = np.load(os.path.join(tmp_path, "inputs", "depth", "depth", "scene000.npy"))
    inv = 1.0 / z
    want = (inv - inv.min()) / (inv.max() - inv.min()) * 65535
    assert np.abs(rec["b"] - want).max() <= 0.51  # 16-bit inverse depth, near = bright (half a step, float32)
    _batches_of(_smoke(depth, depth_dir), "depth")

    for layout in ("edit_jsonl", "ip2p_folder", "tfds"):
        me, edit_dir = _prepare(tmp_path, layout)
        assert me["kind"] == "edit" and me["num_records"] == 10, layout
        assert me["num_skipped"] == (1 if layout == "edit_jsonl" else 0)  # edits.jsonl names a missing file
        prompts = json.load(open(os.path.join(edit_dir, records.PROMPTS)))
        assert "invert the colours" in prompts and "make it grayscale" in prompts
        _batches_of(_smoke(edit, edit_dir), "edit")
        if layout == "edit_jsonl":
            report = experiment.run(_smoke(edit, edit_dir), str(tmp_path / f"edit_{layout}"))
            _finite(report, "codi_1step")
            assert report["data"]["codi"]["skipped_records"] == 0


def _batches_of(config, task):
    """Two training batches of the prepared records, as the train step receives them."""
    it = pipeline.make_train_iterator(config.data, task=task, global_batch_size=4, seed=0)
    for _ in range(2):
        b = next(it)
        assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["cond"]).all(), task
        assert b["prompt"].shape == (4,) and (b["prompt"] >= 0).all(), task


def test_preparation_resumes_after_a_crash_and_splits_over_processes(tmp_path, monkeypatch):
    """A crash mid-way keeps the shards already written; the rerun writes only the rest. Two processes
    (each its own shards) and one process write the same shards: the same content hash."""
    whole, _ = _prepare(tmp_path, "folder", "whole")
    real = prepare.write_shard
    calls = []

    def crash_on_third(*a, **k):
        calls.append(a[3])
        if len(calls) == 3:
            raise KeyboardInterrupt("preempted")
        return real(*a, **k)

    monkeypatch.setattr(prepare, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path, "folder", "crashed")
    out = tmp_path / "records" / "crashed"
    assert not (out / records.MANIFEST).exists()
    written = {f: os.path.getmtime(out / f) for f in os.listdir(out) if f.endswith(records.SHARD_SUFFIX)}
    assert len(written) == 2
    monkeypatch.setattr(prepare, "write_shard", real)
    calls.clear()
    monkeypatch.setattr(prepare, "write_shard", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    resumed, _ = _prepare(tmp_path, "folder", "crashed")
    assert len(calls) == 2 and resumed["content_hash"] == whole["content_hash"]
    assert all(os.path.getmtime(out / f) == t for f, t in written.items())

    assert _prepare(tmp_path, "folder", "split", process_index=1, process_count=2)[0] is None  # waits for process 0
    split, _ = _prepare(tmp_path, "folder", "split", process_index=0, process_count=2)
    assert split["content_hash"] == whole["content_hash"] and split["num_records"] == whole["num_records"]
    with pytest.raises(ValueError, match="another plan .*records_per_shard"):
        prepare.prepare(str(tmp_path / "inputs" / "folder"), "folder", str(out), records_per_shard=5)


def _id_dataset(tmp_path, n=16):
    """n constant images (value 10 * id + 5) prepared as shards of 4 records."""
    folder = tmp_path / "ids"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 10 * i + 5, np.uint8)).save(folder / f"{i:03d}.png")
    prepare.prepare(str(folder), "folder", str(tmp_path / "id_records"), records_per_shard=4)
    return json.dumps(
        dict(
            source="array_record",
            path=str(tmp_path / "id_records"),
            eval_fraction=0.2,
            image_downscale=1,
            random_flip=False,
        )
    )


def _worker(*args):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "data_worker.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return out


@pytest.mark.heavy(40)
def test_two_processes_read_disjoint_shares_and_a_crash_resumes_exactly(tmp_path):
    """Two processes read one prepared set: each its own positions of the global stream, together the
    one-process stream, every record the same number of times per shuffle block. A reader that
    checkpoints and dies resumes where it stopped: the ids equal an uninterrupted read's."""
    data = _id_dataset(tmp_path)
    n_train = 16 - 4  # the last ceil(0.2 * 16) = 4 records are held out
    per = -(-pipeline._MIN_SHUFFLE_LEN // n_train)  # copies of each record in a shuffle block
    block = per * n_train
    batches = block // 8 + 1  # more than one block at global batch 8
    runs = [_worker("ids", data, i, 2, batches // 2 + 1, tmp_path / f"p{i}.json") for i in (0, 1)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    single = _worker("ids", data, 0, 1, batches, tmp_path / "one.json")
    assert single.returncode == 0, single.stderr[-2000:]
    ids = [json.load(open(tmp_path / f"p{i}.json"))["ids"] for i in (0, 1)]
    one = json.load(open(tmp_path / "one.json"))["ids"]
    # Process p reads global positions p, p + 2, p + 4, ...: interleaved, they are the one-process stream.
    merged = [ids[k % 2][k // 2] for k in range(2 * len(ids[0]))]
    assert merged[: len(one)] == one[: len(merged)]
    counts = np.bincount(one[:block], minlength=16)
    assert set(counts[:n_train]) == {per} and counts[n_train:].sum() == 0  # held-out records never train

    ckpt = tmp_path / "ckpt"
    crash = _worker("crash", data, ckpt, 5, tmp_path / "a.json")
    assert crash.returncode == 9, crash.stderr[-2000:]
    resume = _worker("resume", data, ckpt, 5, tmp_path / "b.json")
    assert resume.returncode == 0, resume.stderr[-2000:]
    both = json.load(open(tmp_path / "a.json"))["ids"] + json.load(open(tmp_path / "b.json"))["ids"]
    assert both == one[: len(both)]


def test_bad_prepared_data_is_one_line_at_start(tmp_path):
    """A missing shard, a manifest whose counts do not fit the files, a kind the task cannot use and
    images smaller than the crop: each a clear error naming the file or field, before any training."""
    m, folder = _prepare(tmp_path, "edit_jsonl")
    c = data_configs.get_data_config()
    c.update(source="array_record", path=folder, eval_fraction=0.2)
    assert len(catalog.make_source(c, "train", "edit")) == 8
    with pytest.raises(ValueError, match="records of kind 'edit' serve tasks \\('edit',\\), not 'sr'"):
        catalog.make_source(c, "train", "sr")
    c.crop_size = 64  # x image_downscale 2 = 128 > the 96 px images
    with pytest.raises(ValueError, match="smallest image is 96 px .*data.crop_size=64"):
        catalog.make_source(c, "train", "edit")
    c.crop_size = 32
    mpath = os.path.join(folder, records.MANIFEST)
    bad = dict(m, shards=[dict(m["shards"][0], records=m["shards"][0]["records"] + 1)] + m["shards"][1:])
    bad["num_records"] += 1
    json.dump(bad, open(mpath, "w"))
    with pytest.raises(ValueError, match="holds 4 records but manifest.json says 5 \\(field 'records'\\)"):
        catalog.make_source(c, "train", "edit")
    json.dump(dict(m, num_records=99), open(mpath, "w"))
    with pytest.raises(ValueError, match="field 'num_records' is 99 but its shards hold 10"):
        catalog.make_source(c, "train", "edit")
    json.dump(m, open(mpath, "w"))
    os.remove(os.path.join(folder, m["shards"][1]["file"]))
    with pytest.raises(FileNotFoundError, match=f"shard .*{m['shards'][1]['file']} listed in manifest.json is missing"):
        catalog.make_source(c, "train", "edit")
    c.path = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="data.path=.*nothing.*no such folder"):
        catalog.make_source(c, "train", "edit")
    with pytest.raises(ValueError, match="--layout='csv' must be one of"):
        prepare.prepare(folder, "csv", str(tmp_path / "x"))


def test_prepare_command_line(tmp_path):
    """The command writes a manifest and prints progress; bad input is one `error:` line."""
    examples.write_webdataset(str(tmp_path / "tars"), n=3)
    out = subprocess.run(
        [sys.executable, "-m", "codi_jax.data.prepare", f"--input={tmp_path}/tars", "--layout=webdataset", f"--output={tmp_path}/rec"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "records/s" in out.stderr and json.load(open(tmp_path / "rec" / records.MANIFEST))["num_records"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "codi_jax.data.prepare", f"--input={tmp_path}/none", "--layout=folder", f"--output={tmp_path}/r2"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert (
        bad.returncode == 2
        and bad.stderr.strip().splitlines()[-1].startswith("error: --input=")
        and "is not a folder" in bad.stderr
    )


def test_a_folder_source_decodes_a_file_only_when_it_is_read(tmp_path, monkeypatch):
    """A folder source keeps its file list only: building one decodes nothing, reading one decodes one."""
    examples.write_folder(str(tmp_path / "f"))
    calls = []
    real = sources.decode_image_file
    monkeypatch.setattr(sources, "decode_image_file", lambda p: calls.append(p) or real(p))
    src = sources.FolderImageSource(str(tmp_path / "f"))
    assert calls == [] and len(src) == 14
    assert src[3].shape == (96, 128, 3)
    assert len(calls) == 1


def _many_instructions(tmp_path, n):
    """An edit JSONL of n distinct instructions over one pair of 40 x 40 photos, prepared."""
    photo = examples.photos(1, 40, 40)[0]
    Image.fromarray(photo).save(tmp_path / "in.png")
    Image.fromarray(255 - photo).save(tmp_path / "out.png")
    with open(tmp_path / "edits.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"input": "in.png", "edited": "out.png", "instruction": f"invert edit {i}"}) + "\n")
    out = str(tmp_path / "many")
    prepare.prepare(str(tmp_path / "edits.jsonl"), "edit_jsonl", out, records_per_shard=1000)
    return out


def test_prompts_encoded_in_the_step_equal_the_table_rows(tmp_path):
    """text.prompt_source: 'auto' keeps the table up to text.max_cached_prompts distinct prompts and runs
    the encoder in the step beyond; a record's tokens give the context its table row gives, and a
    dropped prompt the empty prompt's."""
    import jax
    import jax.numpy as jnp

    from codi_jax import build

    path = _many_instructions(tmp_path, 6)
    config = _smoke(edit, path, image_downscale=1)
    table = build.prompt_embeddings(config, str(tmp_path / "run"))
    assert table.source == "table" and table.tokenize is None
    config.text.max_cached_prompts = 5  # fewer than the set's 6 distinct instructions
    enc = build.prompt_embeddings(config, str(tmp_path / "run"))
    assert enc.source == "encoder" and enc.table is None
    texts = records.read_prompts(path)
    tokens = np.stack([enc.tokenize(t) for t in texts])
    np.testing.assert_allclose(enc.context(tokens), table.context(np.arange(6)), atol=1e-5)

    seen = {}

    def loss(params, frozen, ema, batch, rng):
        seen["context"] = batch["context"]
        return 0.0, {}

    batch = {"prompt": jnp.asarray(tokens[:4])}
    for dropout, want in ((0.0, table.table[1:5]), (1.0, np.repeat(table.table[:1], 4, 0))):
        enc.loss(loss, dropout, constant=False)(None, enc.frozen(), None, batch, jax.random.PRNGKey(0))
        np.testing.assert_allclose(seen["context"], want, atol=1e-5)
    # The pipeline hands the step tokens: the same batch of prompts, as token ids.
    it = pipeline.make_train_iterator(config.data, task="edit", global_batch_size=2, seed=0, prompt_fn=enc.tokenize)
    b = next(it)
    assert b["prompt"].shape == (2, config.text.tiny.max_length) and b["prompt"].dtype == np.int32
    config.text.prompt_source = "encoder"
    config.data.source = "embedded"  # the tiny task's computable prompts are table indices only
    with pytest.raises(ValueError, match="text.prompt_source='encoder' needs records with texts"):
        build.prompt_embeddings(config, str(tmp_path / "run"))


@pytest.mark.heavy(60)
def test_a_set_of_more_distinct_instructions_than_the_table_holds_trains(tmp_path):
    """5,000 distinct instructions (more than text.max_cached_prompts = 4096, as InstructPix2Pix's ~313k
    are): 'auto' runs the text encoder in the step; teacher, CoDi and evaluation train and finish."""
    path = _many_instructions(tmp_path, 5000)
    config = _smoke(edit, path, image_downscale=1)
    assert config.text.max_cached_prompts < 5000
    report = experiment.run(config, str(tmp_path / "run"))
    _finite(report, "codi_1step")
    cache = tmp_path / "run" / "cache"
    tables = [np.load(cache / f).shape[0] for f in os.listdir(cache) if f.startswith("prompts_")]
    assert tables == [2]  # only the negative prompt's embedding ('' and it): no table of 5,000 rows
