"""launch/*.sh: syntax, dry-run output (the commands and their quoting), errors, workdir sharding.

The scripts run under bash in subprocesses with a small, clean environment; nothing here needs gcloud,
a TPU, a GPU or SLURM (a fake gcloud on PATH checks that dry runs never call it). The worker scripts
that tpu_pod.sh sends over ssh are also run here, against a fake home directory, to check that the
trainer receives exactly the arguments given.
"""

import os
import shlex
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
SCRIPTS = ["lib.sh", "single_host.sh", "tpu_pod.sh", "multi_gpu.sh", "batch_eval.sh"]

# Arguments that break naive quoting: spaces, both quote kinds, $, backslash, glob and shell syntax.
NASTY = ['--config.data.name=it\'s a "test"', "--config.x=$HOME `id` \\n *; rm -rf /"]

TPU = ["--name=codi-pod", "--zone=us-central2-b", "--accelerator_type=v4-32", "--project=my proj"]


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def sh(tmp_path):
    """sh(script, *args, env=..., path=..., cwd=...) -> CompletedProcess, in a clean environment.

    A fake `gcloud` that records its calls comes first on PATH; `sh.gcloud_calls()` reads them."""
    fakebin = tmp_path / "fakebin"
    calls = tmp_path / "gcloud_calls"
    _exe(fakebin / "gcloud", f'#!/bin/sh\necho "$@" >> {shlex.quote(str(calls))}\nexit 1\n')

    def run(script, *args, env=None, path=None, cwd=None):
        full_env = {
            "PATH": path if path is not None else f"{fakebin}:{os.environ['PATH']}",
            "HOME": str(tmp_path / "home"),
            "LC_ALL": "C",
        }
        full_env.update(env or {})
        return subprocess.run(
            [BASH, str(LAUNCH / script), *args],
            env=full_env,
            cwd=cwd or tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    run.gcloud_calls = lambda: calls.read_text() if calls.exists() else ""
    return run


def commands(stdout: str) -> list[list[str]]:
    """The printed commands, split as a POSIX shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def gcloud(cmds, verb):
    found = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]]
    assert found, f"no gcloud ... {verb} in {cmds}"
    return found


def flag(cmd, name):
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} in {cmd}"
    return values[0]


def trainer_argv(worker_script: str) -> list[str]:
    """The trainer's arguments in tpu_pod.sh's `run` worker script: `-m codi_jax.main ...` up to `>>`."""
    words = shlex.split(worker_script)
    start = words.index("-m")
    return words[start : words.index(">>", start)]


def one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# All scripts


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    r = subprocess.run([BASH, "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "multi_gpu.sh", "batch_eval.sh"])
def test_help(sh, script):
    r = sh(script, "--help")
    assert r.returncode == 0 and "usage: launch/" + script in r.stdout and "--dry-run" in r.stdout


def test_quote_roundtrip(tmp_path):
    words = ["plain", "", "a b", "it's", 'say "hi"', "$HOME", "`id`", "a\\b", "*", "x;y|z&", "é\tü", "--k=(1,-1,1)"]
    script = f'. {shlex.quote(str(LAUNCH / "lib.sh"))}; qjoin "$@"'
    out = subprocess.run([BASH, "-c", script, "bash", *words], capture_output=True, text=True, check=True).stdout
    assert shlex.split(out) == words
    assert out.startswith("plain '' 'a b'")  # plain words stay plain


# ---------------------------------------------------------------------------------------------
# tpu_pod.sh


def test_tpu_all_dry_run(sh, tmp_path):
    tarball = tmp_path / "codi-jax.tar.gz"
    tarball.write_bytes(b"")
    r = sh(
        "tpu_pod.sh",
        "all",
        "--dry-run",
        *TPU,
        f"--tarball={tarball}",
        "--config=configs/sr.py:tiny",
        "--workdir=gs://bucket/runs/sr pod",
        NASTY[0],
        "--delete_when_done",
        "--",
        NASTY[1],
        "--heartbeat_timeout=120",
    )
    assert r.returncode == 0, r.stderr
    assert sh.gcloud_calls() == ""  # printed, never run
    cmds = commands(r.stdout)
    assert [c[4] for c in cmds] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]

    (create,) = gcloud(cmds, "create")
    assert create[5] == "codi-pod"
    assert flag(create, "--accelerator-type") == "v4-32"
    assert flag(create, "--zone") == "us-central2-b"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"
    assert flag(create, "--project") == "my proj"

    (scp,) = gcloud(cmds, "scp")
    assert scp[5:7] == [str(tarball), "codi-pod:codi-jax-src.tar.gz"] and "--worker=all" in scp

    install, run, logs = gcloud(cmds, "ssh")
    assert "--worker=all" in install and "uv pip install" in flag(install, "--command")
    assert "--worker=all" in run
    script = flag(run, "--command")
    assert "nohup" in script and '>> "$log"' in script
    assert trainer_argv(script) == [
        "-m",
        "codi_jax.main",
        "--config=configs/sr.py:tiny",
        "--workdir=gs://bucket/runs/sr pod",
        "--multihost",
        *NASTY,
        "--heartbeat_timeout=120",
    ]
    assert "--worker=0" in logs and "tail" in flag(logs, "--command")

    (delete,) = gcloud(cmds, "delete")
    assert delete[5] == "codi-pod" and "--quiet" in delete and flag(delete, "--zone") == "us-central2-b"


def test_tpu_settings_from_env_and_flags(sh):
    env = {"TPU_NAME": "from-env", "ZONE": "europe-west4-a", "ACCELERATOR_TYPE": "v5litepod-16", "DRY_RUN": "1"}
    (create,) = commands(sh("tpu_pod.sh", "create", env=env).stdout)
    assert create[5] == "from-env" and flag(create, "--zone") == "europe-west4-a"
    assert flag(create, "--version") == "v2-alpha-tpuv5-lite"
    assert not any(a.startswith("--project") for a in create)

    # Flags win over the environment; "--flag value" works like "--flag=value".
    r = sh(
        "tpu_pod.sh", "create", "--name", "from-flag", "--accelerator-type", "v6e-16", "--create_flag=--spot", env=env
    )
    (create,) = commands(r.stdout)
    assert create[5] == "from-flag" and flag(create, "--accelerator-type") == "v6e-16"
    assert flag(create, "--version") == "v2-alpha-tpuv6e" and "--spot" in create

    r = sh("tpu_pod.sh", "create", "--runtime_version=my-image", env=env)
    assert flag(commands(r.stdout)[0], "--version") == "my-image"


def test_tpu_single_subcommands(sh):
    common = ["--dry-run", "--name=p", "--zone=z"]
    (delete,) = commands(sh("tpu_pod.sh", "delete", *common).stdout)
    assert delete[4:6] == ["delete", "p"] and "--quiet" in delete

    (logs,) = commands(sh("tpu_pod.sh", "logs", *common, "--log_worker=all").stdout)
    assert "--worker=all" in logs and "tail" in flag(logs, "--command")

    (stop,) = commands(sh("tpu_pod.sh", "stop", *common).stdout)
    assert "--worker=all" in stop and "kill" in flag(stop, "--command")

    (install,) = commands(
        sh("tpu_pod.sh", "install", *common, "--repo_url=https://example.com/codi jax.git", "--repo_ref=v1").stdout
    )
    script = flag(install, "--command")
    assert "git clone --quiet 'https://example.com/codi jax.git'" in script and "origin v1;" in script

    (run,) = commands(sh("tpu_pod.sh", "run", *common, "--config=c.py:x", "--workdir=/w", "--env=A=1 2").stdout)
    words = shlex.split(flag(run, "--command"))
    assert words[words.index("env") : words.index("-m")] == ["env", "PYTHONUNBUFFERED=1", "A=1 2", "$venv/bin/python"]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["create", "--zone=z", "--accelerator_type=v4-8"], {}, "TPU name not set"),
        (["delete", "--name=p"], {}, "zone not set"),
        (["create", "--name=p", "--zone=z"], {}, "accelerator type not set"),
        (
            ["all", "--name=p", "--zone=z", "--accelerator_type=v4-8", "--repo_url=u", "--config=c.py:x"],
            {},
            "workdir not set",
        ),
        (["run", "--name=p", "--zone=z", "--workdir=w"], {}, "config not set"),
        (["install", "--name=p", "--zone=z"], {}, "no code to install"),
        (["install", "--name=p", "--zone=z", "--tarball=/nonexistent.tgz"], {}, "no such file"),
        (["install", "--name=p", "--zone=z", "--repo_url=u", "--remote_dir=~"], {}, "--remote_dir"),
        (["create", "--name=p", "--zone=z", "--acelerator_type=v4-8"], {}, "unknown option --acelerator_type"),
        (["--name=p", "--zone=z"], {}, "no subcommand"),
        (["launch", "--name=p"], {}, "unexpected argument 'launch'"),
        (["delete", "--name=p", "--zone=z", "--config.x=1"], {}, "only go with run or all"),
        (["create", "--zone"], {}, "--zone needs a value"),
    ],
)
def test_tpu_errors(sh, args, env, message):
    r = sh("tpu_pod.sh", *args, "--dry-run", env=env)
    assert message in one_line_error(r)
    assert r.stdout == ""  # checked before anything is printed or run


def test_tpu_without_gcloud(sh, tmp_path):
    """A real (non-dry) run on a machine without gcloud stops with one line, before doing anything."""
    empty = tmp_path / "emptybin"
    empty.mkdir()
    r = sh("tpu_pod.sh", "delete", "--name=p", "--zone=z", path=str(empty))
    assert "gcloud not found" in one_line_error(r)
    assert r.stdout == ""


@pytest.mark.skipif(not all(shutil.which(t) for t in ("setsid", "nohup", "tail", "tar")), reason="needs coreutils")
def test_tpu_worker_scripts_run(sh, tmp_path):
    """install/run/logs/stop worker scripts, run locally against a fake home: code unpacked, the trainer
    gets exactly the user's arguments, logs returns the run's exit status, stop ends the run."""
    home = tmp_path / "home"
    # A GitHub-style tarball (one top folder); install unwraps it.
    src = tmp_path / "src" / "codi-jax-main"
    (src / "codi_jax").mkdir(parents=True)
    (src / "setup.cfg").write_text("")
    tarball = tmp_path / "code.tgz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(src.parent), src.name], check=True)
    fake_python = (  # records its arguments; FAKE_SLEEP keeps it running, else it exits with status 7
        '#!/bin/bash\n[ "$1" = -c ] && exit 0\nprintf "%s\\0" "$@" > "$HOME/argv"\necho training\n'
        'if [ -n "${FAKE_SLEEP:-}" ]; then exec sleep "$FAKE_SLEEP"; fi\nexit 7\n'
    )
    _exe(home / "codi-venv" / "bin" / "python", fake_python)
    _exe(home / ".local" / "bin" / "uv", '#!/bin/sh\necho "uv $*" >> "$HOME/uv_calls"\n')
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}

    def worker(subcommand, *args):
        (cmd,) = [
            c
            for c in commands(sh("tpu_pod.sh", subcommand, "--dry-run", "--name=p", "--zone=z", *args).stdout)
            if c[4] == "ssh"
        ]
        return subprocess.run(
            [BASH, "-c", flag(cmd, "--command")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
        )

    def wait_for(predicate):
        for _ in range(200):
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError("timed out")

    shutil.copy(tarball, home / "codi-jax-src.tar.gz")  # what `gcloud ... scp` does
    r = worker("install", f"--tarball={tarball}")
    assert r.returncode == 0, r.stderr
    assert (home / "codi-jax" / "setup.cfg").exists() and not (home / "codi-jax-src.tar.gz").exists()
    assert "-e " + str(home / "codi-jax") + " jax[tpu]" in (home / "uv_calls").read_text()

    run_args = ["--config=configs/sr.py:tiny", "--workdir=/tmp/runs/a b", *NASTY]
    r = worker("run", *run_args[:2], run_args[2], "--", run_args[3])
    assert r.returncode == 0 and "started pid" in r.stdout, r.stderr
    wait_for(lambda: (home / "codi-run.log.exit").exists())
    argv = (home / "argv").read_text().split("\0")[:-1]
    assert argv == ["-m", "codi_jax.main", *run_args[:2], "--multihost", *run_args[2:]]
    r = worker("logs")
    assert r.returncode == 7 and "training" in r.stdout

    # A long run: a second `run` is refused while it goes on; `stop` ends it; `logs` then fails.
    (home / "argv").unlink()
    r = worker("run", *run_args[:2], "--env=FAKE_SLEEP=60")
    assert r.returncode == 0, r.stderr
    pid = int((home / "codi-run.log.pid").read_text())
    wait_for(lambda: (home / "argv").exists())
    r = worker("run", *run_args[:2])
    assert r.returncode == 1 and "still runs" in r.stderr
    r = worker("stop")
    assert r.returncode == 0 and "stopped" in r.stdout

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie whose parent has not reaped it yet counts as gone
        return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    wait_for(gone)
    r = worker("logs")
    assert r.returncode == 1 and "no exit status" in r.stderr


# ---------------------------------------------------------------------------------------------
# multi_gpu.sh


def test_multi_gpu_one_host(sh):
    r = sh("multi_gpu.sh", "--dry-run", "configs/sr.py:tiny", "runs/my run", NASTY[0], "--gpus=0,1")
    assert r.returncode == 0, r.stderr
    *_, train = commands(r.stdout)
    argv = train[: train.index("2>&1")]
    assert argv[:3] == ["env", "XLA_PYTHON_CLIENT_PREALLOCATE=false", "CUDA_VISIBLE_DEVICES=0,1"]
    assert argv[4:] == [
        "-m",
        "codi_jax.main",
        "--config=configs/sr.py:tiny",
        "--workdir=runs/my run",
        "--config.mesh.ici=(1,-1,1)",
        NASTY[0],
    ]
    assert train[-3:] == ["tee", "-a", "runs/my run/log.txt"]
    assert not any("coordinator" in a or "multihost" in a for a in train)


def test_multi_gpu_explicit_hosts(sh):
    r = sh(
        "multi_gpu.sh",
        "--dry-run",
        "--coordinator_address=10.0.0.1:1234",
        "--num_processes=3",
        "--process_id=2",
        "c.py:x",
        "/shared/w",
        "--",
        "--heartbeat_timeout=30",
    )
    assert r.returncode == 0, r.stderr
    train = commands(r.stdout)[-1]
    assert [
        "--coordinator_address=10.0.0.1:1234",
        "--num_processes=3",
        "--process_id=2",
        "--config.mesh.ici=(3,-1,1)",
        "--heartbeat_timeout=30",
    ] == train[train.index("--workdir=/shared/w") + 1 : train.index("2>&1")]
    assert train[-1] == "/shared/w/log.process2.txt"
    # Your own mesh wins over the default.
    train = commands(sh("multi_gpu.sh", "--dry-run", "c.py:x", "w", "--config.mesh.ici=(-1,1,1)").stdout)[-1]
    assert [a for a in train if a.startswith("--config.mesh.ici")] == ["--config.mesh.ici=(-1,1,1)"]


@pytest.mark.parametrize("nodelist, first", [("gpu[03-06,09]", "gpu03"), ("a1,b[1-2]", "a1"), ("node7", "node7")])
def test_multi_gpu_slurm(sh, nodelist, first):
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": nodelist,
        "SCONTROL": "no-scontrol-here",
    }
    r = sh("multi_gpu.sh", "--dry-run", "--slurm", "--port=9999", "c.py:x", "/shared/w", env=env)
    assert r.returncode == 0, r.stderr
    train = commands(r.stdout)[-1]
    assert f"--coordinator_address={first}:9999" in train
    assert "--num_processes=4" in train and "--process_id=1" in train


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--slurm", "c.py:x", "w"], {}, "SLURM_PROCID is not set"),
        (
            ["--slurm", "c.py:x", "w"],
            {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"},
            "one task per node",
        ),
        (["--num_processes=2", "--process_id=0", "c.py:x", "w"], {}, "--coordinator_address=HOST:PORT is needed"),
        (["--num_processes=2", "--process_id=2", "--coordinator_address=h:1", "c.py:x", "w"], {}, "must be below"),
        (["--num_processes=two", "c.py:x", "w"], {}, "--num_processes must be a non-negative integer"),
        (["c.py:x"], {}, "want CONFIG and WORKDIR"),
        (["--bogus=1", "c.py:x", "w"], {}, "unknown option --bogus"),
    ],
)
def test_multi_gpu_errors(sh, args, env, message):
    r = sh("multi_gpu.sh", "--dry-run", *args, env=env)
    assert message in one_line_error(r)
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------
# batch_eval.sh


def _runs(tmp_path, n, finished=True):
    paths = []
    for i in range(n):
        p = tmp_path / "runs" / f"run {i}"
        (p / "codi" / "checkpoints").mkdir(parents=True) if finished else p.mkdir(parents=True)
        paths.append(str(p))
    return paths


def _evaluated(stdout):
    return [flag(c, "--workdir") for c in commands(stdout) if "codi_jax.main" in c]


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_batch_eval_shards(sh, tmp_path, num_shards):
    runs = _runs(tmp_path, 7)
    seen = []
    for shard in range(num_shards):
        r = sh(
            "batch_eval.sh",
            "--dry-run",
            "--config=configs/sr.py:tiny",
            f"--shard={shard}",
            f"--num_shards={num_shards}",
            *runs,
        )
        assert r.returncode == 0, r.stderr
        got = _evaluated(r.stdout)
        assert got == runs[shard::num_shards]
        seen += got
    assert sorted(seen) == sorted(runs)


def test_batch_eval_dry_run_commands(sh, tmp_path):
    runs = _runs(tmp_path, 2)
    (tmp_path / "list.txt").write_text(f"# finished runs\n\n{shlex.quote('x')}  # comment\nruns/y   other.py:v\n")
    for name in ("x", "y"):
        (tmp_path / "runs" / name / "codi" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "x").symlink_to(tmp_path / "runs" / "x")
    r = sh(
        "batch_eval.sh",
        "--dry-run",
        "--config=configs/sr.py:tiny",
        *runs,
        "--workdirs_file=list.txt",
        NASTY[0],
        "--",
        NASTY[1],
    )
    assert r.returncode == 0, r.stderr
    cmds = [c for c in commands(r.stdout) if "codi_jax.main" in c]
    assert [flag(c, "--workdir") for c in cmds] == [*runs, str(tmp_path / "x"), str(tmp_path / "runs" / "y")]
    assert [flag(c, "--config") for c in cmds] == ["configs/sr.py:tiny"] * 3 + ["other.py:v"]
    assert all(c[:3] == ["python", "-m", "codi_jax.main"] and c[-5:-3] == NASTY for c in cmds)
    redirect, log, stderr = cmds[0][-3:]
    assert (redirect, stderr) == (">", "2>&1")
    assert Path(log).parent == tmp_path / "batch_eval_logs" and Path(log).name.startswith("000_")
    assert Path(log).name.endswith("_runs_run_0.log")
    assert not (tmp_path / "batch_eval_summary.tsv").exists()  # a dry run writes nothing
    assert not (tmp_path / "batch_eval_logs").exists()


def test_batch_eval_runs_and_summarises(sh, tmp_path):
    runs = _runs(tmp_path, 4)
    untrained = _runs(tmp_path / "u", 1, finished=False)
    fake = _exe(
        tmp_path / "fakepy",
        (  # writes metrics.json, except for run 2 which fails
            '#!/bin/bash\nfor a; do case $a in --workdir=*) wd=${a#*=};; esac; done\necho "evaluating $wd"\n'
            'case $wd in *"run 2") exit 3;; esac\necho "{}" > "$wd/metrics.json"\n'
        ),
    )
    t0 = time.perf_counter()
    r = sh(
        "batch_eval.sh",
        f"--python={fake}",
        "--parallel=2",
        "--config=configs/sr.py:tiny",
        *runs,
        *untrained,
        "--summary=out/summary.tsv",
        env={},
    )
    assert time.perf_counter() - t0 < 20
    assert r.returncode == 1  # one failed, one skipped
    assert "2 of 5 workdirs not evaluated" in r.stderr
    rows = [line.split("\t") for line in (tmp_path / "out" / "summary.tsv").read_text().splitlines()]
    assert rows[0] == ["workdir", "status", "metrics", "log"]
    by_dir = {row[0]: row for row in rows[1:]}
    assert list(by_dir) == [*runs, *untrained]
    for i in (0, 1, 3):
        assert by_dir[runs[i]][1:3] == ["ok", runs[i] + "/metrics.json"]
        assert f"evaluating {runs[i]}" in Path(by_dir[runs[i]][3]).read_text()
    assert by_dir[runs[2]][1] == "failed (exit 3)" and by_dir[runs[2]][2].startswith("missing")
    assert by_dir[untrained[0]][1].startswith("skipped: no codi/checkpoints")
    assert r.stdout.splitlines()[0] == "workdir\tstatus\tmetrics\tlog"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config=c.py:x"], "no workdirs given"),
        (["w"], "no config for w"),
        (["--config=c.py:x", "--shard=2", "--num_shards=2", "w"], "--shard=2 must be below --num_shards=2"),
        (["--config=c.py:x", "--num_shards=0", "w"], "--num_shards must be >= 1"),
        (["--config=c.py:x", "--parallel=x", "w"], "--parallel must be a non-negative integer"),
        (["--config=c.py:x", "--workdirs_file=nope.txt"], "no such file"),
    ],
)
def test_batch_eval_errors(sh, args, message):
    r = sh("batch_eval.sh", "--dry-run", *args)
    assert message in one_line_error(r)
    assert r.stdout == ""
