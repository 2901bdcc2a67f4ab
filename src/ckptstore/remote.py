"""The remote layout: where a checkpoint's pieces live, and the operations on them.

One directory (prefix) per manager, laid out exactly as TensorFlow lays out a
local checkpoint directory, plus one manifest per committed checkpoint::

    <root>/ckpt-7.index                      data, uploaded first
    <root>/ckpt-7.data-00000-of-00001        data, uploaded first
    <root>/ckpt-7.manifest.json              the commit: written last, deleted first
    <root>/checkpoint                        TensorFlow's state file, committed checkpoints only

SavedModels and Keras files are artifacts under the same rules
(:mod:`ckptstore.artifact`): a Keras file ``model-03.keras`` sits at the URL the
user gave with ``model-03.keras.manifest.json`` beside it; a SavedModel export
directory holds TensorFlow's tree and ``saved_model.manifest.json``.

Keeping TensorFlow's names means plain ``tf.train.Checkpoint.restore`` works on
the remote (where TensorFlow can read the protocol) and on a copy of it. Every
call here is one step of the data path; retrying, ordering and deciding are the
uploader's and the restorer's job.
"""

from __future__ import annotations

import contextvars
import errno
import os
import posixpath
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fsspec.callbacks import Callback

from ckptstore import ioloop
from ckptstore import manifest as mf
from ckptstore.backends.base import Backend
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.errors import ManifestError, StagingFullError, VerificationError
from ckptstore.manifest import FileEntry, Manifest

STATE_FILE = "checkpoint"
#: what a full disk (or a full quota) answers a write with
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class Remote:
    """A checkpoint directory on some fsspec filesystem."""

    def __init__(self, backend: Backend, root: str, shown_url: str):
        self.backend = backend
        self.fs = backend.fs
        self.root = root
        self.url = shown_url  # credential-free, for messages
        ioloop.install_for(self.fs)
        self._made_dirs: set[str] = set()  # parents of nested files created so far

    def __repr__(self) -> str:
        return f"Remote({self.url!r}, backend={self.backend!r})"

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    # --- listing -----------------------------------------------------------

    def list_names(self) -> list[str]:
        """Base names of every object directly under the root (fresh, not cached)."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        # A set: on Google Drive several files may share one title.
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    def list_tree(self) -> list[str]:
        """Relative paths of every object under the root, at any depth (fresh, not cached)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        names = set()
        for path in found:
            path = self.fs._strip_protocol(str(path))
            if path.startswith(root):
                names.add(path[len(root) :])
        return sorted(names)

    @staticmethod
    def committed_names(names: list[str]) -> list[str]:
        return [c for c in (mf.checkpoint_of_manifest(n) for n in names) if c is not None]

    def read_manifest(self, checkpoint: str) -> Manifest:
        """Read and validate one manifest. Raises ManifestError or FileNotFoundError."""
        with self.fs.open(self.path(mf.manifest_name(checkpoint)), "rb") as f:
            data = f.read(mf.MAX_MANIFEST_BYTES + 1)
        return Manifest.from_json(data, expected_checkpoint=checkpoint)

    def read_manifests(self, checkpoints: list[str]) -> dict[str, Manifest | ManifestError]:
        """Read many manifests concurrently; a bad one maps to its error."""

        def read(name: str) -> Manifest | ManifestError:
            try:
                return self.read_manifest(name)
            except ManifestError as exc:
                return exc

        if not checkpoints:
            return {}
        # Each read in the caller's context (a copy each: one context runs in one thread).
        contexts = [contextvars.copy_context() for _ in checkpoints]
        with ThreadPoolExecutor(max_workers=min(16, len(checkpoints))) as pool:
            found = pool.map(lambda c, name: c.run(read, name), contexts, checkpoints)
            return dict(zip(checkpoints, found))

    def read_state_text(self) -> str | None:
        try:
            with self.fs.open(self.path(STATE_FILE), "rb") as f:
                return f.read(mf.MAX_MANIFEST_BYTES).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None

    # --- writing -------------------------------------------------------------

    def prepare(self) -> None:
        self.backend.make_dirs(self.root)

    def upload(self, local_path: str, entry: FileEntry, callback: Any = None) -> None:
        if "/" in entry.name and self.backend.needs_parent_dirs:
            parent = self.path(posixpath.dirname(entry.name))
            if parent not in self._made_dirs:
                self.backend.make_dirs(parent)
                self._made_dirs.add(parent)
        self.backend.upload(local_path, self.path(entry.name), entry, callback)

    def copy(self, source: str, entry: FileEntry) -> bool:
        """Copy the stored object ``source`` to ``entry.name`` inside the service.

        Returns ``False`` where the filesystem cannot copy (the caller uploads).
        """
        return self.backend.copy_within(self.path(source), self.path(entry.name))

    def verify(self, entry: FileEntry) -> None:
        """Raise VerificationError unless the stored object matches ``entry``."""
        self.fs.invalidate_cache(self.root)
        problem = self.backend.verify(self.path(entry.name), entry)
        if problem is not None:
            raise VerificationError(f"{self.url}: {problem}")

    def commit(self, manifest: Manifest) -> None:
        self.backend.write_atomic(
            self.path(mf.manifest_name(manifest.checkpoint)), manifest.to_json()
        )

    def write_state_text(self, text: str) -> None:
        self.backend.write_atomic(self.path(STATE_FILE), text.encode("utf-8"))

    # --- deleting --------------------------------------------------------------

    def uncommit(self, checkpoint: str) -> None:
        """Delete a manifest: from here on the checkpoint does not exist for readers."""
        self.backend.remove(self.path(mf.manifest_name(checkpoint)))

    def delete_data(self, names: list[str]) -> None:
        for name in names:
            self.backend.remove(self.path(name))
        # Directories a nested artifact left empty (only filesystems that have them).
        parents = {posixpath.dirname(n) for n in names if "/" in n}
        for parent in sorted(parents, key=lambda p: -p.count("/")):
            while parent:
                if not self.backend.remove_empty_dir(self.path(parent)):
                    break
                self._made_dirs.discard(self.path(parent))  # an upload there makes it again
                parent = posixpath.dirname(parent)

    def data_files_of(self, checkpoint: str, names: list[str]) -> list[str]:
        return [n for n in names if mf.checkpoint_of_data_file(n) == checkpoint]

    def describe_stored(
        self, checkpoint: str, names: list[str], *, number: int | None, timestamp: float
    ) -> Manifest | None:
        """Build a manifest by hashing a checkpoint where it is stored; ``None`` if incomplete."""
        files = self.data_files_of(checkpoint, names)
        if checkpoint + ".index" not in files or not _all_shards_present(checkpoint, files):
            return None
        entries = []
        for name in files:
            with self.fs.open(self.path(name), "rb") as stream:
                entries.append(mf.hash_stream(stream, name, with_md5=self.backend.needs_md5))
        return Manifest(
            checkpoint=checkpoint,
            number=number,
            step=None,
            timestamp=timestamp,
            files=tuple(entries),
            writer={"adopted": True},
            versions={},
        )

    # --- downloading -------------------------------------------------------------

    def download_verified(
        self,
        manifest: Manifest,
        staging_dir: str,
        progress: Callable[[], Callback] | None = None,
    ) -> str:
        """Download every file of ``manifest`` into ``staging_dir``, checking each.

        Files land under a temporary name and are renamed into place only after
        all of them matched the manifest, so TensorFlow is never handed a byte
        that did not. Returns the local checkpoint prefix.

        ``progress``, if given, makes a fresh fsspec callback for each file (as
        :func:`ckptstore.artifact.upload_verified` does for uploads): e.g.
        ``Transfer.file`` of :mod:`ckptstore.progress`, for a bar.
        """
        tmp_suffix = f"{TEMP_MARKER}{os.getpid()}"
        placed: list[tuple[str, str]] = []
        free = _free_bytes(staging_dir)
        try:
            for entry in manifest.files:
                tmp = local_path(staging_dir, manifest.local_name(entry)) + tmp_suffix
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                callback = progress() if progress is not None else None
                try:
                    if callback is None:  # as before: backends that predate the callback
                        self.backend.download(self.path(entry.name), tmp, entry)
                    else:
                        self.backend.download(self.path(entry.name), tmp, entry, callback)
                except Exception as exc:
                    full = _out_of_space(exc)
                    if full is None:
                        raise
                    raise _staging_full(full, manifest, self.url, staging_dir, free) from exc
                if callback is not None:
                    # Some clients report nothing (a local copy): count the file once it is here.
                    landed = os.path.getsize(tmp)
                    if landed > callback.value:
                        callback.absolute_update(landed)
                got = mf.hash_file(tmp, entry.name)
                if got.size != entry.size or got.crc32c != entry.crc32c:
                    raise VerificationError(
                        f"{self.url}/{entry.name} does not match its manifest "
                        f"(size {got.size} vs {entry.size}, crc32c {got.crc32c} vs {entry.crc32c})"
                    )
                placed.append((tmp, local_path(staging_dir, manifest.local_name(entry))))
            for tmp, final in placed:
                os.replace(tmp, final)
        finally:
            for tmp, _ in placed:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            for entry in manifest.files:
                leftover = local_path(staging_dir, manifest.local_name(entry)) + tmp_suffix
                if os.path.exists(leftover):
                    os.unlink(leftover)
        return os.path.join(staging_dir, manifest.checkpoint)


def local_path(directory: str, name: str) -> str:
    """``name`` (a relative POSIX path a manifest vouched for) under a local directory.

    Manifests reject paths that could escape; this checks once more, on the
    joined path, because a download must never write outside its directory.
    """
    path = os.path.normpath(os.path.join(directory, *name.split("/")))
    base = os.path.normpath(directory)
    if os.path.commonpath([base, path]) != base or path == base:
        raise VerificationError(f"{name!r} would be written outside {directory}; refused")
    return path


def _free_bytes(directory: str) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _out_of_space(exc: BaseException) -> OSError | None:
    """The "disk full" behind ``exc`` (ENOSPC, EDQUOT), however a client wrapped it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def _staging_full(
    cause: OSError, manifest: Manifest, url: str, staging_dir: str, free: int | None
) -> StagingFullError:
    needed = sum(entry.size for entry in manifest.files)
    had = f"{free:,} bytes were free" if free is not None else "its free space is unknown"
    return StagingFullError(
        cause.errno,
        f"{os.strerror(cause.errno)} in the staging directory {staging_dir}: restoring "
        f"{manifest.checkpoint} from {url} needs {needed:,} bytes there (the checkpoint's "
        f"size) and {had} before the download. Nothing was restored and the partial download "
        "was removed. Free space on that disk, or pass staging_dir= a directory on a disk "
        "with room for it.",
    )


def _all_shards_present(checkpoint: str, files: list[str]) -> bool:
    """Whether every ``.data-0000k-of-0000N`` shard is there, for k < N."""
    shards = [f[len(checkpoint) + len(".data-") :] for f in files if ".data-" in f]
    if not shards:
        return False
    try:
        total = int(shards[0].split("-of-")[1])
        present = {int(s.split("-of-")[0]) for s in shards}
    except (IndexError, ValueError):
        return False
    return present == set(range(total))


def local_file_matches(entry: FileEntry, path: str) -> bool:
    """Whether the local file at ``path`` is exactly what ``entry`` describes (size, CRC32C)."""
    if not os.path.isfile(path) or os.path.getsize(path) != entry.size:
        return False
    return mf.hash_file(path, entry.name).crc32c == entry.crc32c


def local_copy_matches(manifest: Manifest, staging_dir: str) -> bool:
    """Whether ``staging_dir`` already holds exactly the files ``manifest`` lists."""
    paths = [(e, local_path(staging_dir, manifest.local_name(e))) for e in manifest.files]
    # Sizes first, for every file: a missing or short file answers without hashing any.
    if not all(os.path.isfile(p) and os.path.getsize(p) == e.size for e, p in paths):
        return False
    return all(local_file_matches(e, p) for e, p in paths)
