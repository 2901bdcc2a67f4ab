"""Google Cloud Storage (``gs://``, gcsfs).

GCS keeps a CRC32C (and, for non-composite objects, an MD5) of every object and
gcsfs's ``info()`` returns it as base64 of the big-endian value, so a stored
object is verified without reading it back.

Uploads: files under 5 MiB go in one request through gcsfs's ``put_file``. Larger
files go as a resumable upload whose chunks are streamed from the staged file.
gcsfs's own ``put_file`` reads each chunk into ``bytes``, and aiohttp and asyncio
then copy it twice more while it is sent (about +150 MB of peak RSS at gcsfs's
50 MiB chunk). Here the chunk loop is ours, so that each chunk's body can be a
``FilePart``: aiohttp reads it in 1 MiB pieces (file_part.py). The session is still opened,
and each chunk still sent, by gcsfs (``initiate_upload``, ``_request``), which
keeps gcsfs's auth, endpoint and retries (5xx, 408, 429, connection errors;
it rewinds the body before each attempt). Memory no longer grows with the
chunk size, so chunks are gcsfs's 50 MiB by default: each chunk costs a round
trip before the next one starts, so small chunks waste the link.
What still escapes gcsfs's retries is retried here as a whole operation.

Conditional writes (the writer's lease) use object generations, GCS's own
version numbers: a read returns the bytes and the ``x-goog-generation`` of the
same GET; a write is a multipart upload (as gcsfs's own small writes are) with
``ifGenerationMatch`` (``0``: only if no live object exists), which GCS refuses
with 412 when the live generation differs. A generation is never reused.

URLs: ``gs://bucket/prefix``. Credentials: ``storage_options={"token": ...}`` (a
service-account JSON path or dict, ``"google_default"``, ``"cloud"``, ``"anon"``),
else gcsfs's default chain (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import uuid
from typing import Any
from urllib.parse import quote

from fsspec.asyn import sync

from ckptstore.backends.base import Backend
from ckptstore.backends.file_part import FilePart
from ckptstore.manifest import FileEntry

_CHUNK_UNIT = 256 * 1024  # GCS resumable uploads take chunks in multiples of 256 KiB
_SIMPLE_UPLOAD_LIMIT = 5 * 1024 * 1024  # below this, gcsfs sends one request (so do we)


def base64_to_hex(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).hex()
    except (ValueError, TypeError):
        return None


def persisted_bytes(headers: Any) -> int:
    """Bytes GCS holds of a resumable upload, from a 308's ``Range: bytes=0-N``.

    No ``Range`` header means it holds none (Google's resumable-upload protocol).
    """
    value = headers.get("Range")
    if not value:
        return 0
    return int(value.rsplit("-", 1)[1]) + 1


class GCSBackend(Backend):
    transient_errors = (ConnectionError, TimeoutError, asyncio.TimeoutError)
    default_part_size = 50 * 1024 * 1024  # gcsfs's chunk size: few round trips per file
    conditional_writes = "atomic"
    needs_parent_dirs = False  # flat keys
    service_name = "GCS"

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        try:
            headers, data = self.fs.call("GET", self.fs.url(path))
        except FileNotFoundError:
            return None
        generation = headers.get("x-goog-generation")
        if not generation:
            raise OSError(
                f"{self.fs.url(path)} answered without x-goog-generation, so its version is "
                "unknown; is the endpoint a GCS JSON API?"
            )
        return data, generation

    def write_if(self, path: str, data: bytes, expected: str | None) -> str:
        bucket, key, _ = self.fs.split_path(path)
        boundary = uuid.uuid4().hex  # never inside ``data``
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                json.dumps({"name": key}).encode(),
                f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--".encode(),
            )
        )
        try:
            # Through gcsfs's _call: its auth, endpoint and retries. Multipart, as gcsfs's
            # own small writes (fake-gcs-server 1.54 ignores preconditions on uploadType=media).
            reply = self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                uploadType="multipart",
                ifGenerationMatch=expected or "0",
                headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                data=body,
                json_out=True,
            )
        except FileExistsError:  # gcsfs's translation of 412
            return self._refused(path, data)
        finally:
            self.fs.invalidate_cache(path)
        return str(reply["generation"])

    def is_transient(self, exc: BaseException) -> bool:
        if super().is_transient(exc):
            return True
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
        code = getattr(exc, "code", None)  # gcsfs.retry.HttpError
        return isinstance(code, int) and (code >= 500 or code in (408, 429))

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        size = os.path.getsize(local_path)
        if size < _SIMPLE_UPLOAD_LIMIT:  # one small request: gcsfs's put_file as it is
            kwargs = {"callback": callback} if callback is not None else {}
            self.fs.put_file(local_path, remote_path, **kwargs)
            return
        if callback is not None:
            callback.set_size(size)
        sync(self.fs.loop, self._upload_large, local_path, remote_path, size, callback)

    def _chunk_size(self) -> int:
        return max(_CHUNK_UNIT, self.part_size // _CHUNK_UNIT * _CHUNK_UNIT)

    async def _upload_large(
        self, local_path: str, remote_path: str, size: int, callback: Any
    ) -> None:
        from gcsfs.core import initiate_upload

        bucket, key, _ = self.fs.split_path(remote_path)
        chunk, offset = self._chunk_size(), 0
        is_zonal = getattr(self.fs, "_is_zonal_bucket", None)  # gcsfs >= 2025.x, cached
        if is_zonal is not None and await is_zonal(bucket):
            # Zonal buckets take appends over gRPC, not the HTTP protocol below.
            await self.fs._put_file(local_path, remote_path, chunksize=chunk, callback=callback)
            return
        location = await initiate_upload(self.fs, bucket, key, "application/octet-stream")
        try:
            while True:
                length = min(chunk, size - offset)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(length),
                    "Content-Range": f"bytes {offset}-{offset + length - 1}/{size}",
                }
                with FilePart(local_path, offset, length) as body:
                    status, reply, _, _ = await self.fs._request(
                        "POST", location, headers=headers, data=body
                    )
                if status in (200, 201):  # the last byte is in: the object exists
                    break
                # 308: the session goes on from what GCS says it holds, which may be
                # less than was sent (the protocol allows it; the rest is sent again).
                held = persisted_bytes(reply)
                if not offset < held < size:
                    raise ConnectionError(
                        f"GCS reports holding {held} of {size} bytes of {remote_path} after "
                        f"bytes {offset}-{offset + length - 1} were sent (HTTP {status}); "
                        "the file's upload is retried"
                    )
                offset = held
                if callback is not None:
                    callback.absolute_update(offset)
        except BaseException:
            with contextlib.suppress(Exception):  # cancel the session: nothing half-written stays
                await self.fs._call("DELETE", location)
            raise
        if callback is not None:
            callback.absolute_update(size)

    def make_dirs(self, path: str) -> None:
        """Buckets hold flat keys: nothing to create (and creating a bucket is not ours to do)."""

    def stored_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        crc = info.get("crc32c")
        if isinstance(crc, str) and (value := base64_to_hex(crc)) is not None and len(value) == 8:
            return ("crc32c", value)
        return None

    def remove_empty_dir(self, path: str) -> bool:
        return False  # flat keys: no directory to remove
