"""Google Cloud Storage (``gs://``, gcsfs).

GCS keeps a CRC32C (and, for non-composite objects, an MD5) of every object and
gcsfs's ``info()`` returns it as base64 of the big-endian value, so a stored
object is verified without reading it back. Uploads are gcsfs's own (resumable
for large files), in chunks of ``upload_part_size`` (8 MiB) rather than gcsfs's
50 MiB: gcsfs holds about three copies of a chunk in memory while it is sent.
gcsfs retries 5xx, 408, 429 and connection errors itself; what still escapes
after its retries is retried here as a whole operation.

URLs: ``gs://bucket/prefix``. Credentials: ``storage_options={"token": ...}`` (a
service-account JSON path or dict, ``"google_default"``, ``"cloud"``, ``"anon"``),
else gcsfs's default chain (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud, metadata).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from ckptstore.backends.base import Backend
from ckptstore.manifest import FileEntry

_CHUNK_UNIT = 256 * 1024  # GCS resumable uploads take chunks in multiples of 256 KiB


def base64_to_hex(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).hex()
    except (ValueError, TypeError):
        return None


class GCSBackend(Backend):
    transient_errors = (ConnectionError, TimeoutError, asyncio.TimeoutError)

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
        chunk = max(_CHUNK_UNIT, self.part_size // _CHUNK_UNIT * _CHUNK_UNIT)
        kwargs = {"callback": callback} if callback is not None else {}
        self.fs.put_file(local_path, remote_path, chunksize=chunk, **kwargs)

    def make_dirs(self, path: str) -> None:
        """Buckets hold flat keys: nothing to create (and creating a bucket is not ours to do)."""

    def stored_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        crc = info.get("crc32c")
        if isinstance(crc, str) and (value := base64_to_hex(crc)) is not None and len(value) == 8:
            return ("crc32c", value)
        return None
