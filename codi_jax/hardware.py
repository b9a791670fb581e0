"""What an accelerator holds and computes: memory per device, peak bf16 FLOP/s, and whether a compiled
step fits.

A real GPU or TPU reports its memory (`device.memory_stats()['bytes_limit']`); the abstract devices of
a TPU topology compiled for ahead of time (`jax.experimental.topologies`) report nothing, so their
memory comes from the chip's published figure below. A CPU device holds its share of the host's
physical memory (N simulated devices share one host): a step larger than that would be killed by the
operating system, or crawl in swap, after minutes of setup.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    memory_bytes: int  # HBM per JAX device (per chip; v4 and v5p as megacore: one device per chip)
    peak_flops: float  # dense bf16 FLOP/s per device


# Published per-chip figures (Google Cloud TPU and NVIDIA data sheets), keyed by `device.device_kind`.
CHIPS = {
    "TPU v4": Chip(32 * GIB, 275e12),
    "TPU v5 lite": Chip(16 * GIB, 197e12),  # v5e
    "TPU v5": Chip(95 * GIB, 459e12),  # v5p
    "TPU v6 lite": Chip(32 * GIB, 918e12),  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": Chip(80 * 10**9, 989e12),
    "NVIDIA H200": Chip(141 * 10**9, 989e12),
    "NVIDIA A100-SXM4-80GB": Chip(80 * 10**9, 312e12),
    "NVIDIA A100-SXM4-40GB": Chip(40 * 10**9, 312e12),
}


def chip(device) -> Chip | None:
    return CHIPS.get(getattr(device, "device_kind", ""))


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def process_memory_bytes(pid: int, swapped: bool = False) -> int:
    """A live process's resident memory (Linux /proc; with `swapped`, plus what it has in swap); 0 once it is
    gone or where /proc does not tell."""
    keys = ("VmRSS:", "VmSwap:") if swapped else ("VmRSS:",)
    try:
        with open(f"/proc/{pid}/status") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(keys))
    except OSError:
        return 0


def release_free_host_memory() -> bool:
    """Hand the heap pages this process has freed back to the operating system (glibc's malloc_trim(0)).
    glibc keeps freed blocks for reuse: after the teacher's host copy and the state's initialisation are
    freed, gigabytes stay resident (at SD size, 1.6 of 3.9 GiB dropped on delete, 3.2 after a trim).
    Returns False where the C library has no malloc_trim (not glibc): nothing is done there."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def memory_limit(device) -> int | None:
    """Bytes one device can hold: what the runtime reports, else the chip's published HBM; a CPU device
    its share of the host's physical memory; None for an unknown chip."""
    if getattr(device, "platform", "") == "cpu":
        return host_memory_bytes() // max(1, len(jax.local_devices(backend="cpu")))
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - abstract topology devices have no runtime behind them
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    c = chip(device)
    return None if c is None else c.memory_bytes


def peak_flops(device) -> float | None:
    c = chip(device)
    return None if c is None else c.peak_flops


def step_bytes(stats: dict) -> int:
    """Bytes a compiled step holds on one device at its peak, from XLA's memory analysis: its arguments
    (state and batch), its temporaries, and its outputs less those written into donated arguments."""
    get = lambda k: int(stats.get(k, 0))
    return (
        get("argument_size_in_bytes")
        + get("temp_size_in_bytes")
        + get("output_size_in_bytes")
        - get("alias_size_in_bytes")
        + get("generated_code_size_in_bytes")
    )


class DoesNotFitError(ValueError):
    """A step that needs more memory per device than the device has."""


def what_to_change(stage: str) -> str:
    """The config fields that lower a train step's memory per device, in the order to try them."""
    return (
        f"set model.unet.remat='full' (or 'dots'), a larger FSDP axis (mesh.ici, e.g. '(1,-1,1)'), "
        f"fewer examples per device ({stage}.train.batch_size, or {stage}.train.grad_accum_steps > 1), "
        "or codi.mode='pe'"
    )


def _holder(device) -> str:
    if getattr(device, "platform", "") == "cpu":
        return "a CPU device's share of this host's memory"
    return f"a {device.device_kind}"


def check_fits(stats: dict, device, stage: str) -> None:
    """A one-line DoesNotFitError when the compiled step's bytes per device exceed the device's memory."""
    limit = memory_limit(device)
    if limit is None or "argument_size_in_bytes" not in stats:
        return
    need = step_bytes(stats)
    if need > limit:
        raise DoesNotFitError(
            f"{stage}: the train step needs {need / GIB:.2f} GiB per device (arguments "
            f"{stats['argument_size_in_bytes'] / GIB:.2f}, temporaries {stats.get('temp_size_in_bytes', 0) / GIB:.2f}) "
            f"but {_holder(device)} holds {limit / GIB:.2f} GiB: {what_to_change(stage)}"
        )


def is_out_of_memory(error: Exception) -> bool:
    """XLA's compile-time 'does not fit' (TPU: RESOURCE_EXHAUSTED ... Ran out of memory in memory space hbm)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower()
