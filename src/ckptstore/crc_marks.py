"""The CRC32C of any 1 MiB-aligned range of a staged file, without reading it again.

An S3 multipart upload sends each part's CRC32C in its request headers, so the
value must be known before the part's first byte goes out. Reading every part
once to hash it and once more to send it costs a full pass over the file; but
:func:`ckptstore.manifest.hash_file` (the describe step) has just read every
byte for the manifest. While it does, it keeps the running CRC32C at every
1 MiB boundary (4 bytes per MiB) here, and the CRC32C of the range between two
boundaries follows from those two values alone (:func:`part_crcs`).

The marks are found again by the file's identity and state (device, inode,
size, mtime and ctime in nanoseconds), and only for the manifest value the same
pass produced. They are a shortcut, not a proof: a file rewritten in place
within one timestamp tick keeps its stat, so the S3 backend still hashes every
byte it sends and refuses to complete an upload whose bytes differ from the
manifest (and S3 itself refuses a part whose body does not match its CRC32C).
"""

from __future__ import annotations

import collections
import os
import threading
from array import array
from collections.abc import Sequence

#: bytes between two marks: the chunk size of the describe pass
GRAIN = 1024 * 1024
#: files smaller than this go up in one request, which needs no part CRC32C
MIN_SIZE = 5 * 1024 * 1024
#: files whose marks are kept (most recent first out last); 4 bytes per MiB each
MAX_FILES = 256

_POLY = 0x82F63B78  # Castagnoli, bit-reversed (as crc32c computes it)

_Key = tuple[int, int, int, int, int]
_lock = threading.Lock()
_marks: collections.OrderedDict[_Key, tuple[str, array]] = collections.OrderedDict()


def _key(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember(
    before: os.stat_result, after: os.stat_result, crc_hex: str, marks: Sequence[int]
) -> None:
    """Keep ``marks`` (running CRC32C after each full :data:`GRAIN`) for a file just hashed.

    ``before`` and ``after`` are its stat around the pass: a file that changed
    while it was read gets no marks (its upload then hashes it again).
    """
    key = _key(before)
    if key != _key(after) or before.st_size < MIN_SIZE or len(marks) != before.st_size // GRAIN:
        return
    with _lock:
        _marks[key] = (crc_hex, marks if isinstance(marks, array) else array("I", marks))
        _marks.move_to_end(key)
        while len(_marks) > MAX_FILES:
            _marks.popitem(last=False)


def part_crcs(path: str, crc_hex: str, part_size: int) -> list[tuple[int, int, int]] | None:
    """``(offset, length, crc32c)`` of each ``part_size`` part of ``path``, from its marks.

    ``None`` when there are none for the file as it is now, with the manifest
    value ``crc_hex``, or when ``part_size`` is not a multiple of :data:`GRAIN`.
    """
    if part_size <= 0 or part_size % GRAIN:
        return None
    try:
        key = _key(os.stat(path))
    except OSError:
        return None
    with _lock:
        found = _marks.get(key)
    if found is None or found[0] != crc_hex:
        return None
    marks = found[1]
    size = key[2]
    whole = int(crc_hex, 16)
    parts = []
    for offset in range(0, size, part_size):
        length = min(part_size, size - offset)
        start = marks[offset // GRAIN - 1] if offset else 0  # CRC32C of the bytes before
        end = whole if offset + length == size else marks[(offset + length) // GRAIN - 1]
        # crc(A + B) = shift(crc(A), len(B)) ^ crc(B), so crc(B) = crc(A + B) ^ shift(crc(A))
        parts.append((offset, length, end ^ shift(start, length)))
    return parts


def combine(first: int, second: int, second_length: int) -> int:
    """CRC32C of ``A + B`` from ``crc32c(A)``, ``crc32c(B)`` and ``len(B)`` (zlib's method)."""
    return shift(first, second_length) ^ second


def shift(crc: int, length: int) -> int:
    """What ``crc`` (of some ``A``) contributes to the CRC32C of ``A`` followed by ``length``
    bytes: ``crc * x^(8 * length)`` modulo the polynomial (linear in ``crc``)."""
    return _multiply(_x_power_8n(length), crc) if crc and length else crc


def _multiply(a: int, b: int) -> int:
    """``a * b`` modulo the polynomial, both bit-reversed (zlib's ``multmodp``)."""
    m = 1 << 31
    product = 0
    while m:
        if a & m:
            product ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _squares() -> list[int]:
    """``x^(2^k)`` modulo the polynomial, ``k`` = 0..31 (zlib's ``x2n_table``)."""
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multiply(table[-1], table[-1]))
    return table


_X2N = _squares()
_powers: dict[int, int] = {}


def _x_power_8n(length: int) -> int:
    """``x^(8 * length)`` modulo the polynomial (zlib's ``x2nmodp(length, 3)``), cached:
    a multipart upload asks for two lengths (the part size and the last part's)."""
    power = _powers.get(length)
    if power is None:
        power, n, k = 1 << 31, length, 3  # x^0
        while n:
            if n & 1:
                power = _multiply(_X2N[k & 31], power)
            n >>= 1
            k += 1
        if len(_powers) < 1024:
            _powers[length] = power
    return power
