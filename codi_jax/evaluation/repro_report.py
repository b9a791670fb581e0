"""The reproduction's report (`python -m codi_jax.reproduce`): reads the finished runs' folders
(metrics.json, wall.json, config.json, their evaluation grids) and writes the tables with the spread over
seeds, the paper's ordering checked seed by seed, plots against steps, the runs side by side and the wall
times, as markdown with its pictures. Nothing here trains or samples: `--report_only` runs only this.
"""

from __future__ import annotations

import datetime
import os
import platform

import numpy as np

from codi_jax import storage
from codi_jax.evaluation import grids as grids_lib
from codi_jax.evaluation import plots

METRICS = (
    ("psnr", "PSNR", "higher"),
    ("ssim", "SSIM", "higher"),
    ("swd_mean", "SWD", "lower"),
    ("hf_ratio", "HF ratio", "1 = HR"),
)


ERROR_FILE = "error.txt"  # a failed run's traceback, in its run dir (removed when it is tried again)


def wall_file(run_dir):
    return storage.join(run_dir, "wall.json")


def read_times(path):
    """(wall s, CPU s or None, clean) of a wall.json; clean: timed in one go with its CPU time."""
    t = storage.read_json(path)
    return t["wall_s"], t.get("cpu_s"), t.get("cpu_s") is not None and not t.get("interrupted")


def collect(rcfg, workdir: str, seeds):
    """{(run name, result key): {metric: [value per finished seed]}}, per-run wall times, the bicubic
    row, and {teacher fingerprint: ['run (seed S)' that started from it]} (runs that recorded one)."""
    rows, walls, bicubic, bicubic_seeds, teachers = {}, {}, {}, set(), {}
    for run in rcfg.runs:
        for seed in seeds:
            run_dir = storage.join(workdir, f"seed{seed}", run.name)
            path = storage.join(run_dir, "metrics.json")
            if not storage.exists(path):
                continue
            report = storage.read_json(path)
            if report.get("teacher_fingerprint") is not None:
                teachers.setdefault(report["teacher_fingerprint"], []).append(f"{run.name} (seed {seed})")
            for key, vals in report["metrics"].items():
                if key == "bicubic" and seed in bicubic_seeds:
                    continue  # the same crops in every run: one bicubic row per seed
                if key == "bicubic":
                    bicubic_seeds.add(seed)
                target = bicubic if key == "bicubic" else rows.setdefault((run.name, key), {})
                for m, _, _ in METRICS:
                    target.setdefault(m, []).append(vals[m])
                target.setdefault("seed", []).append(seed)
            if storage.exists(wall_file(run_dir)):
                walls.setdefault(run.name, []).append(read_times(wall_file(run_dir)))
    return rows, walls, bicubic, teachers


def teacher_line(teachers: dict) -> str:
    """collect()'s {teacher fingerprint: [runs that started from it]} as one line for the report ('' where
    no run recorded a fingerprint)."""
    if len(teachers) == 1:
        return (
            f"Every finished run started from the same teacher (fingerprint {next(iter(teachers))}: the sum "
            "of its squared weights)."
        )
    if teachers:
        parts = "; ".join(f"{fp}: {', '.join(names)}" for fp, names in teachers.items())
        return (
            f"**The runs started from {len(teachers)} different teachers** (fingerprints, the sum of each "
            f"teacher's squared weights: {parts}); the differences between them include the teachers'."
        )
    return ""


def parse_key(key: str):
    """'finetune_dpmpp_2m_4step' -> ('dpmpp_2m', 4); 'codi_4step' -> ('deterministic', 4)."""
    body, steps = key.rsplit("_", 1)
    n = int(steps[: -len("step")])
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
        lines.append(
            "| bicubic upsampling | - | "
            + " | ".join(_fmt(bicubic[m], m) for m, _, _ in METRICS)
            + f" | {len(bicubic['psnr'])} |"
        )
    for run in rcfg.runs:
        if run.section != section:
            continue
        entries = [(k, v) for (name, k), v in rows.items() if name == run.name]
        entries.sort(key=lambda kv: (parse_key(kv[0])[0] != "deterministic", parse_key(kv[0])[0], -parse_key(kv[0])[1]))
        for key, vals in entries:
            label, n = _row_label(run, key)
            if steps_filter is not None and n not in steps_filter:
                continue
            lines.append(
                f"| {label} | {n} | "
                + " | ".join(_fmt(vals[m], m) for m, _, _ in METRICS)
                + f" | {len(vals['psnr'])} |"
            )
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
    return _comparisons(
        rows,
        four,
        [
            ("finetuned, DDIM 50 steps (paper: CoDi 4 steps about equal)", "finetune", "finetune_50step"),
            (f"finetuned, DDIM {four} steps (paper: CoDi ahead)", "finetune", f"finetune_{four}step"),
            (f"finetuned + DPM-Solver++ {four} steps", "finetune", f"finetune_dpmpp_2m_{four}step"),
            (f"CM-II {four} steps (paper: CoDi ahead)", "cm", f"codi_{four}step"),
            (f"CM-II (frozen) {four} steps (paper: CoDi ahead)", "cm_frozen", f"codi_{four}step"),
            (f"GD-II {four} steps (paper: CoDi ahead)", "gd", f"gd_{four}step"),
        ],
    )


def ablation_checks(rcfg, rows):
    """Table 3 / Fig. 7 / d_x: CoDi at 4 steps against each variant at 4 steps."""
    four = _four(rcfg)
    expected = {
        "no_pf_ode": "paper: behind CoDi",
        "no_noise_consistency": "paper: behind CoDi",
        "no_guidance": "paper: behind CoDi",
        "random_init": "paper: far behind CoDi",
        "t_per_batch": "paper: ahead of one t per sample",
    }

    def text(r):  # Table 3's "- X" rows read "without X" here
        label = "without " + r.label[2:] if r.label.startswith("- ") else r.label
        return f"{label} ({expected[r.name]})" if r.name in expected else label

    return _comparisons(
        rows, four, [(text(r), r.name, f"codi_{four}step") for r in rcfg.runs if r.section in ("table3", "fig7", "dx")]
    )


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
    "results_compare.png": (
        True,
        [
            ("FT {n}", "finetune", "deterministic", "few"),
            ("FT {n}", "finetune", "deterministic", "most"),
            ("FT DPM {n}", "finetune", "dpmpp_2m", "few"),
            ("GD-II", "gd", "deterministic", "few"),
            ("CM-II", "cm", "deterministic", "few"),
            ("CM-II fr.", "cm_frozen", "deterministic", "few"),
            ("PE-CoDi", "pe_codi", "deterministic", "few"),
            ("CoDi", "codi", "deterministic", "few"),
        ],
    ),
    "results_compare_ablations.png": (
        False,
        [
            ("CoDi", "codi", "deterministic", "few"),
            ("-PF-ODE", "no_pf_ode", "deterministic", "few"),
            ("-noise c.", "no_noise_consistency", "deterministic", "few"),
            ("-guid.", "no_guidance", "deterministic", "few"),
            ("rand. init", "random_init", "deterministic", "few"),
            ("t/batch", "t_per_batch", "deterministic", "few"),
            ("Huber", "dx_huber", "deterministic", "few"),
        ],
    ),
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
    cfg = storage.read_json(storage.join(run_dir, "config.json"))
    ev = cfg["eval"]
    cells = grids_lib.read_cells(storage.join(run_dir, "grids", "sr_grid.png"), cfg["data"]["crop_size"])
    entries = [(s, int(n)) for s in ev["samplers"] for n in ev["steps"]]
    if len(cells) not in (len(entries) + 3, len(entries) + 4):
        raise ValueError(
            f"{run_dir}: its grid has {len(cells)} columns; its config.json's evaluation "
            f"({len(entries)} entries) makes {len(entries) + 3} or {len(entries) + 4}"
        )
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
        run_dir = storage.join(workdir, f"seed{seed}", run)
        if not storage.exists(storage.join(run_dir, "metrics.json")):
            continue
        if run not in pictures:
            try:
                pictures[run] = run_pictures(run_dir)
            except (OSError, ValueError) as e:  # no config.json or grid (an older run's folder): left out
                print(f"report: {name} leaves out {run_dir}: {e}")
                pictures[run] = {}
        counts = sorted(e[1] for e in pictures[run] if isinstance(e, tuple) and e[0] == sampler)
        n = few if steps == "few" else (counts[-1] if counts else None)
        most = n if steps == "most" else most
        if (sampler, n) in pictures[run]:
            chosen.append((label.format(n=n), pictures[run][(sampler, n)]))
    if not chosen:
        return None, ""
    first = next(p for p in pictures.values() if p)  # the inputs and HR: the same crops in every run
    inputs = [("LR", first["lr"])] + ([("bicubic", first["bicubic"])] if with_bicubic else [])
    path = grids_lib.save_grid(path, inputs + chosen + [("HR", first["hr"])], upscale_to=cell)
    return str(path), COMPARISON_CAPTIONS[name].format(few=few, most=most)


def write_report(rcfg, workdir: str, seeds, results_path: str, command: str) -> str:
    """The report of the finished runs (results.md): header, Table 2 and the ordering checks, Table 3,
    Fig. 7 and d_x, the plots and pictures, wall times."""
    rows, walls, bicubic, teachers = collect(rcfg, workdir, seeds)
    out_dir = storage.dirname(storage.absolute(results_path))
    # the report's links to its pictures and notes, all under out_dir
    rel = lambda p: p.removeprefix(out_dir + "/") if storage.is_remote(out_dir) else os.path.relpath(p, out_dir)
    teacher = _teacher_of(workdir)
    md = [
        *_header(rcfg, workdir, seeds, command, walls, teachers, teacher, out_dir, rel),
        *_tables(rcfg, rows, bicubic),
        *_pictures(rcfg, rows, workdir, seeds, storage.join(out_dir, "images"), rel),
        *_wall_times(rcfg, walls, teacher),
    ]
    storage.write_text(results_path, "\n".join(md))
    return results_path


def _teacher_of(workdir: str) -> dict:
    """teacher.json (where the shared teacher is, whether this command trained it, the common
    overrides) with the teacher's wall time when it was trained here."""
    teacher = {"dir": storage.join(workdir, "pretrained"), "trained_here": True}
    if storage.exists(storage.join(workdir, "teacher.json")):
        teacher = storage.read_json(storage.join(workdir, "teacher.json"))
    teacher["wall_s"] = None
    if teacher["trained_here"] and storage.exists(wall_file(teacher["dir"])):
        teacher["wall_s"] = read_times(wall_file(teacher["dir"]))[0]
    return teacher


def _header(rcfg, workdir, seeds, command, walls, teachers, teacher, out_dir, rel) -> list[str]:
    common = "".join(f", `{k}={v!r}`" for k, v in teacher.get("common", ()))
    common = f" (every run{common})" if common else ""
    notes = storage.join(out_dir, "results-notes.md")  # hand-written next to the report (docs/)
    expected = len(rcfg.runs) * len(seeds)
    finished = sum(len(v) for v in walls.values())
    missing = [
        f"{r.name} (seed {s}"
        + (
            f", failed: `seed{s}/{r.name}/{ERROR_FILE}`)"
            if storage.exists(storage.join(workdir, f"seed{s}", r.name, ERROR_FILE))
            else ")"
        )
        for s in seeds
        for r in rcfg.runs
        if not storage.exists(storage.join(workdir, f"seed{s}", r.name, "metrics.json"))
    ]
    return [
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
        *(
            [
                f"**Partial**: {len(missing)} runs have not finished: {', '.join(missing)}. Running the same "
                "command again resumes them.",
                "",
            ]
            if missing
            else []
        ),
        *([line, ""] if (line := teacher_line(teachers)) else []),
        *(
            [
                f"Why some of these differ from the paper, and what was measured to find out: "
                f"[results-notes.md]({rel(notes)}).",
                "",
            ]
            if storage.exists(notes)
            else []
        ),
    ]


def _tables(rcfg, rows, bicubic) -> list[str]:
    return [
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
    ]


def _pictures(rcfg, rows, workdir, seeds, img_dir, rel) -> list[str]:
    """The plots against steps, the runs side by side and two runs' grids, written into img_dir."""
    storage.makedirs(img_dir)
    plot = plot_steps(rcfg, rows, storage.join(img_dir, "results_steps.png"))
    ablation_plot = plot_steps(
        rcfg,
        rows,
        storage.join(img_dir, "results_steps_ablations.png"),
        sections=("table3", "fig7", "dx"),
        reference=("codi",),
    )
    md = [
        "## Quality against sampling steps",
        "",
        *([f"![metrics against steps]({rel(plot)})", ""] if plot else ["(no run with two step counts yet)", ""]),
        *(
            ["The ablations against CoDi:", "", f"![ablations against steps]({rel(ablation_plot)})", ""]
            if ablation_plot
            else []
        ),
        "",
    ]
    for name in COMPARISONS:
        path, caption = comparison_figure(rcfg, workdir, seeds[0], name, storage.join(img_dir, name))
        if path:
            md += [
                f"Held-out crops, seed {seeds[0]}, the runs side by side: {caption}.",
                "",
                f"![{storage.basename(path)}]({rel(path)})",
                "",
            ]
    for name in ("finetune", "codi"):
        src = storage.join(workdir, f"seed{seeds[0]}", name, "grids", "sr_grid.png")
        if storage.exists(src):
            dst = storage.join(img_dir, f"results_grid_{name}.png")
            storage.copy(src, dst)
            md += [
                f"Held-out crops, seed {seeds[0]}, `{name}` run (LR | bicubic | samples | HR):",
                "",
                f"![{name} grid]({rel(dst)})",
                "",
            ]
    return md


def _wall_times(rcfg, walls, teacher) -> list[str]:
    teacher_note = (
        f"Shared teacher: pretrained by this command in {teacher['wall_s']} s."
        if teacher["trained_here"]
        else f"Shared teacher: loaded from `{teacher['dir']}` (`--teacher_checkpoint`: a complete teacher "
        "stage of the same recipe made earlier; its time is not in the total)."
    )
    md = [
        "## Wall times",
        "",
        teacher_note + " Per run (training + evaluation, summed over resumptions), mean over seeds. CPU s "
        "is the process's CPU time (both cores: up to twice the wall time); unlike wall time it leaves out "
        "time the run was paused or the machine spent on other jobs. '-': the run finished before CPU time "
        "was recorded, and its wall time includes any pause.",
        "",
        "| run | wall s | CPU s | seeds |",
        "|---|---|---|---|",
    ]
    for run in rcfg.runs:
        if run.name in walls:
            wall, cpu = wall_summary(walls[run.name])
            n, ok = len(walls[run.name]), sum(c for _, _, c in walls[run.name])
            seeds_note = f"{n}" if ok == n else f"{n} ({ok} timed in one go)"
            md.append(f"| {run.name} | {wall:.0f} | {'-' if cpu is None else f'{cpu:.0f}'} | {seeds_note} |")
    clean = sum(w for v in walls.values() for w, _, ok in v if ok) + (teacher["wall_s"] or 0.0)
    unclean = [w for v in walls.values() for w, _, ok in v if not ok]
    total = f"Total: {(clean + sum(unclean)) / 3600:.2f} h of wall time for the finished runs"
    if unclean:
        total += (
            f" ({sum(unclean) / 3600:.2f} h of it in {len(unclean)} runs not timed in one go: timed before "
            "CPU time was recorded (pauses included) or interrupted and resumed (the steps since the last "
            "checkpoint and the compiles done twice); those runs' rows show the mean of their seeds that "
            "were timed cleanly, where there are any)"
        )
    return md + ["", total + ".", ""]


def table_with_reference(rcfg, rows):
    """Table 3 with CoDi's own rows (at the few-step counts) on top, for reference."""
    ref = {k: v for k, v in rows.items() if k[0] == "codi"}
    text = table(rcfg, ref, "table2").splitlines()
    codi_rows = [ln for ln in text[2:] if ln.startswith("| CoDi |")]
    ablation = table(rcfg, rows, "table3")
    if not ablation.startswith("|"):  # no ablation finished: CoDi's rows under the header, then the note
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
