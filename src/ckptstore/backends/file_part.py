"""A byte range of a staged file, as a request body that is read from disk as it is sent.

S3 parts and GCS resumable chunks are sent with this as the body, so neither
botocore nor aiohttp ever holds a part in memory: both read seekable file
objects in pieces, and rewind them to retry a request. Written by hand
because fsspec has no such view (its ``LocalFileOpener`` is the whole file).

aiohttp sends a file-like body by reading it in its thread pool, one 256 KiB
piece per round trip from the event loop (``IOBasePayload``): about 4,000
round trips per GB, each a few dozen microseconds of Python. A ``FilePart``
is sent by :class:`FilePartPayload` instead: 1 MiB pieces, each
read by a pool thread straight into a buffer the event loop allocated. A fresh
buffer per piece, because the transport may keep a reference to one it has not
sent yet; allocated on the loop's thread, because buffers malloc'd in the pool's
threads and freed in the loop's stay in the pool threads' malloc arenas: peak
RSS of a 4-part upload grew by 16 MB that way, 4.6 MB this way (aiohttp's own
pieces: 7.7 MB; tests/test_cloud_faults.py allows 16 MiB).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import crc32c

#: bytes aiohttp reads from a FilePart per round trip to its thread pool
SEND_CHUNK = 1024 * 1024


class FilePart(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, read from disk as they are sent.

    Seekable and sized, so botocore can hash it for the signature, botocore and
    aiohttp can send it, and both can rewind it for a retry, without the part
    ever being held in memory. Use it in a ``with`` block: that closes the file.

    With ``track_crc32c``, the CRC32C of the bytes read in order from the start
    is kept as they are read (:attr:`crc32c_read`): what was sent, not what the
    file held when it was hashed.
    """

    def __init__(self, path: str, offset: int, length: int, *, track_crc32c: bool = False):
        super().__init__()
        # Unbuffered: every read is one read(2) straight into the caller's buffer, and
        # a sender's reads are large already (a buffer would only add a copy).
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in __exit__
        self._offset, self._length, self._pos = offset, length, 0
        self._file.seek(offset)
        self._track = track_crc32c
        self._crc, self._crc_end = 0, 0  # CRC32C of bytes [0, _crc_end) of the part

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        data = self._file.read(size) if size else b""
        self._advance(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        left = self._length - self._pos
        if len(view) > left:
            view = view[:left]
        n = self._file.readinto(view) if len(view) else 0
        self._advance(view[:n])
        return n

    def _advance(self, data: bytes | memoryview) -> None:
        if self._track and self._pos == self._crc_end:  # reading on in order
            self._crc = crc32c.crc32c(data, self._crc)
            self._crc_end += len(data)
        self._pos += len(data)

    @property
    def crc32c_read(self) -> int | None:
        """CRC32C of the whole part as last read from its start; ``None`` if it was not."""
        return self._crc if self._track and self._crc_end == self._length else None

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        self._file.seek(self._offset + self._pos)
        if self._pos == 0:  # a rewind (a retry): the bytes are read, and hashed, again
            self._crc, self._crc_end = 0, 0
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        """Ignored: aiohttp closes a body once sent, and gcsfs retries with the same one.

        The file is closed when the ``with`` block that opened the part ends.
        """

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        super().close()


try:
    from aiohttp import payload as _payload
except ImportError:  # only the S3 and GCS backends send FileParts, through aiohttp
    _payload = None  # type: ignore[assignment]

if _payload is not None:

    class FilePartPayload(_payload.IOBasePayload):
        """aiohttp's body for a :class:`FilePart`: its file payload, in larger pieces.

        Registered for ``FilePart`` only (aiobotocore hands aiohttp a transparent
        proxy of it, which ``isinstance`` still sees as one); every other body is
        sent as aiohttp would.
        """

        def __init__(self, value: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(value, *args, **kwargs)
            self._start = value.tell()  # where each send starts (a redirect resends it)

        @property
        def size(self) -> int | None:
            return len(self._value) - self._start

        async def write_with_length(self, writer: Any, content_length: int | None) -> None:
            loop = asyncio.get_running_loop()
            part = self._value
            part.seek(self._start)  # lseek only: no I/O to keep off the loop
            left = self.size if content_length is None else min(content_length, self.size)
            while left > 0:
                chunk = bytearray(min(SEND_CHUNK, left))
                n = await loop.run_in_executor(None, part.readinto, chunk)
                if not n:
                    return  # the file is shorter than it was: the server sees a short body
                await writer.write(chunk if n == len(chunk) else memoryview(chunk)[:n])
                left -= n

    _payload.register_payload(FilePartPayload, FilePart, order=_payload.Order.try_first)
