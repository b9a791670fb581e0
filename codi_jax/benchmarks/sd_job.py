"""The training job at Stable Diffusion size on this machine, with random weights: compile, train steps,
a checkpoint of the whole state written and read back, evaluation through the VAE decoder.

  python -m codi_jax.benchmarks.sd_job --arch=sd15 --workdir=/tmp/sd_job --resolution=256 --out=sd_job.json

1. Writes a diffusers-format folder of the architecture (`architectures.write_random_folder`) with
   random weights, made by diffusers' and transformers' own classes (`.[test]` installs them), unless
   WORKDIR/teacher_random holds one. Its tokenizer knows a handful of pieces (the training prompt is SD's
   empty one).
2. Runs `python -m codi_jax.main --config=configs/sr.py` on that folder for `--steps` steps
   (PE-CoDi by default: full CoDi at SD size does not fit 24 GiB of host memory; see the planner),
   evaluating at 1 and 4 steps; then the same command with one step more, which restores the whole
   train state from the checkpoint and trains on.
3. Collects compile time, step time, peak host RSS of each run, checkpoint write and read times from
   the job's own log and compile.json, and writes them as JSON, with a timeline of the job's resident
   memory against its log lines (where the memory goes).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time

from absl import flags, logging

from codi_jax import hardware, logging_utils, storage
from codi_jax.pretrained import architectures

_ARCH = flags.DEFINE_enum("arch", "sd15", list(architectures.PRESETS), "Architecture preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the random teacher, the run and its logs go.")
_RES = flags.DEFINE_integer("resolution", 256, "Pixel crop size (latents are 8x smaller).")
_STEPS = flags.DEFINE_integer("steps", 3, "Train steps of the first run (the second trains one more).")
_MODE = flags.DEFINE_enum("mode", "pe", ["pe", "full"], "codi.mode.")
_OUT = flags.DEFINE_string("out", "", "Write the figures as JSON here.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "model.dtype. float32 on a CPU: XLA's CPU compiler runs bfloat16 matmuls in float32 and holds float32 "
    "copies of the weights' casts (at SD-1.5 size 8.6 instead of 4.4 GiB of temporaries: out of 24 GiB).",
)
_EXTRA = flags.DEFINE_list("extra", [], "More --config.x=y flags for the job.")


def job_command(teacher: str, workdir: str, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "codi_jax.main", "--config=configs/sr.py", f"--workdir={workdir}",
        f"--config.teacher.pretrained_path={teacher}", f"--config.data.crop_size={_RES.value}",
        f"--config.codi.mode={_MODE.value}", f"--config.model.dtype={_DTYPE.value}", "--config.codi.train.batch_size=1",
        f"--config.codi.train.num_steps={steps}", "--config.codi.train.log_every=1",
        f"--config.codi.train.checkpoint_every={steps}", "--config.codi.train.warmup_steps=1",
        "--config.eval.num_examples=2", "--config.eval.batch_size=1", "--config.eval.grid_examples=2",
        "--config.eval.steps=(1,4)", "--config.eval.teacher_ddim_steps=0", "--config.eval.previews=False",
        "--config.mesh.ici=(1,1,1)", *[f"--config.{x}" for x in _EXTRA.value],
    ]  # fmt: skip


_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")


def _run(cmd, log_path: str, sample_s: float = 0.5) -> tuple[float, str, list]:
    """Runs the job; returns its wall time, its log and a memory timeline.

    The timeline has one row per log line at which the job's resident memory had moved by at least
    0.25 GiB since the last row: [seconds since start, RSS when the line appeared, the peak RSS sampled
    since the last row, the line]. Sampled every `sample_s`, so a spike shorter than that can be missed
    (ru_maxrss, the report's peak, cannot).
    """
    t0 = time.perf_counter()
    timeline, last_rss, peak = [], 0.0, 0.0
    with open(log_path, "w") as log, open(log_path) as reader:
        # This machine's CPU, whether or not libtpu is installed (it would probe for a TPU first).
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            done = proc.poll() is not None
            rss = hardware.process_memory_bytes(proc.pid) / 2**30
            peak = max(peak, rss)
            for line in reader.readlines():
                if done or max(abs(rss - last_rss), peak - last_rss) < 0.25:
                    continue
                row = [round(time.perf_counter() - t0, 1), round(rss, 2), round(peak, 2)]
                timeline.append(row + [_ABSL_PREFIX.sub("", line.strip())[:160]])
                last_rss, peak = rss, rss
            if done:
                break
            time.sleep(sample_s)
    wall = time.perf_counter() - t0
    text = open(log_path).read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); its log: {log_path}")
    return wall, text, timeline


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def main(argv):
    del argv
    workdir = _WORKDIR.value
    if not workdir:
        raise ValueError("--workdir is required")
    run_dir = os.path.join(workdir, "run")
    if os.path.exists(run_dir):  # the first run would resume it, and time a restore instead of a compile
        raise ValueError(f"{run_dir} exists from an earlier benchmark: remove it (the teacher folder is reused)")
    os.makedirs(workdir, exist_ok=True)
    teacher = os.path.join(workdir, "teacher_random")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(teacher, "model_index.json")):
        architectures.write_random_folder(_ARCH.value, teacher)
    write_s = time.perf_counter() - t0
    report = {
        "arch": _ARCH.value,
        "resolution": _RES.value,
        "mode": _MODE.value,
        "dtype": _DTYPE.value,
        "date": time.strftime("%Y-%m-%d"),
    }
    report["write_teacher_s"] = round(write_s, 1)
    for name, steps in (("first", _STEPS.value), ("resumed", _STEPS.value + 1)):
        logging.info("%s run: %d steps (log in %s)", name, steps, workdir)
        wall, text, timeline = _run(job_command(teacher, run_dir, steps), os.path.join(workdir, f"{name}.log"))
        speeds = _floats(r"codi step \d+/\d+ \([\d.]+%\) \| ([\d.]+) steps/s", text)
        report[name] = {
            "wall_s": round(wall, 1),
            "peak_rss_gib_so_far": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
            "compile_s": _floats(r"codi: compiled in ([\d.]+) s", text),
            "step_s": [round(1 / s, 2) for s in speeds if s > 0],
            "checkpoint_save_blocking_s": _floats(
                r"codi: checkpoint step \d+: training resumed after ([\d.]+) s", text
            ),
            "checkpoint_wait_s": _floats(r"codi: checkpoint writes finished \(waited ([\d.]+) s", text),
            "restore_s": _floats(r"codi: resumed from step \d+ \(.*?\) in ([\d.]+) s", text),
            "eval_s": _floats(r'"eval_s": ([\d.]+)', open(os.path.join(run_dir, "metrics.json")).read()),
            "rss_timeline": timeline,
        }
        print(json.dumps({name: report[name]}), flush=True)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(run_dir, "codi")) for f in fs]
    report["codi_stage_bytes"] = sum(sizes)
    report["metrics"] = json.load(open(os.path.join(run_dir, "metrics.json")))["metrics"]
    if _OUT.value:
        storage.write_json(_OUT.value, report)
    print(json.dumps(report))


if __name__ == "__main__":
    logging_utils.run_cli(main)
