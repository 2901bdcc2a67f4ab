"""The manifest: what a committed artifact consists of, and proof of each byte.

An *artifact* is a set of files under one name: a TensorFlow checkpoint
(``ckpt-7.index``, ``ckpt-7.data-*``), a SavedModel (``saved_model.pb``,
``variables/...``, ``assets/...``) or a Keras file (``model-03.keras``). It
exists for a reader only once its manifest is stored beside its data
(``<name>.manifest.json``: ``ckpt-7.manifest.json``, ``model-03.keras.manifest.json``,
``saved_model.manifest.json`` inside an export directory). The manifest lists
every file with its size and CRC32C (the checksum GCS and S3 keep natively; MD5
is added where a backend only keeps that), plus number, step, timestamp,
writer and versions.

Format versions: 1 (checkpoints only: flat names ``<prefix>.<suffix>``) and 2
(adds ``kind``, relative paths inside the artifact, and ``metadata``). Checkpoint
manifests are still written as version 1, so an older ckptstore reads runs
written by this one; SavedModels and Keras files need version 2.

A manifest read from a remote is untrusted input: :meth:`Manifest.from_json`
rejects malformed JSON, unknown format versions, names that could escape the
checkpoint directory and absurd sizes, with an error that says which.

Example::

    >>> m = describe("/tmp/staging", "ckpt-3", number=3, step=300, timestamp=1.0)  # doctest: +SKIP
    >>> Manifest.from_json(m.to_json()) == m                                        # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import uuid
from array import array
from typing import Any, BinaryIO

import crc32c

from ckptstore import crc_marks
from ckptstore.errors import ManifestError

FORMAT = "ckptstore.manifest"
FORMAT_VERSION = 2  # written for SavedModels and Keras files
CHECKPOINT_FORMAT_VERSION = 1  # written for checkpoints: older ckptstore versions read it
READABLE_VERSIONS = (1, 2)
MANIFEST_SUFFIX = ".manifest.json"

#: artifact kinds (``Manifest.kind``)
CHECKPOINT = "checkpoint"
SAVED_MODEL = "saved_model"
KERAS = "keras"
KINDS = (CHECKPOINT, SAVED_MODEL, KERAS)
#: the name of a SavedModel artifact inside its export directory
SAVED_MODEL_NAME = "saved_model"
#: a Keras file overwritten under its own name goes up under this side name first
#: (``best.keras.ckptstore-next``), so a committed copy exists at every instant
KERAS_NEXT_SUFFIX = ".ckptstore-next"
#: where relative paths inside an artifact stop (a SavedModel's assets may nest)
MAX_PATH_DEPTH = 32

# Bounds on untrusted input. No real TensorFlow checkpoint comes near them; a
# manifest that does is corrupt or hostile, and acting on it (allocating,
# downloading, looping) would be the bug.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_FILES = 100_000
MAX_FILE_SIZE = 1 << 50  # 1 PiB
# Hashing reads into one reused buffer of this size. A fresh bytes object per
# chunk would be freed and re-allocated thousands of times per checkpoint, and
# glibc keeps such freed chunks in per-thread arenas: peak RSS grew by tens of MB
# on a 256 MiB checkpoint that way (benchmarks/slow_link.py).
_CHUNK = 1024 * 1024

# One id per process: tells apart two writers that share a host name and pid
# (containers, restarted notebooks).
_SESSION = uuid.uuid4().hex


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, named by its relative POSIX path under the remote root."""

    name: str
    size: int
    crc32c: str  # 8 lowercase hex digits, big-endian, as GCS/S3 define it
    md5: str | None = None  # 32 lowercase hex digits, only where a backend needs it


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to trust a committed artifact."""

    checkpoint: str  # the artifact's name: "ckpt-7", "model-03.keras", "saved_model"
    number: int | None
    step: int | None
    timestamp: float  # the time TensorFlow's state file records for this checkpoint
    files: tuple[FileEntry, ...]
    writer: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    kind: str = CHECKPOINT
    #: what the artifact's format keeps with it (a Keras monitor's best value, ...)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.checkpoint

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def local_name(self, entry: FileEntry) -> str:
        """Where ``entry`` goes under a local directory: its stored name, except the side
        copy of a Keras file (``best.keras.ckptstore-next``), which is the file itself."""
        if self.kind == KERAS:
            return self.checkpoint
        return entry.name

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checkpoint": self.checkpoint,
            "number": self.number,
            "step": self.step,
            "timestamp": self.timestamp,
            "files": [
                {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                for f in self.files
            ],
            "writer": self.writer,
            "versions": self.versions,
        }
        if self.kind == CHECKPOINT and not self.metadata:
            doc["format_version"] = CHECKPOINT_FORMAT_VERSION  # exactly what version 1 wrote
        else:
            doc["kind"] = self.kind
            doc["metadata"] = self.metadata
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, expected_checkpoint: str | None = None) -> Manifest:
        """Parse and validate untrusted manifest bytes.

        Raises:
            ManifestError: naming the first problem found.
        """
        where = f"manifest of {expected_checkpoint!r}" if expected_checkpoint else "manifest"
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{where} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit"
            )
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where} is not valid JSON ({exc}); it is ignored") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"{where} is not a ckptstore manifest (no format={FORMAT!r})")
        version = doc.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise ManifestError(
                f"{where} has format_version {version!r}; this ckptstore reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade ckptstore to read it."
            )
        kind = doc.get("kind", CHECKPOINT) if version >= 2 else CHECKPOINT
        if kind not in KINDS:
            raise ManifestError(
                f"{where} describes a {kind!r}; this ckptstore knows {', '.join(KINDS)}. "
                "Upgrade ckptstore to read it."
            )
        checkpoint = _require(doc, "checkpoint", str, where)
        _check_checkpoint_name(checkpoint, where)
        if expected_checkpoint is not None and checkpoint != expected_checkpoint:
            raise ManifestError(f"{where} describes {checkpoint!r} instead")
        raw_files = _require(doc, "files", list, where)
        if not raw_files or len(raw_files) > MAX_FILES:
            raise ManifestError(f"{where} lists {len(raw_files)} files (expected 1..{MAX_FILES})")
        if kind == KERAS and len(raw_files) != 1:
            raise ManifestError(f"{where} lists {len(raw_files)} files for one Keras file")
        files = []
        seen = set()
        for raw in raw_files:
            entry = _parse_entry(raw, checkpoint, kind, where)
            if entry.name in seen:
                raise ManifestError(f"{where} lists {entry.name!r} twice")
            seen.add(entry.name)
            files.append(entry)
        timestamp = doc.get("timestamp")
        if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
            raise ManifestError(f"{where} has no numeric 'timestamp'")
        return cls(
            checkpoint=checkpoint,
            number=_optional_int(doc.get("number"), "number", where),
            step=_optional_int(doc.get("step"), "step", where),
            timestamp=float(timestamp),
            files=tuple(files),
            writer=doc.get("writer") if isinstance(doc.get("writer"), dict) else {},
            versions=doc.get("versions") if isinstance(doc.get("versions"), dict) else {},
            kind=kind,
            metadata=doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {},
        )


def _require(doc: dict, key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise ManifestError(f"{where} has no valid {key!r} (expected {kind.__name__})")
    return value


def _optional_int(value: Any, key: str, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{where} has a non-integer {key!r}")
    return value


def _check_checkpoint_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00") or os.path.isabs(name):
        raise ManifestError(f"{where} names checkpoint {name!r}, which is not a plain file prefix")


def is_safe_relative_path(path: Any) -> bool:
    """Whether ``path`` is a relative POSIX path that stays inside its directory.

    Segments are separated by ``/`` only; none may be empty, ``.`` or ``..``, and
    no character may be a backslash, a drive colon or a control character. So
    joining it under any directory, on POSIX or Windows, cannot leave that
    directory.
    """
    if not isinstance(path, str) or not path or path.startswith("/"):
        return False
    if any(c in path for c in "\\:") or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    segments = path.split("/")
    return len(segments) <= MAX_PATH_DEPTH and all(s not in ("", ".", "..") for s in segments)


def _belongs(name: Any, checkpoint: str, kind: str) -> bool:
    if not is_safe_relative_path(name):
        return False
    if kind == CHECKPOINT:
        # Checkpoint files are flat siblings named "<prefix>.<suffix>".
        return "/" not in name and name.startswith(checkpoint + ".")
    if kind == KERAS:
        return name in (checkpoint, checkpoint + KERAS_NEXT_SUFFIX)
    # A SavedModel's files are anything under its export directory but ckptstore's own.
    return not name.endswith(MANIFEST_SUFFIX)


def _parse_entry(raw: Any, checkpoint: str, kind: str, where: str) -> FileEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} has a file entry that is not an object")
    name = raw.get("name")
    # Anything with a backslash, a drive, a parent reference or an absolute path could
    # escape the directory it is downloaded into.
    if not _belongs(name, checkpoint, kind):
        raise ManifestError(
            f"{where} names file {name!r}, which escapes or does not belong to the {kind} "
            f"directory; the manifest is rejected"
        )
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_SIZE:
        raise ManifestError(f"{where} gives {name!r} an impossible size {size!r}")
    crc = raw.get("crc32c")
    if not _is_hex(crc, 8):
        raise ManifestError(f"{where} gives {name!r} no valid crc32c (8 hex digits)")
    md5 = raw.get("md5")
    if md5 is not None and not _is_hex(md5, 32):
        raise ManifestError(f"{where} gives {name!r} an invalid md5")
    return FileEntry(name=name, size=size, crc32c=crc.lower(), md5=md5.lower() if md5 else None)


def _is_hex(value: Any, length: int) -> bool:
    if not isinstance(value, str) or len(value) != length:
        return False
    try:
        int(value, 16)
    except ValueError:
        return False
    return True


# --- hashing -----------------------------------------------------------------


class StreamHasher:
    """Incremental size + CRC32C (+ optional MD5), fed chunk by chunk.

    Lets downloads and read-backs hash while data streams, so no file is ever
    held whole in memory.
    """

    def __init__(self, with_md5: bool = False):
        self._crc = 0
        self._md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._crc = crc32c.crc32c(chunk, self._crc)
        if self._md5 is not None:
            self._md5.update(chunk)
        self.size += len(chunk)

    def crc32c_hex(self) -> str:
        return f"{self._crc:08x}"

    def md5_hex(self) -> str | None:
        return self._md5.hexdigest() if self._md5 is not None else None

    def entry(self, name: str) -> FileEntry:
        return FileEntry(name=name, size=self.size, crc32c=self.crc32c_hex(), md5=self.md5_hex())


def hash_stream(stream: BinaryIO, name: str, *, with_md5: bool = False) -> FileEntry:
    """Hash an open binary stream to its end, through one reused buffer."""
    hasher = StreamHasher(with_md5)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    readinto = getattr(stream, "readinto", None)
    if readinto is None:  # a stream without readinto: plain reads
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
        return hasher.entry(name)
    while n := readinto(view):
        hasher.update(view[:n])
    return hasher.entry(name)


def hash_file(path: str, name: str | None = None, *, with_md5: bool = False) -> FileEntry:
    """Size and checksums of a local file, read in 1 MiB chunks into one buffer.

    Also keeps the running CRC32C at every 1 MiB (:mod:`ckptstore.crc_marks`), so
    an upload in parts knows each part's CRC32C without reading the file again.
    """
    hasher = StreamHasher(with_md5)
    marks = array("I")  # 4 bytes per MiB
    view = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as stream:
        before = os.fstat(stream.fileno())
        while n := stream.readinto(view):
            hasher.update(view[:n])
            if hasher.size % crc_marks.GRAIN == 0:
                marks.append(hasher._crc)
        after = os.fstat(stream.fileno())
    entry = hasher.entry(name or os.path.basename(path))
    crc_marks.remember(before, after, entry.crc32c, marks)
    return entry


def checkpoint_files(directory: str, checkpoint: str) -> list[str]:
    """Names of the files TensorFlow wrote for ``checkpoint`` in ``directory``.

    That is ``<prefix>.index`` and every ``<prefix>.data-NNNNN-of-NNNNN`` shard.
    Temporary files TensorFlow leaves while writing (``<prefix>_temp/``) are not
    part of a checkpoint and are not listed.
    """
    names = []
    prefix = checkpoint + "."
    for name in sorted(os.listdir(directory)):
        if not name.startswith(prefix) or name.endswith(MANIFEST_SUFFIX):
            continue
        suffix = name[len(prefix) :]
        if suffix == "index" or suffix.startswith("data-"):
            names.append(name)
    return names


def describe(
    directory: str,
    checkpoint: str,
    *,
    number: int | None,
    step: int | None,
    timestamp: float,
    with_md5: bool = False,
    extra_versions: dict[str, str] | None = None,
) -> Manifest:
    """Build the manifest of a checkpoint TensorFlow finished writing in ``directory``.

    Raises:
        ManifestError: when the checkpoint has no ``.index`` file (not a complete
            TensorFlow checkpoint).
    """
    names = checkpoint_files(directory, checkpoint)
    if checkpoint + ".index" not in names:
        raise ManifestError(
            f"{checkpoint!r} in {directory} has no .index file: it is not a complete checkpoint"
        )
    return describe_files(
        directory,
        checkpoint,
        names,
        kind=CHECKPOINT,
        number=number,
        step=step,
        timestamp=timestamp,
        with_md5=with_md5,
        extra_versions=extra_versions,
    )


def describe_files(
    directory: str,
    name: str,
    files: list[str],
    *,
    kind: str,
    number: int | None = None,
    step: int | None = None,
    timestamp: float,
    with_md5: bool = False,
    extra_versions: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
    stored_names: dict[str, str] | None = None,
) -> Manifest:
    """Hash ``files`` (relative POSIX paths under ``directory``) into an artifact's manifest.

    ``stored_names`` maps a local file to the name it is stored under on the
    remote, where the two differ (the side copy of an overwritten Keras file).

    Raises:
        ManifestError: a path that could escape the directory, or that does not
            belong to an artifact of this kind.
    """
    stored_names = stored_names or {}
    entries = []
    for local in files:
        stored = stored_names.get(local, local)
        if not _belongs(stored, name, kind) or not is_safe_relative_path(local):
            raise ManifestError(f"{local!r} cannot be a file of the {kind} {name!r}")
        path = os.path.join(directory, *local.split("/"))
        entries.append(hash_file(path, stored, with_md5=with_md5))
    from ckptstore import __version__

    versions = {"ckptstore": __version__, "python": platform.python_version()}
    versions.update(extra_versions or {})
    return Manifest(
        checkpoint=name,
        number=number,
        step=step,
        timestamp=timestamp,
        files=tuple(entries),
        writer={"host": socket.gethostname(), "pid": os.getpid(), "session": _SESSION},
        versions=versions,
        kind=kind,
        metadata=dict(metadata or {}),
    )


def tree_files(directory: str) -> list[str]:
    """Every regular file under ``directory`` as a relative POSIX path, sorted.

    Symbolic links are refused rather than followed: an export that links
    outside itself is not something to upload as its own bytes.

    Raises:
        ManifestError: a symbolic link, or a name no remote can hold safely.
    """
    found = []
    for parent, dirs, names in os.walk(directory):
        for entry in dirs + names:
            if os.path.islink(os.path.join(parent, entry)):
                raise ManifestError(
                    f"{os.path.join(parent, entry)} is a symbolic link; ckptstore uploads "
                    "regular files only"
                )
        for entry in names:
            rel = os.path.relpath(os.path.join(parent, entry), directory).replace(os.sep, "/")
            if not is_safe_relative_path(rel):
                raise ManifestError(f"{rel!r} in {directory} is not a name ckptstore can store")
            found.append(rel)
    return sorted(found)


def manifest_name(checkpoint: str) -> str:
    return checkpoint + MANIFEST_SUFFIX


def checkpoint_of_manifest(name: str) -> str | None:
    """``"ckpt-7.manifest.json" -> "ckpt-7"``; ``None`` for any other name."""
    if name.endswith(MANIFEST_SUFFIX) and len(name) > len(MANIFEST_SUFFIX):
        return name[: -len(MANIFEST_SUFFIX)]
    return None


def checkpoint_of_data_file(name: str) -> str | None:
    """``"ckpt-7.index" -> "ckpt-7"``, ``"ckpt-7.data-00000-of-00001" -> "ckpt-7"``."""
    if name.endswith(".index"):
        return name[: -len(".index")]
    head, sep, tail = name.rpartition(".data-")
    if sep and head and "-of-" in tail:
        return head
    return None
