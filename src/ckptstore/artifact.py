"""The steps every artifact goes through, whatever its format: upload, verify, retire.

Checkpoints (:mod:`ckptstore.uploader`), SavedModels (:mod:`ckptstore.saved_model`)
and Keras files (:mod:`ckptstore.keras`) are all *artifacts*: a set of files
under one name, described by one manifest (:mod:`ckptstore.manifest`). They
share these steps, so they share one kill-safety story:

1. every file is uploaded, then verified against the manifest;
2. files a format reads as "complete" (a SavedModel's ``saved_model.pb``, which
   TF Serving takes as the sign that a version is ready) go up only after the
   rest of the data is verified;
3. the manifest is committed last (by the caller, after proving it still owns
   the run where there is an owner);
4. retiring deletes the manifest first, then the files, the "complete" ones first.

A process killed anywhere in between leaves data without a manifest: never
loaded, and cleaned by the next writer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ckptstore import manifest as mf
from ckptstore.manifest import FileEntry, Manifest
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.retry import RetryPolicy

T = TypeVar("T")

#: files of a kind that go up after all the others (and are deleted before them)
UPLOAD_LAST: dict[str, tuple[str, ...]] = {
    mf.SAVED_MODEL: ("saved_model.pb", "saved_model.pbtxt"),
}

#: ``call(what, operation)``: runs one remote operation with the caller's retries
Call = Callable[[str, Callable[[], Any]], Any]


def caller(remote: Remote, redactor: Redactor, retry: RetryPolicy) -> Call:
    """A :data:`Call` running each operation on ``remote`` with ``retry``'s retries.

    Failures name what was being done and the URL, with credentials scrubbed.
    """

    def call(what: str, operation: Callable[[], T]) -> T:
        return retry.call(
            operation,
            is_transient=remote.backend.is_transient,
            what=f"{what} ({remote.url})",
            scrub=redactor.scrub,
        )

    return call


def run_in_threads(work: Callable[[T], None], items: list[T], limit: int) -> None:
    """Run ``work`` on every item with at most ``limit`` threads; re-raise the first error.

    Written by hand instead of using ``concurrent.futures``: that module refuses
    new work once interpreter shutdown has begun, which is exactly when the
    exit drain uploads a script's last checkpoint.
    """
    todo = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                item = todo.pop(0)
            try:
                work(item)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

    threads = [
        threading.Thread(target=worker, name="ckptstore-put", daemon=True)
        for _ in range(max(1, min(limit, len(items))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def upload_groups(manifest: Manifest) -> list[list[FileEntry]]:
    """The files of ``manifest`` in upload order: groups one after another, each in parallel."""
    last = UPLOAD_LAST.get(manifest.kind, ())
    first = [e for e in manifest.files if e.name not in last]
    final = [e for e in manifest.files if e.name in last]
    return [group for group in (first, final) if group]


def delete_order(manifest: Manifest) -> list[str]:
    """Stored names of ``manifest`` in the order to delete them: "complete" markers first."""
    groups = upload_groups(manifest)
    return [e.name for group in reversed(groups) for e in group]


def upload_verified(
    remote: Remote,
    manifest: Manifest,
    local_dir: str,
    *,
    call: Call,
    concurrency: int,
    progress: Callable[[], Any] | None = None,
    on_verified: Callable[[FileEntry], None] | None = None,
) -> None:
    """Upload every file of ``manifest`` from ``local_dir`` and verify each stored copy.

    Does not commit: the caller writes the manifest once this returns (after
    proving it may). ``progress()`` makes a fresh fsspec callback per file.

    Raises:
        VerificationError: a stored copy does not match after the upload.
    """

    def send(entry: FileEntry) -> None:
        local = os.path.join(local_dir, *manifest.local_name(entry).split("/"))
        callback = progress() if progress is not None else None
        call(f"upload {entry.name}", lambda: remote.upload(local, entry, callback))
        call(f"verify {entry.name}", lambda: remote.verify(entry))
        if on_verified is not None:
            on_verified(entry)

    for group in upload_groups(manifest):
        run_in_threads(send, group, concurrency)


def retire(remote: Remote, manifest: Manifest, *, call: Call) -> None:
    """Withdraw a committed artifact: its manifest first, then its files."""
    call(f"retire {manifest.name}", lambda: remote.uncommit(manifest.name))
    call(f"delete {manifest.name}", lambda: remote.delete_data(delete_order(manifest)))


def stale_files(old: Manifest, new: Manifest) -> list[str]:
    """Files of ``old`` that ``new`` (the same name, saved again) no longer has."""
    keep = {e.name for e in new.files}
    return [name for name in delete_order(old) if name not in keep]
