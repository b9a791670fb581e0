"""`tensorboard` for the test environment only. basicsr-fixed (a test extra: the Real-ESRGAN reference in
tests/test_data.py) requires tb-nightly, a second copy of the tensorboard package: both register the same
plugins, and TensorBoard then refuses to start ("Duplicate plugins for name projector"). This runs the same
server with each plugin taken once. The README's install has one copy and runs the plain command."""

import sys

from tensorboard import default, main

_all = default.get_dynamic_plugins


def _each_once():
    out = []
    for plugin in _all():
        if plugin not in out:
            out.append(plugin)
    return out


if __name__ == "__main__":
    default.get_dynamic_plugins = _each_once
    sys.exit(main.run_main())
