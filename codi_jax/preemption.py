"""Stopping cleanly when the machine is taken away: SIGTERM -> finish the step, save, exit 75.

A TPU VM's preemption or maintenance event, Kubernetes and SLURM all send SIGTERM and kill the job some
seconds later (about 30 on Cloud TPU). The training loop asks `reached(step)` after every step:

- one process: True once SIGTERM has arrived (`install` puts a handler in place that only sets a flag,
  so the step in flight finishes; a second SIGTERM is logged and changes nothing);
- several processes (`jax.distributed` initialised): JAX's preemption sync manager catches SIGTERM on
  any host, and `multihost_utils.reached_preemption_sync_point(step)` is True on every process at the
  same step, so all hosts save the same step together.

The loop then saves a checkpoint at that step, waits for it, and raises `Preempted`; the command line
turns that into exit code `EXIT_CODE` (75, sysexits' EX_TEMPFAIL: "try again"). Running the same command
again resumes from that checkpoint exactly. Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a kill during the save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import signal
import threading

from absl import logging

EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run the same command to resume

_requested = threading.Event()
_installed = False


class Preempted(Exception):
    """Raised by the training loop after the preemption checkpoint is written."""


def _multi_process() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None


def _on_sigterm(signum, frame):
    del frame
    if _requested.is_set():
        logging.warning("signal %d again: already stopping after the current step", signum)
        return
    _requested.set()
    logging.warning("signal %d: stopping after the current step, with a checkpoint", signum)


def install() -> None:
    """Turn SIGTERM into a stop request (single-process runs; JAX's sync manager handles it across
    processes). Only from the main thread; a second call does nothing."""
    global _installed
    if _installed or _multi_process() or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def request() -> None:
    """Ask the loop to stop as SIGTERM would (for embedding code and tests that do not send signals)."""
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    """Forget a request (a process that runs several jobs, such as the reproduction or a test)."""
    _requested.clear()


def reached(step: int) -> bool:
    """True when the loop must save at `step` and stop: on every process at the same step."""
    if _multi_process():
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    return _requested.is_set()
