"""The planning table of docs/scaling.md: one `codi_jax.benchmarks.plan` compile per cell, resumable.

  python -m codi_jax.benchmarks.plan_table --run      # compile the cells not yet in docs/plan/
  python -m codi_jax.benchmarks.plan_table --render   # rewrite the table in docs/scaling.md

Each cell is compiled in its own process and written to `--dir` as one JSON file; a cell whose file
exists is skipped, so the run survives being stopped (an SD-size cell takes about 30-40 minutes on a
2-core machine) and can be continued by any later session. `--workers` runs cells side by side (XLA's
TPU compiler uses about one core per compile). `--only` picks cells by a substring of their name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags, logging

from codi_jax import hardware, logging_utils

_RUN = flags.DEFINE_bool("run", False, "Compile the cells that have no result yet.")
_RENDER = flags.DEFINE_bool("render", False, "Rewrite the table in --doc from the results in --dir.")
_DIR = flags.DEFINE_string("dir", "docs/plan", "One JSON file per cell.")
_DOC = flags.DEFINE_string("doc", "docs/scaling.md", "The page whose table --render rewrites.")
_WORKERS = flags.DEFINE_integer("workers", 1, "Cells compiled side by side.")
_ONLY = flags.DEFINE_string("only", "", "Only the cells whose name contains this.")

# (arch, resolution, mode, batch per chip, remat, topology, slices), in the order they are compiled:
# the most telling cells first. Every cell: configs/sr.py, method codi, bf16 compute, FSDP over every
# chip of a slice (mesh.ici=(1,-1,1)), data parallel across slices, cached latents, attention 'auto'
# (splash on TPU).
CELLS = [
    ("sd15", 512, "full", 2, "none", "v5e-8", 1),
    ("sd15", 512, "pe", 2, "none", "v5e-8", 1),
    ("sd15", 512, "full", 4, "full", "v5e-8", 1),
    ("sd15", 512, "full", 4, "none", "v4-8", 1),
    ("sd15", 512, "full", 4, "none", "v5p-8", 1),
    ("sd21", 768, "full", 1, "none", "v5e-8", 1),
    ("sd15", 512, "full", 2, "full", "v5e-8", 1),  # like for like with the first cell: what remat saves
    ("sd21", 768, "pe", 2, "full", "v4-8", 1),
    ("sd21-base", 512, "full", 2, "none", "v5e-8", 1),
    ("sd15", 512, "full", 2, "none", "v5e-16", 2),
    ("sd15", 512, "full", 1, "none", "v5e-8", 1),
    ("sd15", 512, "pe", 4, "none", "v5e-8", 1),
    ("sd21", 768, "full", 4, "full", "v5p-8", 1),
    ("sd15", 512, "pe", 1, "none", "v4-8", 1),
    ("sd21", 768, "full", 2, "none", "v4-8", 1),
    ("sd21", 768, "pe", 4, "none", "v5p-8", 1),
]
ATTENTION = "auto"


def cell_name(cell) -> str:
    arch, res, mode, batch, remat, topo, slices = cell
    name = f"{arch}_{res}_{mode}_b{batch}_remat-{remat}_{topo.replace(':', '-')}"
    return name + (f"_x{slices}" if slices > 1 else "") + ".json"


def cell_command(cell, out_dir: str) -> list[str]:
    arch, res, mode, batch, remat, topo, slices = cell
    return [
        sys.executable, "-m", "codi_jax.benchmarks.plan", "--config=configs/sr.py", f"--arch={arch}",
        f"--resolution={res}", f"--batch_per_device={batch}", f"--topology={topo}", f"--num_slices={slices}",
        f"--config.codi.mode={mode}", f"--config.model.unet.remat={remat}", "--config.mesh.ici=(1,-1,1)",
        f"--config.mesh.dcn=({slices},1,1)", f"--config.model.unet.attention={ATTENTION}", f"--out={os.path.join(out_dir, cell_name(cell))}",
    ]  # fmt: skip


def run_cells(cells, out_dir: str, workers: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    todo = [c for c in cells if not os.path.exists(os.path.join(out_dir, cell_name(c)))]
    logging.info("%d of %d cells to compile (%s)", len(todo), len(cells), out_dir)
    running, done, t0 = [], 0, time.perf_counter()
    while todo or running:
        while todo and len(running) < workers:
            cell = todo.pop(0)
            log = open(os.path.join(out_dir, cell_name(cell).replace(".json", ".log")), "w")
            proc = subprocess.Popen(cell_command(cell, out_dir), stdout=log, stderr=log)
            running.append({"cell": cell, "proc": proc, "log": log, "peak": 0})
            logging.info("compiling %s", cell_name(cell))
        time.sleep(5)
        for item in list(running):
            proc = item["proc"]
            if proc.poll() is None:  # sampled every 5 s: the compile's memory moves slowly
                item["peak"] = max(item["peak"], hardware.process_memory_bytes(proc.pid, swapped=True))
                continue
            running.remove(item)
            item["log"].close()
            done += 1
            path = os.path.join(out_dir, cell_name(item["cell"]))
            if proc.returncode == 0:
                _add_host_memory(path, item["peak"])
            per = (time.perf_counter() - t0) / done
            eta = per * (len(todo) + len(running)) / max(workers, 1)
            status = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode}, see its .log)"
            logging.info("%s %s (host memory peak %.1f GiB); %d left, ETA %s", cell_name(item["cell"]), status,
                         item["peak"] / 2**30, len(todo) + len(running), logging_utils.format_duration(eta))  # fmt: skip


def _add_host_memory(path: str, peak: int) -> None:
    """Records in a cell's JSON what its compile needed of this host: the peak of resident + swapped memory."""
    with open(path) as f:
        result = json.load(f)
    result["host_memory_peak_bytes"] = peak  # sampled every 5 s by the runner (resident + swap)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")


def _gib(x):
    return "" if x is None else f"{x / 2**30:.2f}"


def table(results: list[dict]) -> str:
    """The markdown table of the results (one row per cell)."""
    head = (
        "| model | px | mode | batch/chip | remat | slice(s) | fits | GiB/chip: step (args + temps) of HBM | "
        "args: params / EMA / Adam / frozen (arith.) | TFLOP/chip/step | step >= (ms) | compile: min (host GiB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in results:
        b, a = r.get("bytes", {}), r["arithmetic_bytes"]
        slices = f"{r['num_slices']} x {r['topology']}" if r["num_slices"] > 1 else r["topology"]
        fits = {True: "yes", False: "**no**", None: "?"}[r["fits"]]
        mem = (
            f"{_gib(r['step_bytes'])} ({_gib(b.get('argument_size_in_bytes'))} + {_gib(b.get('temp_size_in_bytes'))}) "
            f"of {_gib(r['memory_bytes'])}"
            if r["step_bytes"]
            else f"compiler: does not fit in {_gib(r['memory_bytes'])}"
        )
        arith = " / ".join(_gib(a[k]) for k in ("params", "ema_params", "opt_state", "frozen"))
        flops = "" if not r["flops_per_device"] else f"{r['flops_per_device'] / 1e12:.2f}"
        bound = "" if not r.get("min_step_s") else f"{r['min_step_s'] * 1e3:.0f}"
        compile_min = "" if not r["compile_s"] else f"{r['compile_s'] / 60:.0f}"
        if r.get("host_memory_peak_bytes"):
            compile_min += f" ({r['host_memory_peak_bytes'] / 2**30:.1f})"
        rows.append(
            f"| {r['arch']} | {r['resolution']} | {r['mode']} | {r['batch_per_device']} | {r['remat']} | {slices} | "
            f"{fits} | {mem} | {arith} | {flops} | {bound} | {compile_min} |"
        )
    return head + "\n".join(rows) + "\n"


BEGIN, END = "<!-- plan-table:begin -->", "<!-- plan-table:end -->"


def render(out_dir: str, doc: str, cells=CELLS) -> str:
    results = []
    for c in cells:
        path = os.path.join(out_dir, cell_name(c))
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    text = open(doc).read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} markers for the table")
    missing = len(cells) - len(results)
    note = f"\n{missing} more cells are listed in codi_jax/benchmarks/plan_table.py and not compiled yet.\n"
    block = f"{BEGIN}\n{table(results)}{note if missing else ''}{END}"
    text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    with open(doc, "w") as f:
        f.write(text)
    return block


def main(argv):
    del argv
    cells = [c for c in CELLS if _ONLY.value in cell_name(c)]
    if not (_RUN.value or _RENDER.value):
        raise ValueError("give --run, --render or both")
    if _RUN.value:
        run_cells(cells, _DIR.value, _WORKERS.value)
    if _RENDER.value:
        print(render(_DIR.value, _DOC.value))


if __name__ == "__main__":
    logging_utils.run_cli(main)
