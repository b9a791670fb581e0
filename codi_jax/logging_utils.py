"""Training-time logging: TensorBoard event files and one-line progress reports.

`MetricWriter` writes through tensorboardX, which produces standard TensorBoard
event files without TensorFlow. In multi-host runs construct it with
`enabled=(jax.process_index() == 0)` so only one process writes; a disabled
writer never touches the file system.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping

import numpy as np
from absl import logging

__all__ = ["MetricWriter", "Progress", "format_duration"]


def _images_to_uint8(x) -> np.ndarray:
    """NHWC (or HWC) images in [-1, 1] (float) or uint8 -> uint8 NHWC with 1/3/4 channels."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = np.clip(np.round((np.nan_to_num(x.astype(np.float32)) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected NHWC images with 1, 3 or 4 channels, got shape {x.shape}")
    return x


class MetricWriter:
    """Scalars and images to TensorBoard event files under `logdir`.

    With `enabled=False` (e.g. non-zero JAX processes) every method is a no-op
    and no directory or file is created.
    """

    def __init__(self, logdir: str, enabled: bool = True, flush_secs: int = 30):
        self.logdir = str(logdir)
        self.enabled = bool(enabled)
        self._writer = None
        if self.enabled:
            # Imported lazily so disabled writers (and importing this module) cost nothing.
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Logs each `name -> value` (python/numpy/JAX scalars) at `step`."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(np.asarray(value)), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Logs each `name -> NHWC batch` ([-1, 1] float or uint8) at `step`."""
        if self._writer is None:
            return
        for name, batch in images.items():
            # uint8 is passed so tensorboardX does not rescale ([0, 1] float assumption).
            self._writer.add_images(name, _images_to_uint8(batch), global_step=int(step), dataformats="NHWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """Compact duration: '42s', '4m18s', '2h03m', '1d04h'. Unknown/negative -> '?'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _format_value(value) -> str:
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4g}"


class Progress:
    """Rate-limited progress lines such as
    ``train step 120/1000 (12.0%) | 3.41 steps/s | ETA 4m18s | loss 0.0231 mu 0.012``.

    `update(step, **scalars)` is meant to be called after every (or every k-th)
    training step with the number of completed steps. A line is produced on
    the first call, whenever `step` reaches the next multiple of
    `every_n_steps`, and once at `total_steps`; otherwise `update` returns None.

    Speed is measured over the window since the previous line. The first call
    only starts the clock, because the first step usually includes JIT
    compilation; its line therefore shows no speed/ETA. `start_step` is the
    step counter at (re)start, e.g. restored from a checkpoint; since timing
    starts at the first call, steps done before this run never inflate the
    speed. `clock` (seconds, monotonic) can be injected for tests.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        every_n_steps: int = 100,
        name: str = "train",
        clock: Callable[[], float] = time.monotonic,
        unit: str = "step",
    ):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.every_n_steps = int(every_n_steps)
        self.name = name
        self.unit = unit  # what is counted: 'step' (training), 'record' (data preparation)
        self._clock = clock
        self._first_step: int | None = None  # step/time of the first update call
        self._first_time: float | None = None
        self._last_step = self.start_step  # step/time of the last emitted line
        self._last_time: float | None = None
        self.steps_per_sec: float | None = None  # speed in the latest window

    def _due(self, step: int) -> bool:
        if self._last_time is None:
            return True
        if step >= self.total_steps and self._last_step < self.total_steps:
            return True
        next_mark = (self._last_step // self.every_n_steps + 1) * self.every_n_steps
        return step >= next_mark

    @property
    def average_steps_per_sec(self) -> float | None:
        """Mean speed since the first update call (compile time excluded)."""
        if self._first_time is None or self._last_time is None or self._last_time <= self._first_time:
            return None
        return (self._last_step - self._first_step) / (self._last_time - self._first_time)

    def update(self, step: int, **scalars) -> str | None:
        """Returns (and logs with absl INFO) a progress line if one is due, else None."""
        step = int(step)
        if not self._due(step):
            return None
        now = self._clock()
        if self._last_time is None:
            self._first_step, self._first_time = step, now
            self.steps_per_sec = None
        else:
            dt = now - self._last_time
            ds = step - self._last_step
            self.steps_per_sec = ds / dt if dt > 0 else None
        self._last_step, self._last_time = step, now

        pct = 100.0 * step / self.total_steps if self.total_steps > 0 else 100.0
        parts = [f"{self.name} {self.unit} {step}/{self.total_steps} ({pct:.1f}%)"]
        if self.steps_per_sec:
            remaining = max(self.total_steps - step, 0)
            parts.append(f"{self.steps_per_sec:.2f} {self.unit}s/s")
            parts.append(f"ETA {format_duration(remaining / self.steps_per_sec)}")
        else:
            parts.append(f"-- {self.unit}s/s")
            parts.append("ETA ?")
        if scalars:
            parts.append(" ".join(f"{k} {_format_value(v)}" for k, v in scalars.items()))
        line = " | ".join(parts)
        logging.info("%s", line)
        return line


def one_line_error(e: BaseException) -> str:
    """The useful last line of an error (flag errors embed the config file's traceback)."""
    while e.args and isinstance(e.args[0], BaseException):  # config_flags wraps KeyError in AttributeError
        e = e.args[0]
    if isinstance(e, KeyError) and e.args:
        name, _, hint = str(e.args[0]).partition("\n")
        return f"unknown config field {name} {hint}".strip()
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


# What bad input raises: a mistyped config field or flag value, a missing or unreadable file, an
# invalid choice, a non-finite loss. Anything else is a bug and keeps its traceback.
BAD_INPUT = (ValueError, KeyError, OSError, NotImplementedError, FloatingPointError)


def fail(e: BaseException):
    """The command line's answer to bad input: one `error: ...` line on stderr, exit code 2."""
    print(f"error: {one_line_error(e)}", file=sys.stderr)
    sys.exit(2)


def run_cli(main):
    """`absl.app.run(main)` behind the one command-line error guard of every entry point (training and
    evaluation jobs, sampler, reproduction, diagnose, benchmarks): a bad flag, config field or value or
    a missing file prints one `error: ...` line and exits with code 2, with no traceback."""
    from absl import app, flags

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, KeyError, ValueError, AttributeError) as e:  # config_flags wraps KeyError
            fail(e)

    def guarded(argv):
        try:
            return main(argv)
        except (app.UsageError, *BAD_INPUT) as e:
            fail(e)

    app.run(guarded, flags_parser=parse)
