"""Stable Diffusion 1.5 size on one GPU, in one short run: the CoDi train step at several batch sizes,
few-step against 50-step sampling latency, diffusers' PyTorch on the same weights, and what the step's
time goes to.

  python -m codi_jax.benchmarks.sd_gpu --config=configs/sr.py --batch_sizes=1,4,16 --out=DIR
  python -m codi_jax.benchmarks.sd_gpu --config=configs/sr.py:smoke --batch_sizes=1,2 --out=DIR   # CPU check

Random weights of the config's shapes (codi_jax/benchmarks/step.py's `_Setup`: U-Net + eq 12 adapter,
64x64x4 latents, 512 px conditions, 77-token context for configs/sr.py), the config's compute dtype
(bf16) and attention ('auto': cuDNN flash attention where it applies on a GPU). Parts, in this order,
each skipped (and said so in the report) once `--budget_s` is spent, the report rewritten after each:

1. Train step (full CoDi, eq 14/15, with the job's optimizer, EMA, shardings and donation) at each of
   `--batch_sizes`, each compiled and timed in turn (median of `--steps` after `--warmup`; a compile
   starts only with 150 s of the budget left). Per batch: compile seconds, step ms, images/s, XLA's
   memory analysis of the executable and the device's peak so far, then, once all have run, MFU. The
   FLOPs are the step's arithmetic as written, XLA's cost analysis of the step lowered with XLA
   attention and before optimisation: the compiled GPU executable's own count leaves out cuDNN's
   convolutions and attention (custom calls), so it is far too low to give an MFU (docs/benchmarks.md).
2. Sampling latency at `--sample_batch`: the few-step sampler (CoDi's boundary-wrapped denoiser) at
   `--sample_steps` and DDIM at `--ddim_steps`, as benchmarks.step measures it (no VAE decode).
3. Against diffusers' PyTorch classes on the same device: the config's model as diffusers expresses it
   (residual fusion: `ControlNetModel` + `UNet2DConditionModel`, step.torch_comparison_config), weights
   exported by `codi_jax.pretrained.export`, both in the config's dtype, PyTorch with its default
   scaled-dot-product attention; the same z_T and update loop at `--torch_steps`, outputs compared.
4. Profile, last (a profiler that crashes the process loses nothing else): `--profile_steps` steps of
   the largest batch that ran, traced by jax.profiler; the device's kernel time and XLA's ops summed by
   name and by kind (convolution, matmul, attention, fused elementwise, copies).
"""

from __future__ import annotations

import collections
import copy
import functools
import glob
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from codi_jax import hardware, logging_utils, sampling, sharding, train
from codi_jax.benchmarks import step as step_bench
from codi_jax.methods import codi

KINDS = (  # kernel name substrings -> kind, first match wins (cuDNN, cuBLAS/CUTLASS and XLA's own names)
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("convolution", ("conv", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "matmul", "cublas", "cutlass", "sm90_xmma", "dot")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset")),
    ("reduction", ("reduce", "reduction")),
    ("fused elementwise", ("fusion", "loop_", "input_", "triton")),
)


class Deadline:
    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# ----------------------------------------------------------------------------------------------
# 1. Train steps at several batch sizes


def model_flops(config, state, batch) -> float:
    """FLOPs of one whole CoDi step as written: the step lowered with XLA attention (no custom calls),
    XLA's cost analysis of the module before optimisation."""
    cfg = copy.deepcopy(config)
    cfg.model.unet.attention = "xla"
    setup = step_bench._Setup(cfg)
    loss_fn = functools.partial(
        codi.codi_loss, denoiser=setup.denoisers.consistency, teacher=setup.denoisers.diffusion, cfg=cfg.codi
    )
    tcfg = cfg.codi.train
    tx, lr = train.make_optimizer(tcfg)
    step = jax.jit(train.make_train_step(loss_fn, tx, lr, tcfg.ema_decay, tcfg.ema_warmup, tcfg.grad_accum_steps))
    plain = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    cost = step.lower(plain(state), plain(batch)).cost_analysis()
    if cost is None:  # the GPU backend of jax 0.11.2 has no cost analysis of a lowering: the CPU's counts the same
        with jax.default_device(jax.devices("cpu")[0]):
            cost = step.lower(plain(state), plain(batch)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def bench_train(config, batch_sizes, steps: int, warmup: int, deadline, log, save=lambda result: None):
    """Returns (figures, (executable, state, batch, batch size) of the largest batch that ran, or None)."""
    setup = step_bench._Setup(config)
    c, tcfg = config.codi, config.codi.train
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config.mesh)
    names = setup.logical_names()
    logical = {"unet": names["unet"], "adapter": names["adapter"], "teacher_unet": names["unet"]}
    tx, lr = train.make_optimizer(tcfg)
    init_fn = lambda rng: codi.split_params(setup.init_params(rng), c.mode, c.zs_predictor)
    state, state_sharding = train.initial_state(init_fn, tx, config.seed, mesh, rules, logical, name="bench")
    log(f"state ready ({step_bench.describe_params(state['params'])}, mode {c.mode})")
    loss_fn = functools.partial(
        codi.codi_loss, denoiser=setup.denoisers.consistency, teacher=setup.denoisers.diffusion, cfg=c
    )
    step_jit = jax.jit(
        train.make_train_step(loss_fn, tx, lr, tcfg.ema_decay, tcfg.ema_warmup, tcfg.grad_accum_steps),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh, rules)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    batches = {b: sharding.put_batch(setup.inputs(b, seed=0), mesh, rules) for b in batch_sizes}
    device = jax.devices()[0]
    peak = hardware.peak_flops(device)
    rows, largest, kept = {}, None, None
    result = {
        "mode": c.mode,
        "attention": config.model.unet.attention,
        "remat": config.model.unet.remat,
        "dtype": config.model.dtype,
        "peak_flops": peak,
        "flops_note": "the step as written (XLA attention, before optimisation); MFU = flops / step time / peak",
        "rows": rows,
    }
    # One at a time: three SD-size compiles side by side on an H200 (2026-12-04) had none finished after
    # 475 s, against about 130 s for one alone (their autotuning shares the GPU's timers).
    for b in batch_sizes:
        row = rows[str(b)] = {"batch_size": b}
        if deadline.left() < 150:
            row["error"] = "skipped: --budget_s spent"
            continue
        t0 = time.perf_counter()
        try:
            with sharding.activation_rules(mesh, rules):
                exe = step_jit.lower(state, batches[b]).compile()
            row.update(compile_s=round(time.perf_counter() - t0, 1), compiled_memory=_memory(exe))
            save(result)
            state, times, loss = step_bench._time_steps(exe, state, batches[b], steps, warmup)
        except Exception as e:  # noqa: BLE001 - one batch size that does not fit must not end the run
            row["error"] = logging_utils.one_line_error(e)[:400]
            log(f"batch {b}: {row['error']}")
            save(result)
            continue
        step_s = statistics.median(times)
        row.update(
            step_ms=1e3 * step_s,
            step_ms_all=[1e3 * t for t in times],
            images_per_s=b / step_s,
            loss=loss,
            device_peak_bytes_so_far=(device.memory_stats() or {}).get("peak_bytes_in_use"),
        )
        largest, kept = b, exe
        save(result)
        log(f"batch {b}: compile {row['compile_s']:.0f} s, step {row['step_ms']:.1f} ms")
    for b in batch_sizes:  # the FLOPs last: a lowering each, worth less than a measured step
        row = rows[str(b)]
        if "step_ms" not in row or deadline.left() < 20:
            continue
        try:
            row["flops_per_step"] = model_flops(config, state, batches[b])
        except Exception as e:  # noqa: BLE001 - a figure missing, not a run lost
            result["flops_error"] = logging_utils.one_line_error(e)[:300]
            break
        if peak:
            row["tflops_per_s"] = row["flops_per_step"] / (row["step_ms"] / 1e3) / 1e12
            row["mfu"] = row["tflops_per_s"] * 1e12 / peak
        save(result)
        log(f"batch {b}: {row['flops_per_step'] / 1e12:.2f} TFLOP per step, MFU {row.get('mfu')}")
    # what the profile part traces, last in the run: a profiler that crashes the process loses nothing else
    return result, None if largest is None else (kept, state, batches[largest], largest)


def _memory(exe) -> dict:
    try:
        mem = exe.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {k: int(getattr(mem, k)) for k in keys if hasattr(mem, k)}


# ----------------------------------------------------------------------------------------------
# 2. Where a step's time goes


def profile(kept, steps: int, out: str) -> dict:
    """Trace `steps` steps of a compiled train step and sum the device's time by name and by kind."""
    if kept is None:
        return {"skipped": "no train step ran"}
    exe, state, batch, batch_size = kept
    folder = tempfile.mkdtemp(prefix="sd_gpu_trace_")
    state, _ = exe(state, batch)  # outside the trace: nothing left from the timed steps' queue
    jax.block_until_ready(state)
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
            state, metrics = exe(state, batch)
        jax.block_until_ready((state, metrics))
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        return {"error": f"no perfetto trace written under {folder}"}
    summary = dict(summarize_trace(paths[0], steps), batch_size=batch_size)
    if out and os.path.getsize(paths[0]) < 15 * 2**20:
        shutil.copy(paths[0], os.path.join(out, "perfetto_trace.json.gz"))
    shutil.rmtree(folder, ignore_errors=True)
    return summary


def summarize_trace(path: str, steps: int, top: int = 15) -> dict:
    """Time per step from a perfetto trace, per line of the device: its streams' kernels ('Stream ...'
    threads), XLA's ops ('XLA Ops') and modules ('XLA Modules'), summed by name and by kind. Without a
    device in the trace (a CPU run): the host's XLA executor threads."""
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    device_pids = {p for p, name in procs.items() if name.startswith("/device:")}

    def line(e):
        thread = threads.get((e["pid"], e.get("tid")), "")
        if device_pids:
            if e["pid"] not in device_pids:
                return None
            return "kernels" if thread.startswith("Stream") else thread if thread.startswith("XLA") else None
        return "host_xla_threads" if thread.startswith("tf_XLA") else None

    lines = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X":
            name = line(e)
            if name:
                lines[name][e["name"]] += float(e.get("dur", 0.0))  # microseconds
    per_step = lambda us: round(us / steps / 1e3, 3)
    result = {"steps": steps, "devices": sorted(procs[p] for p in device_pids), "lines": {}}
    for name, by_name in lines.items():
        by_kind = collections.Counter()
        for event, us in by_name.items():
            by_kind[kernel_kind(event)] += us
        result["lines"][name] = {
            "ms_per_step": per_step(sum(by_name.values())),
            "by_kind_ms_per_step": {k: per_step(v) for k, v in by_kind.most_common()},
            "top_ms_per_step": [[event[:120], per_step(us)] for event, us in by_name.most_common(top)],
        }
    result["note"] = "summed durations per line (streams that overlap add up); names as the trace gives them"
    return result


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


# ----------------------------------------------------------------------------------------------
# 2. Sampling latency and 4. diffusers on the same device


def bench_sampling(config, sample_batch, sample_steps, ddim_steps, reps, log) -> dict:
    setup = step_bench._Setup(config)
    params = jax.device_put(setup.init_params(jax.random.PRNGKey(config.seed)))
    return step_bench.bench_sampling(setup, params, sample_batch, sample_steps, ddim_steps, reps, log)


def bench_torch(config, sample_batch: int, torch_steps, reps: int, log) -> dict:
    """Ours against diffusers' classes on this device, the config's dtype for both (see the module doc)."""
    import diffusers
    import torch

    from codi_jax.pretrained import export

    cfg = step_bench.torch_comparison_config(config)
    cfg.model.dtype = config.model.dtype
    setup = step_bench._Setup(cfg)
    params = setup.init_params(jax.random.PRNGKey(cfg.seed), jitter=0.02)  # ControlNet's zero convs too
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        written = export.export_diffusers(
            os.path.join(tmp, "out"), cfg.model.unet, params, cfg.model.adapter, sample_size=setup.side
        )
        load = lambda cls, path: cls.from_pretrained(path, torch_dtype=tdtype).to(dev).eval()
        unet = load(diffusers.UNet2DConditionModel, written["unet"])
        controlnet = load(diffusers.ControlNetModel, written["controlnet"])
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    params = jax.device_put(params)
    x = setup.inputs(sample_batch, seed=2)
    shape = (sample_batch, setup.side, setup.side, setup.channels)
    rng = jax.random.PRNGKey(0)
    z_T = np.asarray(jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32))  # sampling.sample's z_T
    to_pt = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, tdtype)
    z_pt, cond_pt, ctx_pt = (
        to_pt(z_T.transpose(0, 3, 1, 2)),
        to_pt(x["cond"].transpose(0, 3, 1, 2)),
        to_pt(x["context"]),
    )
    boundary = setup.denoisers.consistency.boundary is not None
    run_pt = step_bench._torch_sampler(torch, unet, controlnet, setup.prediction, boundary)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows = {}
    for n in torch_steps:
        fn = sampling.make_sampler(setup.denoisers.consistency, n, "deterministic")
        args = (params, rng, shape, x["cond"], x["context"])
        first, ours_t = step_bench._time_sampler(fn, args, reps)
        ours = np.asarray(fn(*args), np.float32)
        coefs = step_bench._step_coefficients(setup.denoisers.consistency, n)
        want = run_pt(z_pt, cond_pt, ctx_pt, coefs)  # warm-up
        sync()
        torch_t = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run_pt(z_pt, cond_pt, ctx_pt, coefs)
            sync()
            torch_t.append(time.perf_counter() - t0)
        theirs = want.float().cpu().numpy().transpose(0, 2, 3, 1)
        row = {
            "steps": n,
            "ours_ms": step_bench._median_ms(ours_t),
            "ours_first_call_s": first,
            "torch_ms": step_bench._median_ms(torch_t),
            "ours_ms_all": [1e3 * t for t in ours_t],
            "torch_ms_all": [1e3 * t for t in torch_t],
            "relative_l2_diff": float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)),
            "output_max_abs": float(np.max(np.abs(theirs))),
        }
        row["torch_over_ours"] = row["torch_ms"] / row["ours_ms"]
        rows[f"step{n}"] = row
        log(
            f"{n} steps: ours {row['ours_ms']:.1f} ms, diffusers {row['torch_ms']:.1f} ms, rel diff {row['relative_l2_diff']:.1e}"
        )
    return {
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "torch_device": dev,
        "dtype": cfg.model.dtype,
        "attention_processors": processors,
        "model": {"fusion": "residual", "adapter_input": "sample_and_cond"},
        "sample_batch": sample_batch,
        "reps": reps,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------


def define_flags() -> None:
    """The command line (defined when run as a program, not on import)."""
    config_flags.DEFINE_config_file("config", "configs/sr.py", "Config file (configs/sr.py: SD-1.5 size).")
    flags.DEFINE_list("batch_sizes", ["1", "4", "16"], "Global train batch sizes.")
    flags.DEFINE_integer("steps", 5, "Timed train steps per batch size.")
    flags.DEFINE_integer("warmup", 2, "Untimed train steps before them.")
    flags.DEFINE_integer("profile_steps", 3, "Traced steps of the largest batch (0: no profile).")
    flags.DEFINE_integer("sample_batch", 1, "Batch of the sampling runs.")
    flags.DEFINE_list("sample_steps", ["1", "4"], "Few-step sampler step counts.")
    flags.DEFINE_integer("ddim_steps", 50, "DDIM baseline steps.")
    flags.DEFINE_list("torch_steps", ["4", "50"], "Step counts of the diffusers comparison ('' = none).")
    flags.DEFINE_integer("reps", 5, "Timed repetitions of each sampler (after one warm-up call).")
    flags.DEFINE_integer("budget_s", 540, "Parts that would start after this many seconds are skipped.")
    flags.DEFINE_string("out", "", "Folder for report.json (and the profile's trace).")


def main(argv):
    del argv
    F = flags.FLAGS
    config = F.config
    if config.teacher.pretrained_path:
        config.teacher.pretrained_path = None  # random weights of the same shapes (step._Setup)
    out = F.out
    if out:
        os.makedirs(out, exist_ok=True)
    deadline = Deadline(F.budget_s)
    log = lambda msg: print(f"[{deadline.elapsed():6.1f} s] {msg}", flush=True)
    dev = jax.devices()[0]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device_kind": dev.device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "config": config.task + (f":{config.variant}" if config.variant else ""),
        "host_cpus": os.cpu_count(),
        "budget_s": F.budget_s,
    }

    def save():
        report["elapsed_s"] = round(deadline.elapsed(), 1)
        if out:
            with open(os.path.join(out, "report.json"), "w") as f:
                json.dump(report, f, indent=2)

    batch_sizes = [int(b) for b in F.batch_sizes]
    kept = None

    def train_part():
        nonlocal kept
        result, kept = bench_train(
            config,
            batch_sizes,
            F.steps,
            F.warmup,
            deadline,
            log,
            save=lambda r: (report.__setitem__("train", r), save()),
        )
        return result

    parts = [
        ("train", 60, train_part),
        ("sampling", 45, lambda: bench_sampling(
            config, F.sample_batch, [int(n) for n in F.sample_steps], F.ddim_steps, F.reps, log)),
        ("torch", 60, lambda: bench_torch(
            config, F.sample_batch, [int(n) for n in F.torch_steps if n], F.reps, log)),
        ("profile", 30, lambda: profile(kept, F.profile_steps, out) if F.profile_steps else {"skipped": "--profile_steps=0"}),
    ]  # fmt: skip
    for name, needs_s, part in parts:
        if deadline.left() < needs_s:
            report[name] = {"skipped": f"--budget_s={F.budget_s} spent ({deadline.elapsed():.0f} s elapsed)"}
            log(f"{name}: skipped, out of time")
            continue
        log(f"{name}:")
        try:
            report[name] = part()
        except Exception as e:  # noqa: BLE001 - the parts before and after still report
            report[name] = {"error": logging_utils.one_line_error(e)[:600]}
            log(f"{name} failed: {report[name]['error']}")
        save()
    save()
    print(json.dumps(summary(report)))


def summary(report: dict) -> dict:
    """The figures one reads first, in one line."""
    s = {"device": report["device_kind"], "elapsed_s": report.get("elapsed_s")}
    for b, row in (report.get("train", {}).get("rows") or {}).items():
        s[f"train_b{b}"] = {k: row.get(k) for k in ("compile_s", "step_ms", "images_per_s", "mfu", "error") if k in row}
    for name, row in (report.get("sampling", {}).get("rows") or {}).items():
        s[f"sample_{name}_ms"] = round(row["ms"], 2)
    for name, row in (report.get("torch", {}).get("rows") or {}).items():
        s[f"torch_{name}"] = [round(row["ours_ms"], 2), round(row["torch_ms"], 2), f"{row['relative_l2_diff']:.1e}"]
    return s


if __name__ == "__main__":
    define_flags()
    logging_utils.run_cli(main)
