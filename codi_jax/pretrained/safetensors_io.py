"""safetensors files as numpy arrays, bfloat16 included, with no framework.

The format: an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then the raw bytes. `safetensors.numpy` cannot represent
bfloat16; ml_dtypes (a jax dependency) can, so we read the file ourselves.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from codi_jax import storage

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _parse_header(path: str, raw8: bytes, size: int, read) -> tuple[dict, int]:
    if len(raw8) != 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw8)
    if n > size - 8:
        raise ValueError(f"{path} is not a safetensors file (header length {n} exceeds the file)")
    try:
        return json.loads(read(n)), 8 + n
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (bad header: {e})") from None


def read_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets)."""
    if storage.is_remote(path):
        data = storage.read_bytes(path)
        return _parse_header(path, data[:8], len(data), lambda n: data[8 : 8 + n])[0]
    with open(path, "rb") as f:
        return _parse_header(path, f.read(8), os.path.getsize(path), f.read)[0]


def load(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, in their stored dtypes (local files memory-mapped, then copied;
    gs:// objects read whole)."""
    if storage.is_remote(path):
        data = np.frombuffer(storage.read_bytes(path), dtype=np.uint8)
    else:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    header, start = _parse_header(path, data[:8].tobytes(), len(data), lambda n: data[8 : 8 + n].tobytes())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(data[start + lo : start + hi], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def save(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write tensors as a safetensors file, whole or not at all (storage.write_bytes)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        blob = arr.tobytes()
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with storage.atomic_writer(path) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
