"""Entry point: `python -m codi_jax.main --config=configs/sr.py:tiny --workdir=DIR`.

`--config` takes `file.py:variant` and `--config.a.b=value` overrides (ml_collections).
Running the same command again resumes from the latest checkpoints.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sr.py:tiny.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from codi_jax import experiment  # after flag parsing: grain wants absl flags parsed first

    logging.info("config:\n%s", _CONFIG.value)
    experiment.run(_CONFIG.value, _WORKDIR.value)


def run():
    try:
        app.run(main)
    except (ValueError, KeyError, AttributeError, PermissionError, FileNotFoundError, NotImplementedError,
            FloatingPointError) as e:
        # Bad input: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
