"""The step / sampling / PyTorch benchmark at minimum size: every figure present, positive and
finite, and every ratio the quotient of the figures reported next to it."""

import json
import math

import pytest

from codi_jax.benchmarks import step
from tests import helpers


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _one_level_smoke():
    """configs/sr.py:smoke with a one-level U-Net (attention in the mid block only; a third of smoke's
    layers): at the full smoke size the two train steps and four samplers this test compiles take
    minutes on a 2-core machine."""
    config = helpers.smoke_config()
    config.model.unet.update(block_out_channels=(16,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    return config


@pytest.mark.heavy(50)
def test_benchmark_report_on_smoke_config(tmp_path):
    out = tmp_path / "bench.json"
    lines = []
    step.run(
        _one_level_smoke(),
        steps=2,
        warmup=1,
        reps=1,
        sample_steps=(1, 4),
        ddim_steps=8,
        torch_steps=(1,),
        with_torch=True,
        out=str(out),
        log=lines.append,
    )
    print("\n".join(lines))
    report = json.loads(out.read_text())

    assert report["config_variant"] == "smoke" and report["backend"] == "cpu" and report["device_count"] >= 1
    for key in ("date", "device_kind", "jax_version"):
        assert report[key]

    tr = report["train"]
    assert tr["batch_size"] == 4
    for name in ("plain", "codi"):
        r = tr[name]
        for key in (
            "step_s",
            "images_per_s_per_device",
            "flops_per_step_per_device",
            "tflops_per_s_per_device",
            "peak_memory_bytes",
            "compile_s",
        ):
            assert _positive(r[key]), (name, key, r[key])
        assert len(r["step_s_all"]) == 2 and all(_positive(t) for t in r["step_s_all"])
        assert math.isfinite(r["loss"])
        assert r["mfu"] is None  # no known peak for the CPU
        assert math.isclose(r["tflops_per_s_per_device"], r["flops_per_step_per_device"] / r["step_s"] / 1e12)
    assert "no peak FLOP/s known" in tr["mfu_note"]
    assert math.isclose(tr["codi_over_plain_step"], tr["codi"]["step_s"] / tr["plain"]["step_s"])
    assert math.isclose(
        tr["codi_over_plain_flops"], tr["codi"]["flops_per_step_per_device"] / tr["plain"]["flops_per_step_per_device"]
    )
    # One forward-backward plus one target forward against one forward-backward: about 4/3 (exactly
    # what XLA counts, so deterministic).
    assert 1.15 < tr["codi_over_plain_flops"] < 1.5, tr["codi_over_plain_flops"]

    sa = report["sampling"]
    assert set(sa["rows"]) == {"step1", "step4", "ddim8"}
    for r in sa["rows"].values():
        assert _positive(r["ms"]) and all(_positive(t) for t in r["ms_all"])
    assert math.isclose(sa["ddim8_over_step4"], sa["rows"]["ddim8"]["ms"] / sa["rows"]["step4"]["ms"])

    to = report["torch"]
    if "skipped" not in to:  # torch and diffusers come with the test extras
        assert set(to["rows"]) == {"step1"}
        r = to["rows"]["step1"]
        for key in ("ours_ms", "torch_ms", "torch_over_ours"):
            assert _positive(r[key]), (key, r[key])
        assert math.isclose(r["torch_over_ours"], r["torch_ms"] / r["ours_ms"])
        if "torch_1thread_ms" in r:
            assert math.isclose(r["torch_1thread_over_ours"], r["torch_1thread_ms"] / r["ours_ms"])
        assert math.isclose(
            r["torch_best_over_ours"], min(r["torch_ms"], r.get("torch_1thread_ms", math.inf)) / r["ours_ms"]
        )
        assert r["max_abs_diff"] < 1e-4 * max(1.0, r["output_max_abs"]), r  # same weights, same numbers

    table = step.format_table(report)
    assert "codi / plain" in table and "ddim8 / step4" in table
    assert any("sampling" in line for line in lines)


def test_peak_flops_table():
    assert step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert step.peak_flops("NVIDIA H200") == 989e12
    assert step.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert step.peak_flops("TPU v4") == 275e12
    assert step.peak_flops("TPU v5 lite") == 197e12
    assert step.peak_flops("TPU v5p") == 459e12
    assert step.peak_flops("cpu") is None


@pytest.mark.heavy(60)
def test_gpu_benchmark_runs_every_part_on_the_cpu(tmp_path):
    """benchmarks.sd_gpu, the one-call GPU check, end to end on the CPU at minimum size: the train step's
    time and its FLOPs as written, the samplers, diffusers on the same exported weights (float32 here:
    the same function to rounding), and a profile whose kernel time is summed from the trace."""
    import os
    import subprocess
    import sys

    one_level = [
        "--config.model.unet.block_out_channels=(16,)",
        "--config.model.unet.down_block_types=('DownBlock2D',)",
        "--config.model.unet.up_block_types=('UpBlock2D',)",
    ]
    cmd = [sys.executable, "-m", "codi_jax.benchmarks.sd_gpu", "--config=configs/sr.py:smoke", *one_level,
           "--batch_sizes=2", "--steps=1", "--warmup=1", "--reps=1", "--sample_steps=1", "--ddim_steps=2",
           "--torch_steps=1", "--profile_steps=1", f"--out={tmp_path}"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # libtpu's profiler plugin would claim the trace
    proc = subprocess.run(
        cmd,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["train"]["rows"]["2"]
    assert "error" not in row and _positive(row["compile_s"]) and _positive(row["step_ms"])
    assert _positive(row["flops_per_step"]) and row["images_per_s"] == pytest.approx(2 / (row["step_ms"] / 1e3))
    assert set(report["sampling"]["rows"]) == {"step1", "ddim2"}
    torch_row = report["torch"]["rows"]["step1"]
    assert torch_row["relative_l2_diff"] < 1e-4 and _positive(torch_row["torch_ms"])
    host = report["profile"]["lines"]["host_xla_threads"]
    assert _positive(host["ms_per_step"]) and host["top_ms_per_step"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["train_b2"]["step_ms"] == row["step_ms"]
