"""The memory planner (codi_jax.benchmarks.plan): the job's own train step compiled ahead of time for
devices that are not here, its bytes per device checked against arithmetic from the shardings, and
the Stable Diffusion presets it plans with checked against diffusers' own classes."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from codi_jax import hardware
from codi_jax.pretrained import architectures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _plan(tmp_path, name, *flags):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the planner sets the CPU device count itself; -O0 is the tests' choice only
    cmd = [sys.executable, "-m", "codi_jax.benchmarks.plan", "--config=configs/sr.py:smoke", f"--out={out}", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _state_and_batch_bytes(report):
    return sum(report["arithmetic_bytes"].values())


@pytest.mark.heavy(45)
def test_cpu_plan_argument_bytes_are_the_sharded_state_and_batch(tmp_path):
    """On 4 simulated CPU devices with FSDP 4, XLA's per-device argument bytes are what the shardings
    say: params + EMA + Adam moments (each split 1/4 where the rules split them) + the batch's quarter,
    to within the few replicated scalars (step, RNG key, Adam's counts)."""
    r = _plan(tmp_path, "cpu", "--topology=cpu:4", "--config.mesh.ici=(1,-1,1)")
    assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    args = r["bytes"]["argument_size_in_bytes"]
    assert abs(args - _state_and_batch_bytes(r)) < 1024, (args, r["arithmetic_bytes"])
    # Adam's two moments are twice the params; the EMA is one copy.
    a = r["arithmetic_bytes"]
    assert a["ema_params"] == a["params"] and abs(a["opt_state"] - 2 * a["params"]) < 64
    whole = 4 * r["trainable_params"]  # float32 params, unsharded
    assert a["params"] < 0.5 * whole  # most weight bytes are split over the 4 devices
    # a CPU device holds its share of the host's memory (4 simulated devices: a quarter)
    assert r["flops_per_device"] > 0 and r["memory_bytes"] == hardware.host_memory_bytes() // 4 and r["fits"] is True


@pytest.mark.heavy(200)
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tpu_topology_compile_shrinks_arguments_with_fsdp(tmp_path):
    """The smoke model's CoDi step compiled by XLA's TPU compiler for a v5e-4 slice (4 chips, none here):
    FSDP over the 4 chips holds the state in about a quarter of the bytes that data parallelism does, as
    the logical rules say; the figures the planner reports come from the TPU executable."""
    wide = "--config.model.unet.block_out_channels=(64,)"  # arrays large enough that TPU tile padding is small
    fsdp = _plan(tmp_path, "fsdp", "--topology=v5e:2x2", "--config.mesh.ici=(1,-1,1)", wide)
    data = _plan(tmp_path, "data", "--topology=v5e:2x2", "--config.mesh.ici=(-1,1,1)", wide)
    for r in (fsdp, data):
        assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 4
        assert r["memory_bytes"] == 16 * 2**30 and r["fits"] is True and r["error"] is None
        assert r["flops_per_device"] > 0 and r["min_step_s"] == r["flops_per_device"] / 197e12
        assert r["attention"] == "auto" and r["pallas_kernels"] > 0  # 'auto' is splash on a TPU
    state = lambda r: r["bytes"]["argument_size_in_bytes"]
    expected = _state_and_batch_bytes(data) / _state_and_batch_bytes(fsdp)  # from the shardings alone
    assert expected > 3.0
    measured = state(data) / state(fsdp)
    assert 0.8 * expected < measured < 1.2 * expected, (measured, expected)
    # the compiled arguments are the arithmetic's plus the TPU's tile padding, never less
    assert state(fsdp) >= _state_and_batch_bytes(fsdp)


@pytest.mark.heavy(60)
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_multi_slice_plan_splits_the_state_within_a_slice_and_the_batch_across_slices(tmp_path):
    """Two v5e-4 slices with FSDP inside each slice and data parallelism across them (mesh.dcn=(2,1,1)):
    each chip holds a quarter of the state (split over its slice's 4 chips, not over all 8) and 2
    examples of a global batch of 16, as the compiled TPU program's argument bytes confirm. The FLOP count
    lowers the step for one CPU device, where there are no slices."""
    wide = "--config.model.unet.block_out_channels=(64,)"
    fsdp = ("--config.mesh.ici=(1,-1,1)", "--batch_per_device=2", wide)
    r = _plan(tmp_path, "two", "--topology=v5e:2x2", "--num_slices=2", "--config.mesh.dcn=(2,1,1)", *fsdp)
    assert r["devices"] == 8 and r["num_slices"] == 2 and r["error"] is None and r["fits"] is True
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert (r["global_batch"], r["batch_per_device"]) == (16, 2)
    whole = 4 * r["trainable_params"]  # float32 params, unsharded
    params = r["arithmetic_bytes"]["params"]
    assert 0.2 * whole < params < 0.3 * whole  # a quarter: split within the slice, whole in each slice
    args = r["bytes"]["argument_size_in_bytes"]
    assert args >= _state_and_batch_bytes(r)  # the arithmetic plus TPU tile padding, never less
    assert args < 0.5 * 4 * whole  # far below params + EMA + Adam's two moments held whole on each chip
    assert r["flops_per_device"] > 0


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_fit_check_names_what_to_change_on_a_tpu_topology_device():
    """The job's check before step 1 on a v5e chip (16 GiB): a step that needs more stops with one line
    naming the fields to change; one that fits passes."""
    code = (
        "import os; os.environ['ALLOW_MULTIPLE_LIBTPU_LOAD']='1';"
        "from jax.experimental import topologies; from codi_jax import hardware;"
        "d = topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices[0];"
        "hardware.check_fits({'argument_size_in_bytes': 2 * 2**30, 'temp_size_in_bytes': 13 * 2**30}, d, 'codi');"
        "hardware.check_fits({'argument_size_in_bytes': 3 * 2**30, 'temp_size_in_bytes': 14 * 2**30}, d, 'codi')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "DoesNotFitError: codi: the train step needs 17.00 GiB per device" in last
    assert "TPU v5 lite holds 16.00 GiB" in last and "model.unet.remat='full'" in last and "mesh.ici" in last
    assert "codi.train.batch_size" in last and "codi.mode='pe'" in last


def test_fit_check_on_the_cpu_holds_a_step_to_its_share_of_the_hosts_memory():
    """A CPU device holds the host's physical memory divided among the simulated devices: a step needing
    more stops before step 1 (rather than being killed by the operating system), one needing less runs."""
    devices = jax.devices("cpu")
    share = hardware.host_memory_bytes() // len(devices)
    assert hardware.memory_limit(devices[0]) == share
    hardware.check_fits({"argument_size_in_bytes": share // 2}, devices[0], "codi")
    with pytest.raises(hardware.DoesNotFitError, match="a CPU device's share of this host's memory.*codi.mode='pe'"):
        hardware.check_fits({"argument_size_in_bytes": share, "temp_size_in_bytes": 2**20}, devices[0], "codi")


def test_a_second_job_from_the_same_teacher_leaves_the_first_jobs_options_alone():
    """The planner counts FLOPs on a second job built from the same weightless teacher with XLA attention,
    after building the job it compiles: the compiled job must keep its own attention and remat (it once
    compiled XLA attention where splash was asked for)."""
    from codi_jax import experiment
    from configs import sr

    pre = architectures.abstract("sd15")
    jobs = []
    for attention, remat in (("auto", "full"), ("xla", "none")):
        config = sr.get_config()
        config.teacher.pretrained_path = "sd15"
        config.model.unet.update(attention=attention, remat=remat)
        jobs.append(experiment.planning_job(config, pre, jax.devices()[:1]))
    first = jobs[0].config.model.unet
    assert (first.attention, first.remat) == ("auto", "full")
    assert jobs[0].model.module.unet_cfg.attention == "auto"  # what the U-Net reads when traced


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_presets_have_diffusers_parameter_counts(arch):
    """Each preset builds the network diffusers builds from the same config (parameter count of the
    U-Net and the VAE, counted by diffusers' torch classes on the meta device: nothing allocated)."""
    import diffusers
    import torch

    unet_d, vae_d, _, _, _ = architectures.PRESETS[arch]
    with torch.device("meta"):
        ref_unet = sum(p.numel() for p in diffusers.UNet2DConditionModel(**unet_d).parameters())
        ref_vae = sum(p.numel() for p in diffusers.AutoencoderKL(**vae_d).parameters())
    pre = architectures.abstract(arch)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    assert count(pre.unet_params) == ref_unet
    assert count(pre.vae_params) == ref_vae
    assert pre.prediction == {"sd15": "eps", "sd21": "v"}[arch]


def test_abstract_folder_reads_configs_only(tmp_path):
    """A diffusers folder plans from its config files: the same U-Net shapes as loading its weights."""
    from codi_jax.pretrained import stable_diffusion
    from tests.sd_folder import make_tiny_sd

    make_tiny_sd(tmp_path / "sd")
    loaded = stable_diffusion.load(str(tmp_path / "sd"))
    pre = architectures.abstract(str(tmp_path / "sd"))
    shapes = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
    assert shapes(pre.unet_params) == shapes(loaded.unet_params)
    assert shapes(pre.vae_params) == shapes(loaded.vae_params)
    assert pre.context.shape == loaded.context.shape and pre.prediction == loaded.prediction
    with pytest.raises(ValueError, match="neither a preset"):
        architectures.abstract(str(tmp_path / "missing"))


def test_a_processes_memory_is_read_while_it_lives_and_is_zero_once_it_is_gone():
    """What the planning runner records as a compile's host memory: a child holding 200 MB reads as at least
    that (and not wildly more); a finished one reads 0."""
    code = "import sys, numpy as np; a = np.ones(25_000_000); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        held = hardware.process_memory_bytes(child.pid)
        assert 200e6 <= held < 1e9
        assert hardware.process_memory_bytes(child.pid, swapped=True) >= held
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    assert hardware.process_memory_bytes(child.pid) == 0


def test_freed_host_memory_stays_resident_until_the_job_gives_it_back():
    """glibc keeps freed heap blocks for reuse (what kept a resumed SD run gigabytes above its state);
    hardware.release_free_host_memory, which train.run_stage calls once the state exists and after the
    last checkpoint write, hands them to the operating system."""
    code = (
        "import os, numpy as np; from codi_jax import hardware;"
        "rss = lambda: hardware.process_memory_bytes(os.getpid()) / 2**20;"
        "blocks = [np.ones(8192) for _ in range(8000)]; fence = np.ones(8192); before = rss();"  # 64 KiB each
        "del blocks; freed = rss();"
        "assert hardware.release_free_host_memory(); after = rss();"
        "print(round(before - freed), round(freed - after))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    on_delete, on_release = map(int, proc.stdout.split())
    assert on_delete < 50  # of 500 MiB freed by Python, the allocator kept nearly all
    assert on_release > 400  # and gave it back when asked
