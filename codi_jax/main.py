"""Entry point: `python -m codi_jax.main --config=configs/sr.py:tiny --workdir=DIR`.

`--config=configs/eval.py --config.checkpoint=RUN_DIR` runs the batch evaluation job instead.

`--config` takes `file.py:variant` and `--config.a.b=value` overrides (ml_collections).
Running the same command again resumes from the latest checkpoints. On SIGTERM (preemption) the job
finishes its step, saves a checkpoint and exits with code 75; the same command resumes it.
Multi-host: the same command on every host with `--multihost` (TPU pods and clusters that
JAX detects) or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from codi_jax import logging_utils, preemption
from codi_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sr.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and pictures.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Initialise jax.distributed from the environment (TPU pods, SLURM, ...): one process per host."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 (multi-process without cluster auto-detection)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds without a heartbeat before a lost process makes the others exit with an error."
)
_BREAK_LOCK = flags.DEFINE_bool(
    "break_lock",
    False,
    "Take over WORKDIR/job.lock although it names a job on another host (one that is gone: a crashed VM).",
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(py_logging.Filter):
    """Keep orbax/grain/jax INFO chatter out of the progress log (warnings still pass)."""

    def filter(self, record):
        return record.levelno >= py_logging.WARNING or not any(
            f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "jax", "absl")
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    logging.set_verbosity(logging.INFO)
    if _MULTIHOST.value or _COORDINATOR.value:
        from codi_jax import sharding

        sharding.initialize_distributed(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, heartbeat_timeout_s=_HEARTBEAT.value
        )
    preemption.install()  # SIGTERM: finish the step, save, exit 75 (after jax.distributed: it has its own)
    # Imports after flag parsing: grain wants absl flags parsed first.
    from codi_jax import experiment

    workdir_lib.enable_compilation_cache(_CONFIG.value.compilation_cache_dir, _WORKDIR.value)
    experiment.check_required(_CONFIG.value)  # before printing it: an unset required field cannot print
    logging.info("config:\n%s", _CONFIG.value)
    workdir_lib.check_workdir(_WORKDIR.value)
    try:
        with workdir_lib.job_lock(_WORKDIR.value, _BREAK_LOCK.value):  # one job per workdir
            if _CONFIG.value.get("job") == "eval":  # configs/eval.py: the batch evaluation job
                from codi_jax.evaluation import job

                job.run(_CONFIG.value, _WORKDIR.value)
                return
            experiment.run(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:  # a clean stop with a checkpoint: one line, exit 75 ("run me again")
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(preemption.EXIT_CODE)


def run():
    logging_utils.run_cli(main)  # bad input: one `error: ...` line, exit code 2


if __name__ == "__main__":
    run()
