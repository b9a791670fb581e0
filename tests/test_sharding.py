"""Partitioning: one CoDi step on 8 simulated devices under several meshes equals one device;
two real processes (CPU collectives over localhost) train like one; their checkpoint restores
in one process; a dead process stops the others. Each case runs tests/sharding_worker.py in
fresh interpreters (the device count is fixed when JAX starts)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _worker(args, devices, timeout=900):
    return subprocess.Popen(
        [sys.executable, "-m", "tests.sharding_worker", *args],
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=900):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.heavy(100)
def test_one_codi_step_on_any_mesh_matches_one_device(tmp_path):
    out = tmp_path / "meshes.json"
    rc, log = _finish(_worker(["meshes", str(out)], devices=8))
    assert rc == 0, log[-3000:]
    r = json.loads(out.read_text())
    ref = r["1x1"]
    assert ref["max_param_update"] > 1e-3  # the steps really moved the params
    for mesh in ("2x4",):
        # Same loss and updated params up to float32 reduction order (tolerance 1e-6 absolute on params
        # that moved by ~4e-3; the loss to 1e-6 relative).
        np.testing.assert_allclose(r[mesh]["losses"], ref["losses"], rtol=1e-6)
        assert r[mesh]["max_param_diff"] < 1e-6, (mesh, r[mesh]["max_param_diff"])
    # The shardings the default rules ask for: batch over (data, fsdp); weights' input dims over fsdp
    # for params, EMA and Adam moments alike; nothing sharded on a pure data-parallel mesh.
    assert r["8x1"]["specs"] == {
        "conv_kernel": "()",
        "conv_kernel_ema": "()",
        "conv_kernel_adam_mu": "()",
        "qkv_kernel": "()",
        "image_batch": "('data',)",
    }
    fsdp_conv = "(None, None, 'fsdp')"
    for mesh, batch in (("1x8", "('fsdp',)"), ("2x4", "(('data', 'fsdp'),)")):
        specs = r[mesh]["specs"]
        assert specs["conv_kernel"] == specs["conv_kernel_ema"] == specs["conv_kernel_adam_mu"] == fsdp_conv, mesh
        assert specs["qkv_kernel"] == "('fsdp',)" and specs["image_batch"] == batch, mesh


@pytest.mark.heavy(125)
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
    port = _free_port()
    two = [
        _worker(
            [
                "train",
                str(tmp_path / "two"),
                str(tmp_path / f"two{i}.npz"),
                f"--coordinator=127.0.0.1:{port}",
                f"--process_id={i}",
            ],
            devices=2,
        )
        for i in range(2)
    ]
    # The reference: one process with the same 4 devices' worth of mesh, reading both processes' data shares.
    one = _worker(["train", str(tmp_path / "one"), str(tmp_path / "one.npz"), "--single_reads=2"], devices=4)
    for p in two + [one]:
        rc, log = _finish(p)
        assert rc == 0, log[-3000:]
    rc, log = _finish(_worker(["restore", str(tmp_path / "two"), str(tmp_path / "restored.npz")], devices=1))
    assert rc == 0, log[-3000:]
    assert sorted(os.listdir(tmp_path / "two" / "teacher" / "checkpoints")) == ["2", "4"]
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in ("two0", "one", "restored"))
    assert int(a["step"]) == int(b["step"]) == int(c["step"]) == 4
    names = [k for k in a.files if k != "step"]
    assert len(names) > 50
    # Two processes vs one on the same global batches: float32 reduction order only.
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in names) < 1e-6
    # Written by two processes (each its shards), restored whole by one: exactly the same values.
    for k in names:
        np.testing.assert_array_equal(a[k], c[k])


def test_a_dead_process_stops_the_others_with_an_error(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    procs = [
        _worker(["die", f"--coordinator=127.0.0.1:{port}", f"--process_id={i}", "--heartbeat=10"], devices=1)
        for i in range(2)
    ]
    (rc1, _), (rc0, log0) = _finish(procs[1], 300), _finish(procs[0], 300)
    elapsed = time.monotonic() - t0
    assert rc1 == 3
    assert rc0 != 0 and "never stopped" not in log0, log0[-2000:]
    assert "heartbeat" in log0 or "unhealthy" in log0, log0[-2000:]
    assert elapsed < 120, elapsed
