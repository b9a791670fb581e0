"""Reproduce the paper's super-resolution comparisons (Table 2, Table 3, Fig. 7) at tiny scale.

  python -m codi_jax.reproduce --workdir=/tmp/repro                      # all runs, seeds 0 1 2
  python -m codi_jax.reproduce --workdir=/tmp/repro --seeds=0 --runs=codi,finetune
  python -m codi_jax.reproduce --workdir=/tmp/repro --report_only --results=docs/results.md

Every run is `experiment.run` (the production path) on `configs/sr.py:tiny` plus the overrides of
`configs/repro.py`, in WORKDIR/seed<S>/<run>. One teacher is pretrained once, in WORKDIR/pretrained,
and shared by all runs and seeds. Running the command again skips finished runs (their
metrics.json exists) and resumes unfinished ones from their checkpoints. At the end it writes the
tables, the spread over seeds, the ordering checks, plots and wall times to `--results`.
"""

from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import sys
import time
import traceback

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from codi_jax import experiment
from codi_jax.evaluation import grids as grids_lib, plots

METRICS = (("psnr", "PSNR", "higher"), ("ssim", "SSIM", "higher"), ("swd_mean", "SWD", "lower"),
           ("hf_ratio", "HF ratio", "1 = HR"))


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
        config.finetune.checkpoint = os.path.join(workdir, f"seed{seed}", "finetune")
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


ERROR_FILE = "error.txt"   # a failed run's traceback, in its run dir (removed when it is tried again)


def _wall_file(run_dir):
    return os.path.join(run_dir, "wall.json")


def run_all(rcfg, workdir: str, seeds, names=(), teacher_checkpoint: str = ""):
    """Train and evaluate every (seed, run) not finished yet; returns the list of run dirs."""
    runs = _ordered(rcfg, names)
    teacher_dir = teacher_checkpoint or os.path.join(workdir, "pretrained")
    if not teacher_checkpoint:
        t0, c0 = time.perf_counter(), time.process_time()
        first = run_config(rcfg, runs[0], seeds[0], workdir, "")
        experiment.run(first, teacher_dir, stop_after="teacher")
        _add_wall(teacher_dir, time.perf_counter() - t0, time.process_time() - c0)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "teacher.json"), "w") as f:   # for the report
        json.dump({"dir": os.path.abspath(teacher_dir), "trained_here": not teacher_checkpoint,
                   "common": [list(kv) for kv in rcfg.get("common", ())]}, f)
    todo = [(s, r) for s in seeds for r in runs]
    failed = {}   # (seed, run name) -> one line
    for k, (seed, run) in enumerate(todo):
        run_dir = os.path.join(workdir, f"seed{seed}", run.name)
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            continue
        if run.needs_finetune and (seed, "finetune") in failed:
            failed[(seed, run.name)] = f"not run: seed {seed}'s finetune run, which it starts from, failed"
            print(f"reproduce: [{k + 1}/{len(todo)}] seed {seed} run {run.name} skipped ({failed[(seed, run.name)]})",
                  flush=True)
            continue
        left = estimate_left(workdir, todo[k:])
        eta = "" if left is None else f", ETA {datetime.timedelta(seconds=int(left))}"
        print(f"reproduce: [{k + 1}/{len(todo)}] seed {seed} run {run.name}{eta}", flush=True)
        error_file = os.path.join(run_dir, ERROR_FILE)
        if os.path.exists(error_file):
            os.remove(error_file)   # an earlier attempt's
        t0, c0 = time.perf_counter(), time.process_time()
        finished = False
        try:
            experiment.run(run_config(rcfg, run, seed, workdir, teacher_dir), run_dir)
            finished = True
        except Exception as e:   # one run's failure does not stop the others (Ctrl-C and kill do)
            os.makedirs(run_dir, exist_ok=True)
            with open(error_file, "w") as f:
                f.write(traceback.format_exc())
            failed[(seed, run.name)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"reproduce: seed {seed} run {run.name} failed ({failed[(seed, run.name)]}); "
                  f"traceback in {error_file}; going on with the other runs", flush=True)
        finally:   # an interrupted run keeps the time it spent (the next invocation resumes and adds to it)
            dt = time.perf_counter() - t0
            _add_wall(run_dir, dt, time.process_time() - c0, interrupted=not finished)
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed: " +
                         "; ".join(f"seed {s} {name}: {msg}" for (s, name), msg in failed.items()))
    return teacher_dir


class RunsFailed(RuntimeError):
    """Some runs raised; the others finished (each failed run's traceback is in its ERROR_FILE)."""


def estimate_left(workdir: str, todo) -> float | None:
    """Seconds the unfinished (seed, run) pairs of `todo` will take: each run's mean wall time over the
    seeds that finished it in one go, else the mean over every run so timed (None: nothing timed yet)."""
    by_run = {}
    for path in glob.glob(os.path.join(workdir, "seed*", "*", "wall.json")):
        run_dir = os.path.dirname(path)
        if os.path.exists(os.path.join(run_dir, "metrics.json")):
            wall, _, clean = _read_times(path)
            if clean:
                by_run.setdefault(os.path.basename(run_dir), []).append(wall)
    if not by_run:
        return None
    overall = float(np.mean([w for v in by_run.values() for w in v]))
    pending = [r.name for s, r in todo if not os.path.exists(os.path.join(workdir, f"seed{s}", r.name, "metrics.json"))]
    return sum(float(np.mean(by_run[n])) if n in by_run else overall for n in pending)


def _add_wall(run_dir, seconds, cpu_seconds, interrupted=False):
    """Wall and CPU time summed over the invocations that worked on this run (a resumed run counts
    both, and its count of interruptions says that it redid the steps since its last checkpoint and
    compiled again). CPU time (the process's, all threads) leaves out time the run spent paused or the
    machine gave to other jobs; wall time does not."""
    path = _wall_file(run_dir)
    prev = {"wall_s": 0.0, "cpu_s": 0.0}
    if os.path.exists(path):
        with open(path) as f:
            prev = json.load(f)
    cpu = prev.get("cpu_s")   # None: the run began before CPU time was recorded (no partial sums)
    os.makedirs(run_dir, exist_ok=True)
    out = {"wall_s": round(prev["wall_s"] + seconds, 1), "cpu_s": None if cpu is None else round(cpu + cpu_seconds, 1)}
    n = prev.get("interrupted", 0) + int(interrupted)
    if n:
        out["interrupted"] = n
    with open(path, "w") as f:
        json.dump(out, f)


def _read_times(path):
    """(wall s, CPU s or None, clean) of a wall.json; clean: timed in one go with its CPU time."""
    with open(path) as f:
        t = json.load(f)
    return t["wall_s"], t.get("cpu_s"), t.get("cpu_s") is not None and not t.get("interrupted")


# --------------------------------------------------------------------------- the report


def collect(rcfg, workdir: str, seeds):
    """{(run name, result key): {metric: [value per finished seed]}}, plus per-run wall times."""
    rows, walls, bicubic, bicubic_seeds = {}, {}, {}, set()
    for run in rcfg.runs:
        for seed in seeds:
            run_dir = os.path.join(workdir, f"seed{seed}", run.name)
            path = os.path.join(run_dir, "metrics.json")
            if not os.path.exists(path):
                continue
            with open(path) as f:
                report = json.load(f)
            for key, vals in report["metrics"].items():
                if key == "bicubic" and seed in bicubic_seeds:
                    continue   # the same crops in every run: one bicubic row per seed
                if key == "bicubic":
                    bicubic_seeds.add(seed)
                target = bicubic if key == "bicubic" else rows.setdefault((run.name, key), {})
                for m, _, _ in METRICS:
                    target.setdefault(m, []).append(vals[m])
                target.setdefault("seed", []).append(seed)
            if os.path.exists(_wall_file(run_dir)):
                walls.setdefault(run.name, []).append(_read_times(_wall_file(run_dir)))
    return rows, walls, bicubic


def parse_key(key: str):
    """'finetune_dpmpp_2m_4step' -> ('dpmpp_2m', 4); 'codi_4step' -> ('deterministic', 4)."""
    body, steps = key.rsplit("_", 1)
    n = int(steps[:-len("step")])
    method, _, sampler = body.partition("_")
    return (sampler or "deterministic"), n


def _fmt(values, metric):
    v = np.asarray(values, np.float64)
    digits = 2 if metric == "psnr" else (3 if metric in ("ssim", "hf_ratio") else 4)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _row_label(run, key):
    from codi_jax import sampling
    sampler, n = parse_key(key)
    label = run.label if sampler == "deterministic" else f"{run.label} + {sampling.SAMPLER_LABELS[sampler]}"
    if run.name == "finetune" and sampler == "deterministic":
        label += " (DDIM)"
    return label, n


def table(rcfg, rows, section, bicubic=None, steps_filter=None):
    if not any(r.section == section and any(name == r.name for name, _ in rows) for r in rcfg.runs) and not bicubic:
        pending = [r.name for r in rcfg.runs if r.section == section]
        return f"(no run of this section has finished yet: {', '.join(pending)})"
    head = "| Method | steps | " + " | ".join(f"{name} ({better})" for _, name, better in METRICS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    if bicubic:
        lines.append("| bicubic upsampling | - | " + " | ".join(_fmt(bicubic[m], m) for m, _, _ in METRICS) +
                     f" | {len(bicubic['psnr'])} |")
    for run in rcfg.runs:
        if run.section != section:
            continue
        entries = [(k, v) for (name, k), v in rows.items() if name == run.name]
        entries.sort(key=lambda kv: (parse_key(kv[0])[0] != "deterministic", parse_key(kv[0])[0], -parse_key(kv[0])[1]))
        for key, vals in entries:
            label, n = _row_label(run, key)
            if steps_filter is not None and n not in steps_filter:
                continue
            lines.append(f"| {label} | {n} | " + " | ".join(_fmt(vals[m], m) for m, _, _ in METRICS) +
                         f" | {len(vals['psnr'])} |")
    return "\n".join(lines)


def _paired(ours, theirs, metric, better):
    """Over the seeds both rows have: (our mean, their mean, seeds on which ours is better, seeds)."""
    a = dict(zip(ours["seed"], ours[metric]))
    b = dict(zip(theirs["seed"], theirs[metric]))
    both = sorted(set(a) & set(b))
    won = sum((a[s] > b[s]) if better == "higher" else (a[s] < b[s]) for s in both)
    return float(np.mean([a[s] for s in both])), float(np.mean([b[s] for s in both])), won, len(both)


def _four(rcfg):
    return 4 if 4 in rcfg.few_steps else max(rcfg.few_steps)


def ordering_checks(rcfg, rows):
    """Table 2: the paper's expected ordering at 4 steps, checked on each metric (not forced)."""
    four = _four(rcfg)
    return _comparisons(rows, four, [
        ("finetuned, DDIM 50 steps (paper: CoDi 4 steps about equal)", "finetune", "finetune_50step"),
        (f"finetuned, DDIM {four} steps", "finetune", f"finetune_{four}step"),
        (f"finetuned + DPM-Solver++ {four} steps", "finetune", f"finetune_dpmpp_2m_{four}step"),
        (f"CM-II {four} steps", "cm", f"codi_{four}step"),
        (f"CM-II (frozen) {four} steps", "cm_frozen", f"codi_{four}step"),
        (f"GD-II {four} steps", "gd", f"gd_{four}step")])


def ablation_checks(rcfg, rows):
    """Table 3 / Fig. 7 / d_x: CoDi at 4 steps against each variant at 4 steps."""
    four = _four(rcfg)
    expected = {"no_pf_ode": "paper: behind CoDi", "no_noise_consistency": "paper: behind CoDi",
                "no_guidance": "paper: behind CoDi", "random_init": "paper: far behind CoDi",
                "t_per_batch": "paper: ahead of one t per sample"}
    def text(r):   # Table 3's "- X" rows read "without X" here
        label = "without " + r.label[2:] if r.label.startswith("- ") else r.label
        return f"{label} ({expected[r.name]})" if r.name in expected else label
    return _comparisons(rows, four, [(text(r), r.name, f"codi_{four}step")
                                     for r in rcfg.runs if r.section in ("table3", "fig7", "dx")])


def _comparisons(rows, four, comparisons):
    """One line per (text, run, result key): CoDi at `four` steps against it on PSNR, SSIM and SWD."""
    if ("codi", f"codi_{four}step") not in rows:
        return ["- (CoDi not finished: no checks yet)"]
    out = []
    for text, name, key in comparisons:
        parts = []
        for m, label, better in METRICS[:3]:
            if (name, key) not in rows:
                continue
            # Means over the seeds both finished (a partial report compares like with like); on one seed
            # each, the same crops and noise: the per-seed tally says whether a mean difference is noise.
            ours, theirs, won, paired = _paired(rows[("codi", f"codi_{four}step")], rows[(name, key)], m, better)
            if not paired:
                continue
            wins = ours > theirs if better == "higher" else ours < theirs
            verdict = "CoDi better" if wins else "CoDi worse"
            if paired > 1:
                verdict += f"; better on {won} of {paired} seeds"
            parts.append(f"{label} {ours:.4g} vs {theirs:.4g} ({verdict})")
        if parts:
            out.append(f"- CoDi {four} steps vs {text}: " + "; ".join(parts))
    return out


def plot_steps(rcfg, rows, path, sections=("table2",), reference=()):
    """PSNR and SWD against the number of sampling steps, one line per (run, sampler) of the runs in
    `sections` (plus the runs named in `reference`); seed means. None when no run has two points."""
    series = {}
    for (name, key), vals in rows.items():
        run = next(r for r in rcfg.runs if r.name == name)
        if run.section not in sections and name not in reference:
            continue
        label, n = _row_label(run, key)
        series.setdefault(label, []).append((n, {m: float(np.mean(vals[m])) for m, _, _ in METRICS}))
    series = {k: v for k, v in series.items() if len(v) > 1}
    return plots.metrics_vs_steps(series, path) if series else None


# Side-by-side pictures of one seed's runs on the same held-out crops, between LR (and bicubic) and HR:
# (column label, run, sampler, steps); steps "few" is the few-step count of the ordering checks (4),
# "most" the run's largest evaluated step count.
COMPARISONS = {
    "results_compare.png": (True, [
        ("FT {n}", "finetune", "deterministic", "few"), ("FT {n}", "finetune", "deterministic", "most"),
        ("FT DPM {n}", "finetune", "dpmpp_2m", "few"), ("GD-II", "gd", "deterministic", "few"),
        ("CM-II", "cm", "deterministic", "few"), ("CM-II fr.", "cm_frozen", "deterministic", "few"),
        ("PE-CoDi", "pe_codi", "deterministic", "few"), ("CoDi", "codi", "deterministic", "few")]),
    "results_compare_ablations.png": (False, [
        ("CoDi", "codi", "deterministic", "few"), ("-PF-ODE", "no_pf_ode", "deterministic", "few"),
        ("-noise c.", "no_noise_consistency", "deterministic", "few"), ("-guid.", "no_guidance", "deterministic", "few"),
        ("rand. init", "random_init", "deterministic", "few"), ("t/batch", "t_per_batch", "deterministic", "few"),
        ("Huber", "dx_huber", "deterministic", "few")]),
}
COMPARISON_CAPTIONS = {
    "results_compare.png": "LR | bicubic | finetuned DDIM at {few} and {most} steps, DPM-Solver++ at {few} | GD-II | "
                           "CM-II | CM-II frozen | PE-CoDi | CoDi (the distilled models at {few} steps) | HR",
    "results_compare_ablations.png": "LR | CoDi | without distilling the PF-ODE | without noise consistency | "
                                     "without conditional guidance | random initialisation | one t per batch | "
                                     "d_x pseudo-Huber (all at {few} steps) | HR",
}


def run_pictures(run_dir: str) -> dict:
    """{"lr" / "bicubic" / "hr" / (sampler, steps): uint8 [rows, S, S, 3]} of a finished super-resolution
    run, read back from its evaluation grid (columns: LR, bicubic, samplers x steps, [teacher], HR)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    ev = cfg["eval"]
    cells = grids_lib.read_cells(os.path.join(run_dir, "grids", "sr_grid.png"), cfg["data"]["crop_size"])
    entries = [(s, int(n)) for s in ev["samplers"] for n in ev["steps"]]
    if len(cells) not in (len(entries) + 3, len(entries) + 4):
        raise ValueError(f"{run_dir}: its grid has {len(cells)} columns; its config.json's evaluation "
                         f"({len(entries)} entries) makes {len(entries) + 3} or {len(entries) + 4}")
    out = {"lr": cells[0], "bicubic": cells[1], "hr": cells[-1]}
    out.update({e: cells[2 + i] for i, e in enumerate(entries)})
    return out


def comparison_figure(rcfg, workdir: str, seed: int, name: str, path: str, cell: int = 64):
    """(the picture COMPARISONS[name] of seed `seed`'s finished runs, cells enlarged to `cell` px, and its
    caption); columns of unfinished runs are left out; (None, "") without any finished run among them."""
    with_bicubic, columns = COMPARISONS[name]
    few = _four(rcfg)
    pictures, chosen, most = {}, [], None
    for label, run, sampler, steps in columns:
        run_dir = os.path.join(workdir, f"seed{seed}", run)
        if not os.path.exists(os.path.join(run_dir, "metrics.json")):
            continue
        if run not in pictures:
            pictures[run] = run_pictures(run_dir)
        counts = sorted(e[1] for e in pictures[run] if isinstance(e, tuple) and e[0] == sampler)
        n = few if steps == "few" else (counts[-1] if counts else None)
        most = n if steps == "most" else most
        if (sampler, n) in pictures[run]:
            chosen.append((label.format(n=n), pictures[run][(sampler, n)]))
    if not chosen:
        return None, ""
    first = next(iter(pictures.values()))   # the inputs and HR: the same crops in every run
    inputs = [("LR", first["lr"])] + ([("bicubic", first["bicubic"])] if with_bicubic else [])
    path = grids_lib.save_grid(path, inputs + chosen + [("HR", first["hr"])], upscale_to=cell)
    return str(path), COMPARISON_CAPTIONS[name].format(few=few, most=most)


def write_report(rcfg, workdir: str, seeds, results_path: str, command: str) -> str:
    rows, walls, bicubic = collect(rcfg, workdir, seeds)
    out_dir = os.path.dirname(os.path.abspath(results_path))
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    plot = plot_steps(rcfg, rows, os.path.join(img_dir, "results_steps.png"))
    ablation_plot = plot_steps(rcfg, rows, os.path.join(img_dir, "results_steps_ablations.png"),
                               sections=("table3", "fig7", "dx"), reference=("codi",))
    figures = [comparison_figure(rcfg, workdir, seeds[0], name, os.path.join(img_dir, name)) for name in COMPARISONS]
    grids = []
    for name in ("finetune", "codi"):
        src = os.path.join(workdir, f"seed{seeds[0]}", name, "grids", "sr_grid.png")
        if os.path.exists(src):
            dst = os.path.join(img_dir, f"results_grid_{name}.png")
            shutil.copyfile(src, dst)
            grids.append((name, dst))
    rel = lambda p: os.path.relpath(p, out_dir)
    teacher = {"dir": os.path.join(workdir, "pretrained"), "trained_here": True}
    if os.path.exists(os.path.join(workdir, "teacher.json")):
        with open(os.path.join(workdir, "teacher.json")) as f:
            teacher = json.load(f)
    teacher_wall = None
    if teacher["trained_here"] and os.path.exists(_wall_file(teacher["dir"])):
        teacher_wall = _read_times(_wall_file(teacher["dir"]))[0]
    teacher_note = (f"Shared teacher: pretrained by this command in {teacher_wall} s." if teacher["trained_here"] else
                    f"Shared teacher: loaded from `{teacher['dir']}` (`--teacher_checkpoint`: a complete teacher "
                    "stage of the same recipe made earlier; its time is not in the total).")
    common = "".join(f", `{k}={v!r}`" for k, v in teacher.get("common", ()))
    common = f" (every run{common})" if common else ""
    notes = os.path.join(out_dir, "results-notes.md")   # hand-written next to the report (docs/)
    expected = len(rcfg.runs) * len(seeds)
    finished = sum(len(v) for v in walls.values())
    missing = [f"{r.name} (seed {s}" + (f", failed: `seed{s}/{r.name}/{ERROR_FILE}`)"
                                      if os.path.exists(os.path.join(workdir, f"seed{s}", r.name, ERROR_FILE)) else ")")
               for s in seeds for r in rcfg.runs
               if not os.path.exists(os.path.join(workdir, f"seed{s}", r.name, "metrics.json"))]
    md = [
        "# Results: the paper's super-resolution comparisons at tiny scale",
        "",
        f"Written by `{command}` on {datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPUs), "
        f"from {finished} of {expected} runs ({len(rcfg.runs)} runs x seeds {list(seeds)}). "
        f"Each run is `{rcfg.base}` plus its overrides in `configs/repro.py`{common}, trained from one shared "
        "pretrained teacher; held-out crops and sampler noise are the same for every run. Values are the mean "
        "± sample standard deviation over training seeds (one value where one seed finished). "
        "SWD: sliced Wasserstein distance between Laplacian-pyramid patches of samples and HR (a weight-free "
        "distribution distance that punishes blur); HF ratio: high-frequency energy of samples over HR's "
        "(1 is right, < 1 blurry). FID and LPIPS (docs/metrics.md) need weight files that cannot be downloaded "
        "on this machine, and on 32 px crops they would not mean much.",
        "",
        *([f"**Partial**: {len(missing)} runs have not finished: {', '.join(missing)}. Running the same "
           "command again resumes them.", ""] if missing else []),
        *([f"Why some of these differ from the paper, and what was measured to find out: "
           f"[results-notes.md]({rel(notes)}).", ""] if os.path.exists(notes) else []),
        "## Table 2: super-resolution",
        "",
        table(rcfg, rows, "table2", bicubic),
        "",
        "## Is the paper's ordering reproduced?",
        "",
        "Means over the seeds both runs finished; with two or more, on how many of them CoDi is better "
        "(seed by seed, the two runs sample the same crops with the same noise).",
        "",
        *ordering_checks(rcfg, rows),
        "",
        "The ablations and variants at the same step count, the same way:",
        "",
        *ablation_checks(rcfg, rows),
        "",
        "## Table 3: the distillation process (CoDi ablations)",
        "",
        table_with_reference(rcfg, rows),
        "",
        "## Fig. 7: pretraining and the sampling of t; d_x alternatives",
        "",
        table(rcfg, rows, "fig7"),
        "",
        "d_x alternatives (eq 15):",
        "",
        table(rcfg, rows, "dx"),
        "",
        "## Quality against sampling steps",
        "",
        *([f"![metrics against steps]({rel(plot)})", ""] if plot else ["(no run with two step counts yet)", ""]),
        *(["The ablations against CoDi:", "", f"![ablations against steps]({rel(ablation_plot)})", ""]
          if ablation_plot else []),
        "",
    ]
    for path, caption in figures:
        if path:
            md += [f"Held-out crops, seed {seeds[0]}, the runs side by side: {caption}.", "",
                   f"![{os.path.basename(path)}]({rel(path)})", ""]
    for name, path in grids:
        md += [f"Held-out crops, seed {seeds[0]}, `{name}` run (LR | bicubic | samples | HR):", "",
               f"![{name} grid]({rel(path)})", ""]
    md += ["## Wall times", "",
           teacher_note + " Per run (training + evaluation, summed over resumptions), mean over seeds. CPU s "
           "is the process's CPU time (both cores: up to twice the wall time); unlike wall time it leaves out "
           "time the run was paused or the machine spent on other jobs. '-': the run finished before CPU time "
           "was recorded, and its wall time includes any pause.", "",
           "| run | wall s | CPU s | seeds |", "|---|---|---|---|"]
    for run in rcfg.runs:
        if run.name in walls:
            wall, cpu = wall_summary(walls[run.name])
            md.append(f"| {run.name} | {wall:.0f} | {'-' if cpu is None else f'{cpu:.0f}'} | {len(walls[run.name])} |")
    clean = sum(w for v in walls.values() for w, _, ok in v if ok) + (teacher_wall or 0.0)
    unclean = [w for v in walls.values() for w, _, ok in v if not ok]
    total = f"Total: {(clean + sum(unclean)) / 3600:.2f} h of wall time for the finished runs"
    if unclean:
        total += (f" ({sum(unclean) / 3600:.2f} h of it in {len(unclean)} runs not timed in one go: timed before "
                  "CPU time was recorded (pauses included) or interrupted and resumed (the steps since the last "
                  "checkpoint and the compiles done twice); those runs' rows show the mean of their seeds that "
                  "were timed cleanly, where there are any)")
    md += ["", total + ".", ""]
    os.makedirs(out_dir, exist_ok=True)
    with open(results_path, "w") as f:
        f.write("\n".join(md))
    return results_path


def table_with_reference(rcfg, rows):
    """Table 3 with CoDi's own rows (at the few-step counts) on top, for reference."""
    ref = {k: v for k, v in rows.items() if k[0] == "codi"}
    text = table(rcfg, ref, "table2").splitlines()
    codi_rows = [ln for ln in text[2:] if ln.startswith("| CoDi |")]
    ablation = table(rcfg, rows, "table3")
    if not ablation.startswith("|"):   # no ablation finished: CoDi's rows under the header, then the note
        return "\n".join(text[:2] + codi_rows + ["", ablation]) if codi_rows else ablation
    lines = ablation.splitlines()
    return "\n".join(lines[:2] + codi_rows + lines[2:])


def wall_summary(times):
    """(wall s, CPU s or None) of one run over seeds, from (wall, CPU or None, clean) per seed: the mean
    wall time of the cleanly timed seeds (in one go, CPU time recorded), else of all; CPU s only when
    every seed has it."""
    clean = [w for w, _, ok in times if ok]
    wall = float(np.mean(clean if clean else [w for w, _, _ in times]))
    cpus = [c for _, c, _ in times if c is not None]
    return wall, (float(np.mean(cpus)) if len(cpus) == len(times) else None)


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
        teacher=flags.DEFINE_string("teacher_checkpoint", "",
                                    "A workdir with a complete teacher/ stage to share (default: pretrain one in "
                                    "WORKDIR/pretrained)."),
    )


_F = {}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
    del argv
    # `kill` (SIGTERM) stops like Ctrl-C: the running run records the time it spent before exiting.
    signal.signal(signal.SIGTERM, _interrupt)
    if not _F['workdir'].value:
        raise app.UsageError("--workdir is required")
    rcfg = _F['config'].value
    # Every seed compiles the same programs again: a persistent cache makes that a lookup.
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(_F['workdir'].value, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    seeds = [int(s) for s in _F['seeds'].value] if _F['seeds'].value else list(rcfg.seeds)
    results = _F['results'].value or os.path.join(_F['workdir'].value, "results.md")
    failed = None
    if not _F['report_only'].value:
        try:
            run_all(rcfg, _F['workdir'].value, seeds, _F['runs'].value, _F['teacher'].value)
        except RunsFailed as e:   # the report of what did finish is still written
            failed = e
    command = "python -m codi_jax.reproduce " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--report_only"))
    path = write_report(rcfg, _F['workdir'].value, seeds, results, command)
    print(f"reproduce: report {path}")
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _F.update(_define_flags())
    app.run(main)
