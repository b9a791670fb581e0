"""The folders a command writes to: checked once, at the start, in one line."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from codi_jax import storage


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """Fail at once, in one line, if `workdir` (a folder or a gs:// URL) cannot be created or written."""
    probe = storage.join(workdir, f".write_test_{os.getpid()}")
    try:
        storage.write_bytes(probe, b"")  # creates the folder too
        storage.remove(probe)
    except OSError as e:
        raise PermissionError(f"{flag}={workdir} is not writable: {e.strerror or e}") from None


CACHE_FOLDER = ".jax_cache"


def compilation_cache_dir(setting: str, workdir: str) -> str:
    """The folder of JAX's persistent compilation cache: `setting` 'auto' = $JAX_COMPILATION_CACHE_DIR if
    set (JAX's own setting: one cache for every job of a machine), else WORKDIR/../.jax_cache (shared by
    the runs beside it); '' = none; else the folder given."""
    if setting != "auto":
        return setting
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    if storage.is_remote(workdir):
        return storage.join(storage.dirname(workdir), CACHE_FOLDER)
    parent = os.path.dirname(os.path.normpath(os.path.abspath(workdir)))
    return os.path.join(parent, CACHE_FOLDER)


def enable_compilation_cache(setting: str, workdir: str) -> str:
    """Turn on JAX's persistent compilation cache (before anything compiles), so that a resumed or
    repeated job reads its programs back instead of compiling them again. Returns the folder ('' if off)."""
    import jax
    from absl import logging

    path = compilation_cache_dir(setting, workdir)
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        logging.info("compilation cache: %s", path)
    return path


LOCK_FILE = "job.lock"


class WorkdirBusyError(OSError):
    """Another job holds the workdir (one line: who, since when, how to override)."""

    def __str__(self):
        return str(self.args[0])


def _proc_start(pid: int) -> str:
    """The kernel's start time of `pid` (Linux; '' elsewhere): tells a live holder from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("proc_start", "")
    return not started or _proc_start(pid) in ("", started)


def _read_lock(path: str) -> dict:
    try:
        return storage.read_json(path)
    except (OSError, ValueError):
        return {}  # half-written or unreadable: no holder can be named


def acquire_lock(workdir: str, break_lock: bool = False) -> str:
    """Take WORKDIR/job.lock for this process, or fail in one line naming the job that holds it.

    A lock left by a job on this host whose process is gone (killed, crashed) is stale and taken over
    with a warning; a lock from another host cannot be checked from here, so it takes `break_lock`
    (`--break_lock`) to take it over. Returns the lock's path."""
    import socket
    import time

    from absl import logging

    path = storage.join(workdir, LOCK_FILE)
    host, pid = socket.gethostname(), os.getpid()
    me = dict(host=host, pid=pid, proc_start=_proc_start(pid), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for _ in range(3):
        if not storage.create_exclusive(path, json.dumps(me).encode()):
            holder = _read_lock(path)
            same_host = holder.get("host") == host
            if break_lock or (same_host and not _alive(holder)):
                why = "--break_lock" if break_lock else "its process is gone"
                logging.warning("taking over the stale lock %s (%s): %s", path, why, holder)
                storage.remove(path)
                continue
            raise WorkdirBusyError(
                f"--workdir={workdir} is in use by the job on host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, started {holder.get('started', '?')} ({path}); stop that job, or "
                f"if it is gone rerun with --break_lock"
            )
        return path
    raise WorkdirBusyError(f"--workdir={workdir}: could not take {path} (another job keeps taking it)")


def release_lock(path: str) -> None:
    """Remove the lock if this process still holds it."""
    if _read_lock(path).get("pid") == os.getpid():
        storage.remove(path)


@contextlib.contextmanager
def job_lock(workdir: str, break_lock: bool = False):
    """One job per workdir for the duration of the block; on several hosts, process 0 takes the one
    lock of the job and every process learns whether it got it."""
    import jax

    path, error = None, ""
    if jax.process_index() == 0:
        try:
            path = acquire_lock(workdir, break_lock)
        except WorkdirBusyError as e:
            error = str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flag = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
        if int(flag) and not error:
            error = f"--workdir={workdir} is in use by another job (process 0 could not take {LOCK_FILE})"
    if error:
        raise WorkdirBusyError(error)
    try:
        yield path
    finally:
        if path:
            release_lock(path)
