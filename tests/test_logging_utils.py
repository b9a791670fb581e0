"""Tests for codi_jax.logging_utils (TensorBoard writer and progress lines)."""

import io
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from codi_jax import logging_utils
from codi_jax.logging_utils import MetricWriter, Progress, format_duration


def _read_events(logdir):
    """Parses every TFRecord in the event files of `logdir` (no TensorBoard needed).

    Record framing: uint64 length, uint32 masked CRC32C of the length bytes,
    payload, uint32 masked CRC32C of the payload (all little endian).
    """
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    events = []
    for f in files:
        buf = f.read_bytes()
        pos = 0
        while pos < len(buf):
            header = buf[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            (len_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
            assert len_crc == masked_crc32c(header)
            payload = buf[pos + 12 : pos + 12 + length]
            (data_crc,) = struct.unpack("<I", buf[pos + 12 + length : pos + 16 + length])
            assert data_crc == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            pos += 16 + length
        assert pos == len(buf)
    return events


def _values(events):
    return [(e.step, v) for e in events if e.HasField("summary") for v in e.summary.value]


def test_metric_writer_scalars_round_trip(tmp_path):
    import jax.numpy as jnp

    writer = MetricWriter(str(tmp_path))
    writer.write_scalars(10, {"train/loss": 0.5, "lr": np.float32(1e-3)})
    writer.write_scalars(20, {"train/loss": jnp.asarray(0.25)})
    writer.flush()
    writer.close()
    writer.close()  # idempotent

    scalars = {(step, v.tag): v.simple_value for step, v in _values(_read_events(tmp_path))}
    assert scalars == {
        (10, "train/loss"): pytest.approx(0.5),
        (10, "lr"): pytest.approx(1e-3),
        (20, "train/loss"): pytest.approx(0.25),
    }


def test_metric_writer_images_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, size=(1, 9, 7, 3)).astype(np.float32)
    gray = rng.integers(0, 256, size=(2, 5, 6, 1), dtype=np.uint8)
    with MetricWriter(str(tmp_path)) as writer:
        writer.write_images(3, {"samples": img, "gray": gray})

    images = {v.tag: (step, v.image) for step, v in _values(_read_events(tmp_path))}
    assert set(images) == {"samples", "gray"}
    step, summary_img = images["samples"]
    assert step == 3 and (summary_img.height, summary_img.width) == (9, 7)
    decoded = np.asarray(Image.open(io.BytesIO(summary_img.encoded_image_string)).convert("RGB"))
    expected = np.clip(np.round((img[0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)  # [-1, 1] mapped to uint8, PNG lossless
    _, gray_img = images["gray"]
    assert gray_img.height == 5 and gray_img.width == 12  # tensorboardX tiles the batch side by side


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "never"
    writer = MetricWriter(str(logdir), enabled=False)
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((1, 4, 4, 3), np.float32)})
    writer.flush()
    writer.close()
    assert not logdir.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_images_rejects_bad_shape(tmp_path):
    with MetricWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError):
            writer.write_images(0, {"x": np.zeros((1, 4, 4, 2), np.float32)})


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0s"),
        (42.4, "42s"),
        (258, "4m18s"),
        (3600, "1h00m"),
        (3725, "1h02m"),
        (90000, "1d01h"),
        (float("inf"), "?"),
        (float("nan"), "?"),
        (-1, "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_rate_eta_and_cadence(monkeypatch):
    logged = []
    monkeypatch.setattr(logging_utils.logging, "info", lambda fmt, *args: logged.append(fmt % args))
    clock = FakeClock()
    prog = Progress(1000, every_n_steps=100, name="train", clock=clock)

    clock.t = 30.0  # first step finished after a long JIT compile
    first = prog.update(1, loss=0.02311, mu=0.012)
    assert first == "train step 1/1000 (0.1%) | -- steps/s | ETA ? | loss 0.02311 mu 0.012"

    lines = {}
    for step in range(2, 1001):
        clock.t += 0.25  # 4 steps/s after compilation
        line = prog.update(step, loss=0.0231, mu=0.012)
        if line is not None:
            lines[step] = line
    assert sorted(lines) == list(range(100, 1001, 100))
    # Window 1..100 took 99 steps in 24.75 s: compile time is not counted.
    assert lines[100] == "train step 100/1000 (10.0%) | 4.00 steps/s | ETA 3m45s | loss 0.0231 mu 0.012"
    assert "ETA 1m15s" in lines[700]  # 300 steps left at 4 steps/s
    assert lines[1000].startswith("train step 1000/1000 (100.0%) | 4.00 steps/s | ETA 0s")
    assert prog.steps_per_sec == pytest.approx(4.0)
    assert prog.average_steps_per_sec == pytest.approx(4.0)
    assert logged == [first] + [lines[s] for s in sorted(lines)]


def test_progress_window_rate_changes_and_sparse_updates():
    clock = FakeClock()
    prog = Progress(1000, start_step=500, every_n_steps=50, name="distill", clock=clock)
    assert prog.update(510) is not None  # first call of a resumed run starts the clock
    clock.t = 20.0
    assert prog.update(540) is None  # 540 < 550: not due, and no clock read needed
    line = prog.update(560)  # updates may skip steps; the multiple of 50 was crossed
    assert line is not None and line.startswith("distill step 560/1000 (56.0%) | 2.50 steps/s")
    assert "ETA 2m56s" in line  # 440 steps / 2.5 steps/s = 176 s
    clock.t = 30.0
    line = prog.update(610)  # window 560..610: 50 steps in 10 s
    assert "5.00 steps/s" in line and "ETA 1m18s" in line
    clock.t = 31.0
    assert prog.update(640) is None


def test_progress_final_step_reported_off_cadence():
    clock = FakeClock()
    prog = Progress(120, every_n_steps=50, clock=clock)
    emitted = []
    for step in range(1, 121):
        clock.t += 0.5
        if prog.update(step, loss=1.0) is not None:
            emitted.append(step)
    assert emitted == [1, 50, 100, 120]
    assert prog.update(120) is None  # the final line is not repeated
