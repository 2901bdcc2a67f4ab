"""The default backend: what ckptstore needs from any fsspec filesystem.

A service that keeps no checksum of its own is verified by reading each object
back and hashing it (DESIGN.md step 4). Small objects (manifests, the state
file) are written with one ``pipe_file``, which is a single atomic PUT on object
stores and an atomic assignment for ``memory://``; filesystems where a write is
visible while in progress override :meth:`Backend.write_atomic`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import threading
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.callbacks import DEFAULT_CALLBACK

from ckptstore.errors import ConfigurationError, MissingExtraError
from ckptstore.manifest import FileEntry, hash_stream
from ckptstore.redaction import redact_url

_READ_CHUNK = 8 * 1024 * 1024

#: :attr:`Check.method`: the service's own record (size and checksum) was compared, no byte read
SERVICE_CHECKSUM = "service-checksum"
#: :attr:`Check.method`: every byte was read back and hashed
READ_BACK = "read-back"


def mtime_of(info: dict[str, Any]) -> float | None:
    """When an object was last written (seconds since the epoch), from whichever key an
    fsspec client reports it under (``mtime``, S3's ``LastModified``, GCS's ``updated``,
    Drive's ``modifiedDate``, ...); ``None`` when it reports none."""
    for key in ("mtime", "LastModified", "updated", "modifiedDate", "modified", "created"):
        value = info.get(key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            return value.timestamp()
    return None


@dataclasses.dataclass(frozen=True)
class Check:
    """How one stored object was compared with its manifest entry, and what was found.

    ``problem`` is ``None`` when the object matches. ``detail`` says which
    checksum was compared (``"S3 CRC32C"``), or why the object had to be read
    back (the service keeps no checksum, or one that cannot be compared).
    """

    problem: str | None
    method: str  # SERVICE_CHECKSUM or READ_BACK
    detail: str = ""


class PreconditionFailed(Exception):
    """A conditional write lost: the object was not in the state the writer expected.

    Raised by :meth:`Backend.write_if`. Not an error of the service: another
    process wrote the object first, and the caller (:mod:`ckptstore.ownership`)
    re-reads it to learn who.
    """


def content_version(data: bytes) -> str:
    """A version token for backends that keep none: the content's SHA-256.

    Lease records carry a writer id and a sequence number, so two different
    writes never share content (and so never share this token).
    """
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Backend:
    """fsspec filesystem plus the few facts ckptstore needs about its service."""

    #: Whether manifests must carry MD5 because the service reports only that.
    needs_md5 = False
    #: Errors worth retrying with backoff; anything else fails the operation at once.
    transient_errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    #: bytes per part (or chunk) where the backend uploads in parts, unless the user says
    #: (``None``: the backend chooses per file, as S3's ``part_size_for`` does)
    default_part_size: int | None = 8 * 1024 * 1024
    #: Whether a nested file (a SavedModel's ``variables/...``) needs its directory made
    #: first: object stores have flat keys, filesystems and Drive have folders.
    needs_parent_dirs = True
    #: how messages name the service ("S3", "GCS"); the fsspec protocol when unset
    service_name: str | None = None

    def __init__(self, fs: AbstractFileSystem):
        self.fs = fs
        #: parts of one file in flight at once, where the backend uploads in parts
        self.concurrency = 4
        #: bytes per part, where the backend uploads in parts (``None``: chosen per file)
        self.part_size: int | None = self.default_part_size

    @classmethod
    def connect(cls, url: str, protocol: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
        """Build the filesystem for ``url``; return ``(backend, root path inside it)``."""
        shown = redact_url(url)
        try:
            fs_class = fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            raise MissingExtraError(f"{shown}: {exc}") from None
        try:
            fs = fs_class(**storage_options)
        except TypeError as exc:
            raise ConfigurationError(
                f"storage_options for {shown} were not accepted by {fs_class.__name__}: {exc}. "
                "Check the option names against that filesystem's documentation."
            ) from None
        root = fs._strip_protocol(url).rstrip("/")
        if not root or root in (".",):
            raise ConfigurationError(
                f"{shown} names no directory; give a path, e.g. {protocol}://bucket/run-1"
            )
        return cls(fs), root

    def __repr__(self) -> str:  # never shows storage_options: they may hold credentials
        return f"{type(self).__name__}(protocol={self.protocol!r})"

    @property
    def protocol(self) -> str:
        p = self.fs.protocol
        return p[0] if isinstance(p, (tuple, list)) else p

    def is_transient(self, exc: BaseException) -> bool:
        """Whether retrying the failed operation may succeed."""
        return isinstance(exc, self.transient_errors)

    def make_dirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    # --- conditional writes (the writer's lease, ckptstore.ownership) --------------
    #
    # Two calls are all the lease needs: read an object with a version token, and
    # write it only if it is still at that version (or, with ``expected=None``, only
    # if it does not exist). A backend overrides both with the service's own
    # preconditions; the default here is a check-then-write, atomic only within one
    # process (``memory://``), and :attr:`conditional_writes` says so.

    #: What :meth:`write_if` guarantees against another *machine*: ``"atomic"``
    #: (the service enforces the precondition), ``"settled"`` (a race is detected
    #: right after it and exactly one side keeps the lease), or ``"best-effort"``
    #: (check, then write: two writers racing within a few milliseconds can both win).
    conditional_writes = "best-effort"
    _cas_lock = threading.Lock()  # makes the default atomic within one process

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and a version token, or ``None`` when it does not exist.

        The token is opaque to callers; :meth:`write_if` compares it.
        """
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, content_version(data)

    def write_if(self, path: str, data: bytes, expected: str | None) -> str:
        """Write a small object only if it is still at version ``expected``.

        ``expected=None`` means "only if it does not exist". Returns the new
        version token. Raises :class:`PreconditionFailed` when the object is not
        in the expected state (another process wrote it first), unless it already
        holds exactly ``data``: an earlier attempt of this write landed (see
        :meth:`_refused`), and its version is returned.
        """
        with self._cas_lock:
            return self._compare_and_write(path, data, expected)

    def _compare_and_write(self, path: str, data: bytes, expected: str | None) -> str:
        """Read, compare, write: atomic only while the caller holds a lock that excludes
        every other writer of ``path`` (a process lock here, ``flock`` in LocalBackend)."""
        current = self.read_versioned(path)
        if (current[1] if current is not None else None) != expected:
            return self._refused(path, data)
        self.write_atomic(path, data)
        return content_version(data)

    def _refused(self, path: str, data: bytes) -> str:
        """The service refused a conditional write: lost, unless the write was ours after all.

        Clients retry a request whose answer never came (a timeout, a reset
        connection). When the first attempt landed, the retry finds the object
        changed, by us, and is refused. The object then holds exactly ``data``
        (lease records never repeat), and that is a win: return its version.
        """
        current = self.read_versioned(path)
        if current is not None and current[0] == data:
            return current[1]
        raise PreconditionFailed(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write a small object so that readers see all of it or none of it."""
        self.fs.pipe_file(path, data)

    def remove(self, path: str) -> None:
        """Delete one object; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def copy_within(self, source: str, target: str) -> bool:
        """Copy one stored object to another name inside the service (no download).

        Returns ``False`` where the filesystem cannot (the caller uploads instead).
        """
        try:
            self.fs.cp_file(source, target)
        except NotImplementedError:
            return False
        return True

    def remove_empty_dir(self, path: str) -> bool:
        """Remove a directory a retired artifact left empty; ``False`` if it is not empty.

        Object stores have no directories: nothing to do there (they override this).
        """
        try:
            if self.fs.ls(path, detail=False):
                return False
            self.fs.rmdir(path)
        except (FileNotFoundError, NotImplementedError, OSError):
            return False
        return True

    def modified(self, path: str) -> float | None:
        """When the object was last written (seconds since the epoch), if the service says."""
        return mtime_of(self.fs.info(path))

    def download(
        self, remote_path: str, local_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        """Copy the object ``entry`` describes to ``local_path`` (checked by the caller).

        ``callback``: an fsspec callback told of the bytes as they arrive (a progress bar).
        """
        self.fs.get_file(remote_path, local_path, callback=callback or DEFAULT_CALLBACK)

    def upload(
        self, local_path: str, remote_path: str, entry: FileEntry, callback: Any = None
    ) -> None:
        """Copy one staged file to the remote (``entry`` is its manifest line)."""
        self.fs.put_file(local_path, remote_path, callback=callback or DEFAULT_CALLBACK)

    def stored_checksum(self, path: str, info: dict[str, Any]) -> tuple[str, str] | None:
        """``("crc32c" | "md5", hex)`` as the service records it, or ``None`` if it keeps none."""
        return None

    def verify(self, path: str, entry: FileEntry) -> str | None:
        """Compare the stored object with its manifest entry.

        Returns ``None`` when it matches, else a sentence saying what differs.
        """
        return self.check(path, entry).problem

    def check(self, path: str, entry: FileEntry, *, deep: bool = False) -> Check:
        """Compare the stored object with its manifest entry, and say how.

        The service's own checksum where it keeps one that matches the
        manifest's kind, else a read-back. ``deep`` reads every byte back and
        hashes it as well, once the service's record matched.
        """
        found = self._check(path, entry)
        if not deep or found.problem is not None or found.method == READ_BACK:
            return found
        detail = f"{found.detail} matched too" if found.detail else ""
        return Check(self._verify_by_reading_back(path, entry), READ_BACK, detail)

    def _check(self, path: str, entry: FileEntry) -> Check:
        """What :meth:`check` does without ``deep``; backends override this."""
        info = self.fs.info(path)
        size = info.get("size")
        if size is not None and size != entry.size:
            return Check(
                f"{entry.name}: stored size {size} != manifest size {entry.size}",
                SERVICE_CHECKSUM,
                "stored size",
            )
        stored = self.stored_checksum(path, info)
        if stored is not None:
            kind, value = stored
            expected = entry.crc32c if kind == "crc32c" else entry.md5
            label = f"{self.service_name or self.protocol} {kind.upper()}"
            if expected is not None:
                if value.lower() != expected:
                    return Check(
                        f"{entry.name}: stored {kind} {value} != manifest {expected}",
                        SERVICE_CHECKSUM,
                        label,
                    )
                return Check(None, SERVICE_CHECKSUM, label)
        return Check(
            self._verify_by_reading_back(path, entry),
            READ_BACK,
            "the service keeps no checksum to compare",
        )

    def _verify_by_reading_back(self, path: str, entry: FileEntry) -> str | None:
        with self.fs.open(path, "rb", block_size=_READ_CHUNK) as stream:
            got = hash_stream(stream, entry.name)
        if got.size != entry.size:
            return f"{entry.name}: read back {got.size} bytes, manifest says {entry.size}"
        if got.crc32c != entry.crc32c:
            return f"{entry.name}: read-back crc32c {got.crc32c} != manifest {entry.crc32c}"
        return None
