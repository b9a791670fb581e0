"""Every path the project reads or writes, local or `gs://`, through one small layer on etils' epath.

Orbax already stores arrays through tensorstore and epath; this module is for everything else: the
workdir's small files (config.json, metrics.json, compile.json, the lock), pictures, plots, caches,
prepared shards' manifests. Paths stay strings in the rest of the code; `join` keeps a URL a URL.

Small files are written whole or not at all: locally to a temporary name in the same folder, then
renamed over the target (atomic on POSIX filesystems); on an object store by one upload, which
creates the object only when it completes. A crash mid-write never leaves a half-written metrics.json
or manifest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import shutil
import uuid

from etils import epath

REMOTE_PREFIXES = ("gs://",)  # Cloud Storage; other stores epath knows would need their own lock primitive


def is_remote(p) -> bool:
    return str(p).startswith(REMOTE_PREFIXES)


def path(p) -> epath.Path:
    return epath.Path(p)


def join(base, *parts) -> str:
    """os.path.join for local paths; '/'-joined for URLs (gs://bucket/a + b -> gs://bucket/a/b)."""
    if is_remote(base):
        return posixpath.join(str(base), *map(str, parts))
    return os.path.join(base, *parts)


def absolute(p) -> str:
    """An absolute local path (orbax wants one); URLs as they are."""
    return str(p) if is_remote(p) else os.path.abspath(p)


def basename(p) -> str:
    return posixpath.basename(str(p).rstrip("/"))


def dirname(p) -> str:
    return posixpath.dirname(str(p).rstrip("/")) if is_remote(p) else os.path.dirname(p)


def exists(p) -> bool:
    return path(p).exists()


def isfile(p) -> bool:
    return path(p).is_file()


def isdir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """The names in folder `p`, sorted ([] if it does not exist)."""
    d = path(p)
    return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def subfolders(p) -> list[str]:
    """The names of the folders directly in `p`, sorted, hidden ones left out (one listing)."""
    for _, dirs, _ in path(p).walk():
        return sorted(d for d in dirs if not d.startswith("."))
    return []


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (wildcards in any of its parts), sorted."""
    if not is_remote(pattern):
        import glob as glob_lib

        return sorted(glob_lib.glob(pattern))
    parts = pattern.split("/")
    wild = [k for k, part in enumerate(parts) if any(c in part for c in "*?[")]
    if not wild:
        return [pattern] if exists(pattern) else []
    base, rel = "/".join(parts[: wild[0]]), "/".join(parts[wild[0] :])
    return sorted(str(q) for q in path(base).glob(rel))


def walk_files(root, recursive: bool = True, hidden: bool = False) -> list[str]:
    """Every file under folder `root` (any depth, or only its own if not `recursive`), as sorted paths
    relative to it, '/'-separated; hidden files and folders (a leading '.') left out unless `hidden`."""
    key = lambda p: str(p).removeprefix("gs://").rstrip("/")  # gs:// walks name folders without the scheme
    base = key(path(root))
    shown = lambda name: hidden or not name.startswith(".")
    out = []
    for folder, dirs, files in path(root).walk():
        dirs[:] = [d for d in dirs if shown(d)] if recursive else []
        rel = key(folder)[len(base) :].strip("/")
        out += [f"{rel}/{f}" if rel else f for f in files if shown(f)]
    return sorted(out)


def copy(src, dst) -> None:
    """Copy file `src` to `dst` (either local or remote) in 16 MiB pieces, never the whole file in memory
    (shards, model weights); creates dst's folder. Not atomic: callers that need it mark completion with
    a small file written after it (prepare's parts/*.json)."""
    if not is_remote(dst):
        makedirs(os.path.dirname(os.path.abspath(dst)))
        if not is_remote(src):
            shutil.copyfile(src, dst)
            return
    with open_file(src, "rb") as s, path(dst).open("wb") as d:
        while block := s.read(16 << 20):
            d.write(block)


def copy_tree(src, dst) -> list[str]:
    """Copy every file under folder `src` (hidden ones too) to the same place under `dst`; returns them."""
    written = []
    for rel in walk_files(src, hidden=True):
        parts = rel.split("/")
        copy(join(src, *parts), join(dst, *parts))
        written.append(join(dst, *parts))
    return written


def makedirs(p) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def remove(p, missing_ok: bool = True) -> None:
    with contextlib.suppress(FileNotFoundError) if missing_ok else contextlib.nullcontext():
        path(p).unlink()


def move(src, dst) -> None:
    """Rename (local: atomic) or copy-then-delete (object stores: no rename there)."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    if isdir(src):
        copy_tree(src, dst)
        path(src).rmtree()
    else:
        copy(src, dst)
        path(src).unlink()


def open_file(p, mode: str = "rb"):
    return path(p).open(mode)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return path(p).read_text()


def read_json(p):
    return json.loads(read_text(p))


@contextlib.contextmanager
def atomic_writer(p):
    """A binary file object whose contents appear at `p` only when the block ends without an error
    (see the module's docstring); creates the folder. For large files written piece by piece."""
    if is_remote(p):
        buf = io.BytesIO()  # uploaded only on success (a file closed by an error would still be uploaded)
        yield buf
        path(p).write_bytes(buf.getvalue())  # one upload: the object exists only once it is complete
        return
    folder = os.path.dirname(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_bytes(p, data: bytes) -> None:
    """Write `data` to `p` whole or not at all; creates the folder."""
    with atomic_writer(p) as f:
        f.write(data)


def write_text(p, text: str) -> None:
    write_bytes(p, text.encode())


def write_json(p, obj, indent: int | None = 2) -> None:
    write_text(p, json.dumps(obj, indent=indent))


def save_with(p, save) -> str:
    """`save(file_object)` into memory, then one atomic write to `p` (PIL images, matplotlib figures,
    numpy arrays: writers that want a file). Returns `p`."""
    buf = io.BytesIO()
    save(buf)
    write_bytes(p, buf.getvalue())
    return str(p)


def create_exclusive(p, data: bytes) -> bool:
    """Create `p` holding `data` only if it does not exist; False if it does (a lock's primitive).
    Local: O_CREAT | O_EXCL. GCS: an upload with the precondition ifGenerationMatch=0."""
    if not is_remote(p):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    from google.api_core import exceptions
    from google.cloud import storage as gcs

    bucket, _, name = str(p)[len("gs://") :].partition("/")
    blob = gcs.Client().bucket(bucket).blob(name)
    try:
        blob.upload_from_string(data, if_generation_match=0)
    except exceptions.PreconditionFailed:
        return False
    return True
