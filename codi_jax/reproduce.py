"""Reproduce the paper's super-resolution comparisons (Table 2, Table 3, Fig. 7) at tiny scale.

  python -m codi_jax.reproduce --workdir=/tmp/repro                      # all runs, seeds 0 1 2
  python -m codi_jax.reproduce --workdir=/tmp/repro --seeds=0 --runs=codi,finetune
  python -m codi_jax.reproduce --workdir=/tmp/repro --report_only --results=docs/results.md

Every run is `experiment.run` (the production path) on `configs/sr.py:tiny` plus the overrides of
`configs/repro.py`, in WORKDIR/seed<S>/<run>. One teacher is pretrained once, in WORKDIR/pretrained,
and shared by all runs and seeds. Running the command again skips finished runs (their
metrics.json exists) and resumes unfinished ones from their checkpoints; a run that fails leaves its
traceback and the others go on. At the end it writes the report (`evaluation/repro_report.py`: the
tables, the spread over seeds, the ordering checks, plots, pictures and wall times) to `--results`.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import signal
import sys
import time
import traceback

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from codi_jax import experiment, logging_utils, storage
from codi_jax.evaluation import repro_report
from codi_jax.evaluation.repro_report import ERROR_FILE, read_times, wall_file


def apply_overrides(config, overrides: dict):
    """`{'codi.mode': 'pe'}` -> config.codi.mode = 'pe' (unknown keys fail with the key named)."""
    for dotted, value in overrides.items():
        node, *path = config, *dotted.split(".")
        for part in path[:-1]:
            node = node[part]
        if path[-1] not in node:
            raise KeyError(f"configs/repro.py: override {dotted!r} names no config field")
        node[path[-1]] = value
    return config


def base_config(rcfg):
    """The run's base config from `file.py:variant`, loaded like --config (path relative to the working dir)."""
    path, _, variant = rcfg.base.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config base={rcfg.base!r}: no file {path} (run from the repository root)")
    spec = importlib.util.spec_from_file_location("_repro_base_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def run_config(rcfg, run, seed: int, workdir: str, teacher_dir: str):
    config = apply_overrides(base_config(rcfg), dict(tuple(kv) for kv in rcfg.get("common", ())))
    config = apply_overrides(config, dict(run.overrides))
    config.seed = seed
    config.teacher.checkpoint = teacher_dir
    if run.needs_finetune:
        config.finetune.checkpoint = storage.join(workdir, f"seed{seed}", "finetune")
    if config.method == "codi" and "eval.steps" not in dict(run.overrides):
        config.eval.steps = tuple(rcfg.few_steps)
    return config


def _ordered(rcfg, names):
    runs = [r for r in rcfg.runs if not names or r.name in names]
    unknown = set(names) - {r.name for r in rcfg.runs}
    if unknown:
        raise ValueError(f"--runs has unknown names {sorted(unknown)}; known: {[r.name for r in rcfg.runs]}")
    # A two-stage baseline needs its seed's finetune run first.
    if any(r.needs_finetune for r in runs) and not any(r.name == "finetune" for r in runs):
        runs = [r for r in rcfg.runs if r.name == "finetune"] + runs
    return sorted(runs, key=lambda r: not r.name == "finetune")


def run_all(rcfg, workdir: str, seeds, names=(), teacher_checkpoint: str = ""):
    """Train and evaluate every (seed, run) not finished yet; returns the list of run dirs."""
    runs = _ordered(rcfg, names)
    teacher_dir = teacher_checkpoint or storage.join(workdir, "pretrained")
    if not teacher_checkpoint:
        t0, c0 = time.perf_counter(), time.process_time()
        first = run_config(rcfg, runs[0], seeds[0], workdir, "")
        experiment.run(first, teacher_dir, stop_after="teacher")
        _add_wall(teacher_dir, time.perf_counter() - t0, time.process_time() - c0)
    storage.write_json(  # for the report
        storage.join(workdir, "teacher.json"),
        {
            "dir": storage.absolute(teacher_dir),
            "trained_here": not teacher_checkpoint,
            "common": [list(kv) for kv in rcfg.get("common", ())],
        },
        indent=None,
    )
    todo = [(s, r) for s in seeds for r in runs]
    failed = {}  # (seed, run name) -> one line
    for k, (seed, run) in enumerate(todo):
        run_dir = storage.join(workdir, f"seed{seed}", run.name)
        if storage.exists(storage.join(run_dir, "metrics.json")):
            continue
        if run.needs_finetune and (seed, "finetune") in failed:
            failed[(seed, run.name)] = f"not run: seed {seed}'s finetune run, which it starts from, failed"
            print(
                f"reproduce: [{k + 1}/{len(todo)}] seed {seed} run {run.name} skipped ({failed[(seed, run.name)]})",
                flush=True,
            )
            continue
        left = estimate_left(workdir, todo[k:])
        eta = "" if left is None else f", ETA {datetime.timedelta(seconds=int(left))}"
        print(f"reproduce: [{k + 1}/{len(todo)}] seed {seed} run {run.name}{eta}", flush=True)
        error_file = storage.join(run_dir, ERROR_FILE)
        storage.remove(error_file)  # an earlier attempt's, if any
        t0, c0 = time.perf_counter(), time.process_time()
        finished = False
        try:
            experiment.run(run_config(rcfg, run, seed, workdir, teacher_dir), run_dir)
            finished = True
        except Exception as e:  # one run's failure does not stop the others (Ctrl-C and kill do)
            storage.write_text(error_file, traceback.format_exc())
            failed[(seed, run.name)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(
                f"reproduce: seed {seed} run {run.name} failed ({failed[(seed, run.name)]}); "
                f"traceback in {error_file}; going on with the other runs",
                flush=True,
            )
        finally:  # an interrupted run keeps the time it spent (the next invocation resumes and adds to it)
            dt = time.perf_counter() - t0
            _add_wall(run_dir, dt, time.process_time() - c0, interrupted=not finished)
    if failed:
        raise RunsFailed(
            f"{len(failed)} of {len(todo)} runs failed: "
            + "; ".join(f"seed {s} {name}: {msg}" for (s, name), msg in failed.items())
        )
    return teacher_dir


class RunsFailed(RuntimeError):
    """Some runs raised; the others finished (each failed run's traceback is in its ERROR_FILE)."""


def estimate_left(workdir: str, todo) -> float | None:
    """Seconds the unfinished (seed, run) pairs of `todo` will take: each run's mean wall time over the
    seeds that finished it in one go, else the mean over every run so timed (None: nothing timed yet)."""
    by_run = {}
    for path in storage.glob(storage.join(workdir, "seed*", "*", "wall.json")):
        run_dir = storage.dirname(path)
        if storage.exists(storage.join(run_dir, "metrics.json")):
            wall, _, clean = read_times(path)
            if clean:
                by_run.setdefault(storage.basename(run_dir), []).append(wall)
    if not by_run:
        return None
    overall = float(np.mean([w for v in by_run.values() for w in v]))
    pending = [r.name for s, r in todo if not storage.exists(storage.join(workdir, f"seed{s}", r.name, "metrics.json"))]
    return sum(float(np.mean(by_run[n])) if n in by_run else overall for n in pending)


def _add_wall(run_dir, seconds, cpu_seconds, interrupted=False):
    """Wall and CPU time summed over the invocations that worked on this run (a resumed run counts
    both, and its count of interruptions says that it redid the steps since its last checkpoint and
    compiled again). CPU time (the process's, all threads) leaves out time the run spent paused or the
    machine gave to other jobs; wall time does not."""
    path = wall_file(run_dir)
    prev = storage.read_json(path) if storage.exists(path) else {"wall_s": 0.0, "cpu_s": 0.0}
    cpu = prev.get("cpu_s")  # None: the run began before CPU time was recorded (no partial sums)
    out = {"wall_s": round(prev["wall_s"] + seconds, 1), "cpu_s": None if cpu is None else round(cpu + cpu_seconds, 1)}
    n = prev.get("interrupted", 0) + int(interrupted)
    if n:
        out["interrupted"] = n
    storage.write_json(path, out, indent=None)


def _define_flags():
    """The command's flags (defined only when run as a command: tests import this module beside
    others that define --config and --workdir)."""
    return dict(
        config=config_flags.DEFINE_config_file("config", "configs/repro.py:tiny", "The reproduction's run list."),
        workdir=flags.DEFINE_string("workdir", None, "Where every run lives (resumable)."),
        seeds=flags.DEFINE_list("seeds", [], "Training seeds (default: the config's)."),
        runs=flags.DEFINE_list("runs", [], "Only these runs (names in configs/repro.py; default all)."),
        results=flags.DEFINE_string("results", "", "Write the report here (default WORKDIR/results.md)."),
        report_only=flags.DEFINE_bool("report_only", False, "Only aggregate the finished runs into the report."),
        teacher=flags.DEFINE_string(
            "teacher_checkpoint",
            "",
            "A workdir with a complete teacher/ stage to share (default: pretrain one in WORKDIR/pretrained).",
        ),
    )


_F = {}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
    del argv
    # `kill` (SIGTERM) stops like Ctrl-C: the running run records the time it spent before exiting.
    signal.signal(signal.SIGTERM, _interrupt)
    if not _F["workdir"].value:
        raise app.UsageError("--workdir is required")
    rcfg = _F["config"].value
    # Every seed compiles the same programs again: a persistent cache makes that a lookup.
    import jax

    jax.config.update("jax_compilation_cache_dir", storage.join(_F["workdir"].value, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    seeds = [int(s) for s in _F["seeds"].value] if _F["seeds"].value else list(rcfg.seeds)
    results = _F["results"].value or storage.join(_F["workdir"].value, "results.md")
    failed = None
    if not _F["report_only"].value:
        try:
            run_all(rcfg, _F["workdir"].value, seeds, _F["runs"].value, _F["teacher"].value)
        except RunsFailed as e:  # the report of what did finish is still written
            failed = e
    command = "python -m codi_jax.reproduce " + " ".join(a for a in sys.argv[1:] if not a.startswith("--report_only"))
    path = repro_report.write_report(rcfg, _F["workdir"].value, seeds, results, command)
    print(f"reproduce: report {path}")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _F.update(_define_flags())
    logging_utils.run_cli(main)
