"""A byte range of a staged file, as a request body that is read from disk as it is sent.

S3 parts and GCS resumable chunks are sent with this as the body, so neither
botocore nor aiohttp ever holds a part in memory: both read seekable file
objects in small pieces, and rewind them to retry a request. Written by hand
because fsspec has no such view (its ``LocalFileOpener`` is the whole file).
"""

from __future__ import annotations

import io
from typing import Any


class FilePart(io.RawIOBase):
    """``length`` bytes of a file from ``offset``, read from disk as they are sent.

    Seekable and sized, so botocore can hash it for the signature, botocore and
    aiohttp can send it, and both can rewind it for a retry, without the part
    ever being held in memory. Use it in a ``with`` block: that closes the file.
    """

    def __init__(self, path: str, offset: int, length: int):
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        self._offset, self._length, self._pos = offset, length, 0
        self._file.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        if size is None or size < 0 or size > left:
            size = left
        data = self._file.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + pos), self._length)
        self._file.seek(self._offset + self._pos)
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
