"""The folders a command writes to: checked once, at the start, in one line."""

from __future__ import annotations

import os
import tempfile


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """Fail at once, in one line, if `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as e:
        raise PermissionError(f"{flag}={workdir} is not writable: {e.strerror or e}") from None
