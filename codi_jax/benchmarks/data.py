"""What the data path costs: SR batches per second and per core, the prepare command's rate, and memory
against the dataset's size.

    python -m codi_jax.benchmarks.data [--workdir=/tmp/codi_data_bench] [--out=FILE.json]

1. **SR throughput.** The training iterator of `data.pipeline` exactly as a run builds it, at the paper's
   recipe: ArrayRecord read, JPEG decode, a random 512 px crop and flip, USM, Real-ESRGAN's second-order
   degradation (configs/data.py `realesrgan_degradation`), batching; with 0..N grain worker processes,
   one thread per process. Beside it, the same steps by basicsr's reference implementation
   (benchmarks/basicsr_reference.py: cv2 decode, its kernels, USMSharp and feed_data's torch ops, one
   thread), same parameters, same records, same run.
   The input: the embedded photographs, upscaled to `--photo_side` px and stored as JPEG (quality 95).
2. **prepare.** records/s of `codi_jax.data.prepare` on webdataset tars (one process, one core): the
   large photos above and `--large` small synthetic JPEGs.
3. **Memory.** Peak resident memory (the kernel's ru_maxrss of each child process) of
   - the training iterator alone, over a `--small`-record set and over a `--large`-record set, each
     read for `--small` records, and the large set read for `--read_large` records;
   - a whole smoke training job (configs/sr.py:smoke: teacher, CoDi, evaluation) on each set.
   Goal: the large and the small set less than 100 MB apart.

4. **The record cache** (`--cache`). What the cache saves and costs at Stable Diffusion 1.5 size (random
   weights: the shapes are what costs): FLOPs per example of the SD-1.5 VAE encoder at `--crop` px, of
   CLIP ViT-L/14's text encoder at 77 tokens, of the U-Net + adapter forward, and of the whole CoDi train
   step (`codi_jax.train`'s, as `benchmarks.sd_step` builds it) at batch 1 and 8, from XLA's cost
   analysis of the lowered programs (nothing is compiled or run at that size); and the cache pass's
   records/s (`codi_jax.pretrained.record_cache`, VAE only) over `--cache_records` of the large photos.

The synthetic sets are made by the benchmark in `--workdir` (kept between runs: a rerun reuses them).
"""

from __future__ import annotations

import io
import json
import os
import selectors
import subprocess
import sys
import tarfile
import time

import numpy as np
from absl import flags

from codi_jax import logging_utils

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/codi_data_bench", "Scratch folder for the synthetic sets.")
_OUT = flags.DEFINE_string("out", "", "JSON file for every figure.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker process counts to measure.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Measuring time per worker count (after a warm-up batch).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size of the throughput run.")
_CROP = flags.DEFINE_integer("crop", 512, "Crop side of the throughput run (the paper's 512).")
_PHOTO_SIDE = flags.DEFINE_integer("photo_side", 768, "Side of the large JPEG photos.")
_PHOTOS = flags.DEFINE_integer("photos", 64, "How many large photos.")
_SMALL = flags.DEFINE_integer("small", 1000, "Records of the small synthetic set.")
_LARGE = flags.DEFINE_integer("large", 100_000, "Records of the large synthetic set.")
_READ_LARGE = flags.DEFINE_integer("read_large", 100_000, "Records the iterator reads from the large set.")
_BASICSR = flags.DEFINE_bool(
    "basicsr", True, "Also measure basicsr's reference degradation (pip install basicsr-fixed)."
)
_JOBS = flags.DEFINE_bool("jobs", True, "Also measure whole smoke training jobs on both sets.")
_JOB_REPEATS = flags.DEFINE_integer("job_repeats", 3, "Runs of each smoke job (the median peak RSS is compared).")
_CACHE = flags.DEFINE_bool("cache", True, "Also measure the record cache at SD-1.5 size (FLOPs, the cache pass).")
_CACHE_RECORDS = flags.DEFINE_integer("cache_records", 8, "Records the cache pass encodes (SD-1.5 VAE on CPU).")
_PART = flags.DEFINE_string("part", "", "internal: run one measurement in this process")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_tar(path: str, items) -> None:
    """A webdataset tar (<key>.jpg + <key>.txt) as img2dataset writes one."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tf:
        for key, jpg, text in items:
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.txt", text.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def _photo_items(n: int, side: int):
    from codi_jax.data import degradation, examples, sources

    names = examples.PHOTOS
    for i in range(n):
        img = sources.EmbeddedImageSource([names[i % len(names)]])[0]
        big = np.round(degradation.bicubic_upsample(img.astype(np.float32) / 255.0, (side, side)) * 255)
        big = np.clip(big, 0, 255).astype(np.uint8)
        if (i // len(names)) % 2:
            big = big[:, ::-1]
        yield f"photo{i:06d}", _jpeg(np.ascontiguousarray(big)), f"photograph {i}"


def _synthetic_items(n: int, side: int = 48):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(n):
        base = rng.integers(0, 256, 3).astype(np.float32)
        img = (base[None, None] * 0.6 + ramp[:, None, None] * 0.4 + rng.normal(0, 12, (side, side, 3))).clip(0, 255)
        yield f"s{i:07d}", _jpeg(img.astype(np.uint8), 90), f"synthetic image {i % 997}"


def _prepared(name: str, items, n: int) -> tuple[str, dict]:
    """Tar (made once) -> prepared folder (made once); returns (folder, prepare timing)."""
    from codi_jax.data import prepare, records

    root = os.path.join(_WORKDIR.value, name)
    tar = os.path.join(root, "tars", "00000.tar")
    out = os.path.join(root, "records")
    timing_path = os.path.join(root, "prepare_timing.json")
    if not os.path.isfile(tar):
        os.makedirs(os.path.dirname(tar), exist_ok=True)
        _write_tar(tar, items)
    if not os.path.isfile(os.path.join(out, records.MANIFEST)):
        t0, c0 = time.perf_counter(), time.process_time()
        m = prepare.prepare(os.path.dirname(tar), "webdataset", out, records_per_shard=max(100, n // 20))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        timing = dict(records=m["num_records"], wall_s=round(wall, 2), cpu_s=round(cpu, 2))
        timing["records_per_s"] = round(m["num_records"] / wall, 1)
        timing["records_per_cpu_s"] = round(m["num_records"] / cpu, 1)
        timing["bytes"] = sum(os.path.getsize(os.path.join(out, s["file"])) for s in m["shards"])
        with open(timing_path, "w") as f:
            json.dump(timing, f)
    with open(timing_path) as f:
        return out, json.load(f)


def degradation_bicubic(lq: np.ndarray, size: int) -> np.ndarray:
    """The bicubic-upsampled condition, as our pipeline makes it (data.degradation.bicubic_upsample)."""
    from codi_jax.data import degradation

    return degradation.bicubic_upsample(np.round(np.clip(lq, 0, 1) * 255).astype(np.uint8), size)


def _sr_data_config(path: str, crop: int, workers: int):
    from configs import data as data_configs

    c = data_configs.get_data_config()
    c.update(
        source="array_record", path=path, crop_size=crop, image_downscale=1, worker_count=workers, eval_fraction=0.02
    )
    return c


# SD 1.5's VAE (vae/config.json) and CLIP ViT-L/14's text encoder (text_encoder/config.json): published configs.
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


def _lowered_flops(fn, *args) -> float:
    """FLOPs of fn(*args) (abstract arguments) from XLA's cost analysis of the lowered program."""
    import jax

    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def _encoder_flops(crop: int) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import ml_collections as mlc

    from codi_jax import diffusion, train
    from codi_jax.methods import base, codi
    from codi_jax.models import clip_text
    from codi_jax.models import vae as vae_lib
    from configs import common

    f32, side = jnp.float32, crop // 8
    S = jax.ShapeDtypeStruct
    vcfg = vae_lib.vae_config_from_diffusers(SD15_VAE)
    vae = vae_lib.AutoencoderKL(vcfg)
    vae_f = _lowered_flops(
        lambda p, x: vae.apply({"params": p}, x, method=vae.encode),
        vae_lib.init_shapes(vae, vcfg),
        S((1, crop, crop, 3), f32),
    )
    tm = clip_text.CLIPTextModel(clip_text.clip_text_config_from_transformers(CLIP_L))
    tp = jax.eval_shape(lambda: tm.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))["params"]
    text_f = _lowered_flops(lambda p, i: tm.apply({"params": p}, i)[0], tp, S((1, 77), jnp.int32))
    mcfg = common.model(common.sd15_unet())
    mcfg.prediction = "eps"
    mcfg.adapter.conditioning_embedding_out_channels = (16, 32, 96, 256)  # as benchmarks.sd_step
    cfg = common.codi_method()
    cfg.train = common.train(num_steps=100, batch_size=1, lr=1e-5)
    sched = mlc.ConfigDict(dict(kind="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012))
    den = base.make_denoisers(mcfg, diffusion.make_schedule(sched), cfg.boundary)
    module = den.diffusion.module
    params = jax.eval_shape(lambda r: base.init_model_params(module, mcfg, r, side, crop), jax.random.PRNGKey(0))
    unet_f = _lowered_flops(
        lambda p, z, t, c, ctx: module.apply({"params": p}, z, t, c, ctx),
        params, S((1, side, side, 4), f32), S((1,), f32), S((1, crop, crop, 3), f32), S((1, 77, 768), f32),
    )  # fmt: skip
    tx, lr = train.make_optimizer(cfg.train)

    def state(r):
        trainable, frozen = codi.split_params(
            base.adapted(base.init_model_params(module, mcfg, r, side, crop)), "full", "prev"
        )
        return train.create_state(trainable, frozen, tx, r)

    abstract = jax.eval_shape(state, jax.random.PRNGKey(0))
    loss_fn = functools.partial(codi.codi_loss, denoiser=den.consistency, teacher=den.diffusion, cfg=cfg)
    step = train.make_train_step(loss_fn, tx, lr, 0.9999)
    per_example = {}
    for b in (1, 8):
        batch = {
            "image": S((b, side, side, 4), f32),
            "cond": S((b, crop, crop, 3), f32),
            "context": S((b, 77, 768), f32),
        }
        per_example[str(b)] = _lowered_flops(step, abstract, batch) / b
    g = 1e9
    step_f = per_example["8"]
    return dict(
        crop=crop,
        vae_encoder_gflop=round(vae_f / g, 1),
        text_encoder_gflop=round(text_f / g, 1),
        unet_adapter_forward_gflop=round(unet_f / g, 1),
        codi_step_gflop_per_example={k: round(v / g, 1) for k, v in per_example.items()},
        encoders_share_of_an_uncached_step=round((vae_f + text_f) / (step_f + vae_f + text_f), 4),
    )


def _sd_vae_folder(path: str) -> str:
    """A diffusers folder holding SD 1.5's VAE architecture with random weights (written once)."""
    if not os.path.isfile(os.path.join(path, "vae", "config.json")):
        import diffusers
        import torch

        torch.manual_seed(0)
        cfg = {k: v for k, v in SD15_VAE.items()}
        diffusers.AutoencoderKL(**cfg).save_pretrained(os.path.join(path, "vae"))
        with open(os.path.join(path, "model_index.json"), "w") as f:
            json.dump({"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}, f)
    return path


# ----------------------------------------------------------------------------- measurements in child processes


def _run_part(spec: dict) -> dict:
    part = spec["part"]
    if part == "throughput":
        from codi_jax.data import pipeline

        c = _sr_data_config(spec["path"], spec["crop"], spec["workers"])
        it = pipeline.make_train_iterator(c, task="sr", global_batch_size=spec["batch"], seed=0)
        for _ in range(2 * max(1, spec["workers"])):  # warm-up: every worker started and delivering
            next(it)
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t0 < spec["seconds"]:
            b = next(it)
            n += b["image"].shape[0]
        wall = time.perf_counter() - t0
        cpu_self = time.process_time() - c0
        return dict(images=n, wall_s=round(wall, 2), images_per_s=round(n / wall, 2), main_cpu_s=round(cpu_self, 2))
    if part == "throughput_basicsr":
        import random

        import cv2
        import torch

        from codi_jax.benchmarks import basicsr_reference
        from codi_jax.data import catalog, pipeline, records

        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        c = _sr_data_config(spec["path"], spec["crop"], 0)
        src = catalog.make_source(c, "train", "sr")
        raw = src._source  # the same ArrayRecord shards; basicsr decodes with cv2 (utils.imfrombytes)
        deg = basicsr_reference.Degrader(c.degradation, c.sr_scale, usm=c.usm)
        rng, crop, k = np.random.default_rng(0), spec["crop"], 0

        def one():
            nonlocal k
            d = records.decode_fields(raw[int(rng.integers(len(src)))])
            img = cv2.imdecode(np.frombuffer(d["image"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            y, x = (int(rng.integers(n - crop + 1)) for n in img.shape[:2])
            hr = img[y : y + crop, x : x + crop].astype(np.float32) / 255.0
            if random.random() < 0.5:
                hr = hr[:, ::-1]
            gt, lq = deg(hr, k)
            k += 1
            cond = degradation_bicubic(lq, crop)
            return {"image": pipeline.to_signed(gt), "cond": pipeline.to_signed(cond), "lr": pipeline.to_signed(lq)}

        def batch():
            ex = [one() for _ in range(spec["batch"])]
            return {key: np.stack([e[key] for e in ex]) for key in ex[0]}

        batch()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < spec["seconds"]:
            n += batch()["image"].shape[0]
        wall = time.perf_counter() - t0
        return dict(images=n, wall_s=round(wall, 2), images_per_s=round(n / wall, 2))
    if part == "iterate":
        from codi_jax.data import pipeline

        c = _sr_data_config(spec["path"], 32, 0)
        c.usm_sharpen_gt = True
        it = pipeline.make_train_iterator(c, task="uncond", global_batch_size=50, seed=0)
        t0 = time.perf_counter()
        for _ in range(spec["records"] // 50):
            next(it)
        return dict(records=spec["records"], wall_s=round(time.perf_counter() - t0, 1))
    if part == "job":
        from codi_jax import experiment
        from configs import sr

        config = sr.get_config("smoke")
        config.data.update(source="array_record", path=spec["path"], image_downscale=1, eval_fraction=0.01)
        config.eval.previews = False
        t0 = time.perf_counter()
        experiment.run(config, spec["workdir"])
        return dict(wall_s=round(time.perf_counter() - t0, 1))
    if part == "encoder_flops":
        return _encoder_flops(spec["crop"])
    if part == "cache_pass":
        from codi_jax.pretrained import record_cache

        out = os.path.join(_WORKDIR.value, f"cache_pass_{time.time_ns()}")
        t0, c0 = time.perf_counter(), time.process_time()
        m = record_cache.cache_records(spec["path"], out, spec["sd"], crop_size=spec["crop"], text=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per = sum(os.path.getsize(os.path.join(out, s["file"])) for s in m["shards"]) / m["num_records"]
        return dict(
            records=m["num_records"],
            wall_s=round(wall, 1),
            cpu_s=round(cpu, 1),
            records_per_s=round(m["num_records"] / wall, 3),
            bytes_per_record=round(per),
        )
    raise ValueError(f"--part: unknown part {part!r}")


# One thread per process for the throughput parts: "per core" then means one core (BLAS, OpenMP and
# torch would otherwise spread one process over every core, and oversubscribe them under grain workers).
ONE_THREAD = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _peak(part: str, single_thread: bool = False, **kw) -> dict:
    """A child measurement with its own peak RSS (ru_maxrss, KiB on Linux) read from wait4."""
    cmd = [sys.executable, "-m", "codi_jax.benchmarks.data", f"--part={json.dumps(dict(kw, part=part))}"]
    env = dict(os.environ, **(ONE_THREAD if single_thread else {}))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = io.BytesIO()
    err = io.BytesIO()
    # Read the pipes as the child runs (a full pipe would block it), then reap it with wait4 for its rusage.
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    open_pipes = 2
    while open_pipes:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 1 << 16)
            if chunk:
                key.data.write(chunk)
            else:
                sel.unregister(key.fileobj)
                open_pipes -= 1
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = err.getvalue().decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"benchmark part {part} failed: {tail[-1] if tail else proc.returncode}")
    result = json.loads(out.getvalue().decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return result


def main(argv):
    del argv
    if _PART.value:
        spec = json.loads(_PART.value)
        print(json.dumps(_run_part(spec)))
        return
    os.makedirs(_WORKDIR.value, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": {"cpu_count": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
    }
    print(f"making the sets in {_WORKDIR.value} (once) ...", flush=True)
    photos, photo_prep = _prepared(
        f"photos{_PHOTO_SIDE.value}", _photo_items(_PHOTOS.value, _PHOTO_SIDE.value), _PHOTOS.value
    )
    small, small_prep = _prepared(f"synthetic{_SMALL.value}", _synthetic_items(_SMALL.value), _SMALL.value)
    large, large_prep = _prepared(f"synthetic{_LARGE.value}", _synthetic_items(_LARGE.value), _LARGE.value)
    report["prepare"] = {"photos": photo_prep, "small": small_prep, "large": large_prep}

    rows = []
    kw = dict(path=photos, crop=_CROP.value, batch=_BATCH.value, seconds=_SECONDS.value, single_thread=True)
    ref = None
    if _BASICSR.value:
        ref = _peak("throughput_basicsr", **kw)
        print(f"basicsr (reference), one process: {ref['images_per_s']:.2f} images/s", flush=True)
    for w in map(int, _WORKERS.value):
        r = _peak("throughput", workers=w, **kw)
        r["workers"] = w
        r["cores"] = max(1, min(w, os.cpu_count()))
        r["images_per_s_per_core"] = round(r["images_per_s"] / r["cores"], 2)
        rows.append(r)
        print(f"workers {w}: {r['images_per_s']:.2f} images/s ({r['images_per_s_per_core']:.2f} per core)", flush=True)
    report["sr_throughput"] = dict(
        crop=_CROP.value,
        batch=_BATCH.value,
        photo_side=_PHOTO_SIDE.value,
        rows=rows,
        basicsr=ref,
        threads_per_process=1,
    )
    if ref:
        report["sr_throughput"]["ours_over_basicsr_per_core"] = round(rows[0]["images_per_s"] / ref["images_per_s"], 2)

    mem = {
        "iterator_small_set": _peak("iterate", path=small, records=_SMALL.value),
        "iterator_large_set": _peak("iterate", path=large, records=_SMALL.value),
        "iterator_large_set_long": _peak("iterate", path=large, records=_READ_LARGE.value),
    }
    if _JOBS.value:
        # A job's peak RSS varies from run to run by tens of MB (XLA compilation, allocator arenas; once
        # 328 MB), so each set's job runs --job_repeats times, interleaved, and the medians are compared.
        runs = {"job_small_set": [], "job_large_set": []}
        for _ in range(_JOB_REPEATS.value):
            for name, path in (("job_small_set", small), ("job_large_set", large)):
                wd = os.path.join(_WORKDIR.value, f"run_{name}_{time.time_ns()}")
                runs[name].append(_peak("job", path=path, workdir=wd))
        for name, rs in runs.items():
            peaks = [r["peak_rss_mb"] for r in rs]
            mem[name] = dict(peak_rss_mb=float(np.median(peaks)), peak_rss_mb_all=peaks, wall_s=rs[0]["wall_s"])
    report["memory"] = mem
    report["memory"]["iterator_difference_mb"] = round(
        mem["iterator_large_set"]["peak_rss_mb"] - mem["iterator_small_set"]["peak_rss_mb"], 1
    )
    if _JOBS.value:
        report["memory"]["job_difference_mb"] = round(
            mem["job_large_set"]["peak_rss_mb"] - mem["job_small_set"]["peak_rss_mb"], 1
        )
    if _CACHE.value:
        report["cache"] = {"flops": _peak("encoder_flops", crop=_CROP.value)}
        few, _ = _prepared(
            f"photos{_PHOTO_SIDE.value}_{_CACHE_RECORDS.value}",
            _photo_items(_CACHE_RECORDS.value, _PHOTO_SIDE.value),
            _CACHE_RECORDS.value,
        )
        sd = _sd_vae_folder(os.path.join(_WORKDIR.value, "sd15_vae_random"))
        report["cache"]["pass"] = _peak("cache_pass", path=few, sd=sd, crop=_CROP.value)
    report["host"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    _print(report)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)


def _print(report):
    print(f"\n{report['date']}, {report['host']['cpu_count']} CPUs, load {report['host']['load_average_at_start']}")
    t = report["sr_throughput"]
    print(f"SR batches at {t['crop']} px from {t['photo_side']} px JPEGs (batch {t['batch']}):")
    if t.get("basicsr"):
        b = t["basicsr"]
        print(
            f"  basicsr reference: {b['images_per_s']:7.2f} images/s per core  (ours / basicsr: {t['ours_over_basicsr_per_core']})"
        )
    for r in t["rows"]:
        print(
            f"  workers {r['workers']}: {r['images_per_s']:7.2f} images/s  {r['images_per_s_per_core']:7.2f} per core  peak RSS {r['peak_rss_mb']} MB"
        )
    for name, p in report["prepare"].items():
        print(
            f"prepare {name}: {p['records']} records, {p['records_per_s']} records/s ({p['records_per_cpu_s']} per CPU s)"
        )
    for name, m in report["memory"].items():
        if isinstance(m, dict):
            what = f"{m['records']} records, " if "records" in m else f"median of {m.get('peak_rss_mb_all')}, "
            print(f"memory {name}: peak RSS {m['peak_rss_mb']} MB ({what}{m['wall_s']} s)")
    print(f"iterator: large - small set = {report['memory']['iterator_difference_mb']} MB")
    if "job_difference_mb" in report["memory"]:
        print(f"training job: large - small set = {report['memory']['job_difference_mb']} MB")
    if "cache" in report:
        f, p = report["cache"]["flops"], report["cache"]["pass"]
        print(
            f"SD-1.5 size, GFLOP per example: VAE encoder {f['vae_encoder_gflop']} ({f['crop']} px), text encoder "
            f"{f['text_encoder_gflop']}, U-Net + adapter forward {f['unet_adapter_forward_gflop']}, CoDi step "
            f"{f['codi_step_gflop_per_example']}; the encoders' share of an uncached step: "
            f"{100 * f['encoders_share_of_an_uncached_step']:.1f}%"
        )
        print(
            f"cache pass (SD-1.5 VAE, CPU): {p['records']} records in {p['wall_s']} s ({p['records_per_s']} records/s), "
            f"{p['bytes_per_record']} bytes per record"
        )


if __name__ == "__main__":
    logging_utils.run_cli(main)
