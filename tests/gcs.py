"""A real Google Cloud Storage JSON API on 127.0.0.1 for the gs:// tests: gcp-storage-emulator, in this
process, on a free port, with every client pointed at it through its standard emulator setting.

Three gaps of the emulator are filled here, each the behaviour of the real service:
- the `moveTo` endpoint that gcsfs uses for renames (the emulator answers 501; gcsfs then retries for
  about 33 s before copying): served as copy + delete;
- the create-only precondition `ifGenerationMatch=0` of an upload (the emulator ignores it): an
  existing object answers 412, as GCS does. The workdir lock relies on it;
- the `x-goog-generation` header of a media download, from which tensorstore (orbax's OCDBT checkpoints)
  reads the generation it writes conditionally against ("Malformed StorageGeneration" without it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from http import HTTPStatus

BUCKET = "codi-test"


def _patch_emulator():
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import Conflict, NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_codi_patched", False):
        return

    def move(request, response, storage, *args, **kwargs):
        bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:
            moved = objects._copy(request.base_url, storage, bucket, src, bucket, dst)
            storage.delete_file(bucket, src)
            response.json(moved)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
        except Conflict as err:
            objects._handle_conflict(response, err)

    original_insert = objects.insert

    def insert(request, response, storage, *args, **kwargs):
        multipart = request.query.get("uploadType", [""])[0] == "multipart"
        if multipart and request.query.get("ifGenerationMatch", [""])[0] == "0":
            name = request.query.get("name", [None])[0]
            if name is None and isinstance(request.data, dict):
                name = (request.data.get("meta") or request.data).get("name")
            with contextlib.suppress(NotFound):
                storage.get_file_obj(request.params["bucket_name"], name)
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return original_insert(request, response, storage, *args, **kwargs)

    objects.insert = insert

    original_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        result = original_download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(NotFound):  # GCS names the object's generation on every media read
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj.get("metageneration", "1")
        return result

    objects.download = download
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is original_insert:
                handlers[method] = insert
            elif fn is original_download:
                handlers[method] = download
    move_routes = tuple(
        (
            rf"^{re.escape(prefix)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
            rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
            {server.POST: move},
        )
        for prefix in (server.settings.API_ENDPOINT, "")
    )
    server.HANDLERS = move_routes + tuple(server.HANDLERS)

    class QuietHandler(server.RequestHandler):  # clients that close early are not errors
        def handle(self):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                super().handle()

    server.RequestHandler = QuietHandler
    server._codi_patched = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(port: int) -> dict:
    """The settings that point each client at the emulator (subprocesses inherit them)."""
    url = f"http://127.0.0.1:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, gcsfs (epath, orbax's metadata, JAX's cache)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax's arrays)
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp (array_record's reader)
        "GOOGLE_CLOUD_PROJECT": "codi-test",
        # gcsfs otherwise probes each bucket over gRPC first (~60 s against an emulator); read at import
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@contextlib.contextmanager
def emulator():
    """Yields the emulator's environment with os.environ set to it; the bucket BUCKET exists."""
    from gcp_storage_emulator.server import create_server

    _patch_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = environment(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
