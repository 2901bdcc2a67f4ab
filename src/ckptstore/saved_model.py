"""SavedModels on the verified path: ``ckptstore.saved_model`` mirrors ``tf.saved_model``.

``export_dir`` is a URL (``s3://``, ``gs://``, ``gdrive://``, ``file://``, any
fsspec protocol) or a plain path, a mounted Drive folder included::

    import ckptstore.saved_model

    handle = ckptstore.saved_model.save(model, "s3://bucket/exports/resnet")
    ...                                  # returns after the local export; the upload goes on
    handle.wait()                        # verified and committed, or ckptstore.UploadError
    served = ckptstore.saved_model.load("s3://bucket/exports/resnet")
    served.serve(images)                 # a Keras 3 model; served.signatures[...] otherwise

An export directory on the remote holds TensorFlow's own tree (``saved_model.pb``,
``fingerprint.pb``, ``variables/...``, ``assets/...``) plus
``saved_model.manifest.json``, which lists every file with its size and CRC32C.
A directory without that manifest holds no SavedModel as far as ckptstore is
concerned: :func:`load` refuses it and says why.

How the pieces go up (:mod:`ckptstore.artifact`, :mod:`ckptstore.publisher`):
TensorFlow exports into local staging, so :func:`save` costs what a local
``tf.saved_model.save`` costs plus one listing of the remote. The background
upload sends ``variables/``, ``assets/`` and ``fingerprint.pb`` first, verifies
them, then ``saved_model.pb`` (the file TF Serving takes as "this version is
ready"), verifies it, and commits the manifest last.

Versioned exports in TF Serving's layout (``<base>/<version>/``) come from
:class:`Exporter`; ``load(<base>)`` loads the newest committed version.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ckptstore import artifact, publisher, targets
from ckptstore import manifest as mf
from ckptstore.backends.local import TEMP_MARKER
from ckptstore.errors import (
    CkptStoreError,
    ConfigurationError,
    ManifestError,
    RemoteUnavailableError,
    RestoreError,
    add_note,
)
from ckptstore.manifest import Manifest
from ckptstore.publisher import PublishHandle, PublishJob
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote
from ckptstore.restore import fetch_artifact, why_not_committed
from ckptstore.retry import RetryPolicy
from ckptstore.status import Status

__all__ = ["Exporter", "adopt", "load", "save"]

log = logging.getLogger("ckptstore")
T = TypeVar("T")

#: the artifact's name inside its export directory (``saved_model.manifest.json``)
NAME = mf.SAVED_MODEL_NAME
#: what TensorFlow writes at the top of an export directory. Any of these there with
#: neither ckptstore's manifest nor its in-progress marker is somebody else's SavedModel.
_TENSORFLOW_ENTRIES = ("saved_model.pb", "saved_model.pbtxt", "variables", "fingerprint.pb")
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: TF Serving's version directories: non-negative integers (it ignores anything else)
_VERSION = re.compile(r"[0-9]+")
#: the endpoint Keras 3 exports a model's forward pass under
_KERAS_ENDPOINT = "serve"


# --- save ------------------------------------------------------------------------------


def save(
    obj: Any,
    export_dir: str | os.PathLike,
    signatures: Any = None,
    options: Any = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    staging_dir: str | os.PathLike | None = None,
) -> PublishHandle:
    """Export ``obj`` as a SavedModel to ``export_dir``: locally now, uploaded in the background.

    The positional arguments are ``tf.saved_model.save``'s. A Keras 3 model is
    exported the way Keras recommends for serving (``model.export(...,
    format="tf_saved_model")``): the loaded object has a ``serve`` endpoint (and
    ``serving_default``), and needs none of the model's Python code, custom
    layers included. Explicit ``signatures`` are added as endpoints of their
    own (a single function becomes ``serving_default``).

    Returns once the local export is written. The handle's ``wait()`` blocks
    until every file is uploaded, verified and the manifest committed, and
    raises :class:`ckptstore.UploadError` if that failed. Exports not waited for
    are finished at interpreter exit.

    Example::

        handle = ckptstore.saved_model.save(
            module, "gs://bucket/exports/ranker", signatures=module.score
        )
        handle.wait()

    Saving again into a directory ckptstore committed before replaces that
    export: it is withdrawn (its manifest deleted) before the new files go up,
    so no reader ever pairs old and new files.

    Raises:
        ConfigurationError: ``export_dir`` holds a SavedModel ckptstore did not
            write (adopt it with :func:`adopt`, or export elsewhere); nothing was
            exported.
        RemoteUnavailableError: the export directory could not be listed.
        Exception: whatever ``tf.saved_model.save`` raised for ``obj``, of the
            same type, with the URL named; nothing was uploaded.
    """
    remote, redactor = targets.open_dir(export_dir, storage_options)
    _refuse_foreign(remote, redactor)
    return _export_and_submit(obj, remote, redactor, signatures, options, staging_dir)


def _export_and_submit(
    obj: Any,
    remote: Remote,
    redactor: Redactor,
    signatures: Any,
    options: Any,
    staging_dir: str | os.PathLike | None,
    *,
    number: int | None = None,
    after_commit: Callable[[Manifest], None] | None = None,
    account: publisher.Account | None = None,
    label: str | None = None,
) -> PublishHandle:
    local_dir = targets.local_dir_for(redactor.url, staging_dir)
    try:
        exporter = _export(obj, local_dir, signatures, options)
    except Exception as exc:
        shutil.rmtree(local_dir, ignore_errors=True)
        named = _naming_url(exc, obj, redactor)
        if named is exc:
            raise
        raise named from exc
    except BaseException:  # interrupted mid-export: leave no half-written export behind
        shutil.rmtree(local_dir, ignore_errors=True)
        raise
    try:
        files = mf.tree_files(local_dir)  # refuses symbolic links: only the export's own bytes
    except BaseException:
        shutil.rmtree(local_dir, ignore_errors=True)
        raise
    job = PublishJob(
        remote=remote,
        redactor=redactor,
        name=NAME,
        kind=mf.SAVED_MODEL,
        local_dir=local_dir,
        files=files,
        metadata={"exported_with": exporter},
        number=number,
        after_commit=after_commit,
        account=account,
        label=label,
    )
    return publisher.submit(job)


def _export(obj: Any, local_dir: str, signatures: Any, options: Any) -> str:
    """Write the SavedModel into ``local_dir``; returns which exporter wrote it."""
    if _is_keras3_model(obj):
        _export_keras(obj, local_dir, signatures, options)
        return "keras.export"
    import tensorflow as tf

    tf.saved_model.save(obj, local_dir, signatures=signatures, options=options)
    return "tf.saved_model.save"


def _is_keras3_model(obj: Any) -> bool:
    # Where a Keras 3 model exists, keras is imported already: looking in sys.modules
    # spares a tf.Module the slow import of Keras. tf_keras (Keras 2) models are
    # trackables that tf.saved_model.save exports as they are.
    keras = sys.modules.get("keras")
    model_class = getattr(keras, "Model", None)
    if model_class is None or not isinstance(obj, model_class):
        return False
    major = str(getattr(keras, "__version__", "0")).split(".")[0]
    return major.isdigit() and int(major) >= 3


def _export_keras(model: Any, local_dir: str, signatures: Any, options: Any) -> None:
    """Export a Keras 3 model for serving, with a ``serve`` endpoint and any extra signatures.

    ``tf.saved_model.save`` of a Keras 3 model loads back as an object that
    cannot be called (only a ``serving_default`` signature). Keras's own recipe
    is ``model.export``; with extra signatures or options the same archive is
    built by hand.
    """
    if signatures is None and options is None:
        model.export(local_dir, format="tf_saved_model", verbose=False)
        return
    import keras
    import tensorflow as tf

    named = _named_signatures(signatures)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if _KERAS_ENDPOINT not in named:  # a user's own "serve" replaces the default one
        archive.add_endpoint(_KERAS_ENDPOINT, model.__call__, _keras_input_signature(model))
    for name, fn in named.items():
        if isinstance(fn, tf.types.experimental.ConcreteFunction):
            # A traced function: Keras wraps it in a tf.function of the same inputs.
            args, _ = fn.structured_input_signature
            archive.add_endpoint(name, fn, input_signature=list(args))
        else:
            archive.add_endpoint(name, fn)
    archive.write_out(local_dir, options=options, verbose=False)


def _named_signatures(signatures: Any) -> dict[str, Any]:
    """``tf.saved_model.save``'s ``signatures`` as ``{name: function}``."""
    if signatures is None:
        return {}
    if isinstance(signatures, Mapping):
        return dict(signatures)
    return {"serving_default": signatures}  # what TensorFlow names a single signature


def _keras_input_signature(model: Any) -> Any:
    # model.export computes the serving input signature with this helper; it is not
    # public API, so a Keras that moved it gets a message instead of an AttributeError.
    try:
        from keras.src.export.export_utils import get_input_signature
    except ImportError as exc:
        import keras

        raise ConfigurationError(
            f"Keras {keras.__version__} has no keras.src.export.export_utils."
            f"get_input_signature ({exc}), which ckptstore needs to add signatures or "
            "options to a Keras export. Save without signatures= and options= (the model's "
            "serve endpoint is exported as model.export does), or use the Keras version "
            "TensorFlow ships."
        ) from None
    return get_input_signature(model)


def _naming_url(exc: Exception, obj: Any, redactor: Redactor) -> Exception:
    """TensorFlow's own exception, of its own type, with the URL and what happened in front.

    Same type, so ``except ValueError`` around ``tf.saved_model.save`` still
    catches it. A type that cannot be rebuilt from a message keeps its text and
    gets the URL as a note instead.
    """
    text = redactor.scrub(
        f"Cannot export {type(obj).__name__} to {redactor.url}; nothing was uploaded "
        "and the local export was removed. Fix what TensorFlow reports, then save again"
    )
    message = redactor.scrub(f"{text}. TensorFlow said: {exc}")
    try:
        import tensorflow as tf

        if isinstance(exc, tf.errors.OpError):
            named: Exception | None = type(exc)(exc.node_def, exc.op, message)
        else:
            named = type(exc)(message)
    except Exception:
        named = None
    if named is None or str(named) != message:  # its type builds its text some other way
        add_note(exc, text)
        return exc
    return named


def _refuse_foreign(remote: Remote, redactor: Redactor) -> None:
    """Raise if ``remote`` holds a SavedModel ckptstore did not write.

    ckptstore deletes and overwrites only what it wrote: its own committed
    export (the publisher withdraws it first) or its own interrupted upload
    (the marker lists the files). Anything else stays the user's.
    """
    names = _read(remote, redactor, "list", remote.list_names)
    if mf.manifest_name(NAME) in names or publisher.pending_name(NAME) in names:
        return
    theirs = [n for n in _TENSORFLOW_ENTRIES if n in names]
    if theirs:
        raise ConfigurationError(
            f"{redactor.url} already holds a SavedModel that ckptstore did not write "
            f"({', '.join(theirs)}, and no {mf.manifest_name(NAME)}). ckptstore replaces only "
            "what it wrote, so nothing was exported. To replace it, first vouch for it with "
            f"ckptstore.saved_model.adopt({redactor.url!r}); or save to another directory."
        )


# --- load ------------------------------------------------------------------------------


def load(
    export_dir: str | os.PathLike,
    tags: Any = None,
    options: Any = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Download a committed SavedModel, verify every file, then ``tf.saved_model.load`` it.

    ``tags`` and ``options`` are ``tf.saved_model.load``'s. If ``export_dir``
    is a base of integer versions (TF Serving's ``<base>/<version>/``, as
    :class:`Exporter` writes), the newest committed version is loaded;
    versions still uploading, or never committed, are skipped.

    The files go into a private local directory, which is deleted when the
    returned object is garbage collected (assets stay readable while it lives).

    Example::

        served = ckptstore.saved_model.load("s3://bucket/exports")   # newest version
        scores = served.serve(batch)

    Raises:
        RestoreError: nothing committed there (the message says why: an upload
            interrupted, files ckptstore did not write, or nothing at all), or a
            stored file does not match the manifest. Nothing was loaded.
        RemoteUnavailableError: the remote could not be read, even after retrying.
    """
    remote, redactor = targets.open_dir(export_dir, storage_options)
    retry = RetryPolicy()
    local_dir = targets.local_dir_for(redactor.url, None)
    try:
        with _explained(redactor, "download the SavedModel", "Nothing was loaded"):
            if fetch_artifact(remote, NAME, local_dir, retry, redactor) is None:
                _fetch_newest_version(remote, redactor, retry, local_dir)
        import tensorflow as tf

        loaded = tf.saved_model.load(local_dir, tags=tags, options=options)
    except BaseException:
        shutil.rmtree(local_dir, ignore_errors=True)
        raise
    try:
        weakref.finalize(loaded, shutil.rmtree, local_dir, True)
    except TypeError:  # not weakly referable: the copy stays until the staging base is cleared
        log.debug("Keeping %s: the loaded object cannot be watched for its end", local_dir)
    return loaded


def _fetch_newest_version(
    base: Remote, redactor: Redactor, retry: RetryPolicy, local_dir: str
) -> Manifest:
    """Download the newest committed version under ``base`` into ``local_dir``."""
    names = _read(base, redactor, "list", base.list_names)
    versions = sorted(_versions(names), reverse=True)
    if not versions:
        why = why_not_committed(base, NAME, names)
        raise RestoreError(
            f"{redactor.url} holds no committed SavedModel and no version directories: "
            f"{why}. Nothing was loaded.{_fix_for(why, redactor.url)}"
        )
    for version in versions:
        sub, sub_redactor = _version_of(base, redactor, version)
        found = fetch_artifact(sub, NAME, local_dir, retry, sub_redactor)
        if found is not None:
            log.info("Loading version %d, the newest committed under %s", version, redactor.url)
            return found
    newest, sub_redactor = _version_of(base, redactor, versions[0])
    why = why_not_committed(newest, NAME, _read(newest, sub_redactor, "list", newest.list_names))
    raise RestoreError(
        f"{redactor.url} holds versions {', '.join(map(str, sorted(versions)))} but none is "
        f"committed (the newest, {sub_redactor.url}: {why}). Nothing was loaded. Export a "
        "version with ckptstore.saved_model.Exporter (and wait for its handle), or adopt one "
        "TensorFlow wrote with ckptstore.saved_model.adopt(<version URL>)."
    )


def _fix_for(why: str, url: str) -> str:
    """What to do about :func:`why_not_committed`'s reason (a leading space, or nothing)."""
    if "did not write" in why:
        return (
            f" If TensorFlow wrote a SavedModel there, vouch for it with "
            f"ckptstore.saved_model.adopt({url!r}), or read it with tf.saved_model.load."
        )
    if "interrupted" in why:
        return ""  # the reason says what to do already
    return (
        " Check the URL; an export still uploading appears once the handle save() "
        "returned is done (handle.wait())."
    )


# --- adopt -----------------------------------------------------------------------------


def adopt(
    export_dir: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None
) -> Manifest:
    """Vouch for a SavedModel TensorFlow wrote to ``export_dir``: hash it there, commit a manifest.

    Trust on first use, as a :class:`ckptstore.CheckpointManager` adopts a
    checkpoint directory TensorFlow wrote: every file is read where it is
    stored and hashed, and the manifest committed. From then on :func:`load`
    verifies it and :func:`save` may replace it. Adopting an export ckptstore
    already committed returns its manifest and changes nothing.

    Example::

        tf.saved_model.save(model, "/content/drive/MyDrive/exports/1")   # written by TensorFlow
        ckptstore.saved_model.adopt("/content/drive/MyDrive/exports/1")
        served = ckptstore.saved_model.load("/content/drive/MyDrive/exports/1")

    Raises:
        ConfigurationError: there is no ``saved_model.pb`` there (not a
            SavedModel), or an upload by ckptstore was interrupted there.
        RemoteUnavailableError: the directory could not be read.
    """
    remote, redactor = targets.open_dir(export_dir, storage_options)
    existing = _read(
        remote,
        redactor,
        "read the manifest",
        lambda: publisher.read_committed(remote, NAME, _once),
    )
    if existing is not None:
        log.info("%s is committed already; nothing to adopt", redactor.url)
        return existing
    names = _read(remote, redactor, "list", remote.list_tree)
    if publisher.pending_name(NAME) in names:
        raise ConfigurationError(
            f"{redactor.url} holds an upload by ckptstore that was interrupted, not a SavedModel "
            "TensorFlow wrote; it is not adopted. Save the model there again: the next save "
            "removes what the interrupted one left."
        )
    if not any(n in names for n in _GRAPH_FILES):
        versions = sorted(_versions({n.split("/")[0] for n in names if "/" in n}))
        hint = (
            f" It holds version directories ({', '.join(map(str, versions))}): adopt each "
            "version's URL."
            if versions
            else ""
        )
        raise ConfigurationError(
            f"{redactor.url} does not look like a SavedModel: it has no saved_model.pb; nothing "
            f"was adopted.{hint} Give the directory tf.saved_model.save wrote."
        )
    files = [n for n in names if _is_tensorflows(n)]

    def hash_stored(name: str) -> mf.FileEntry:
        with remote.fs.open(remote.path(name), "rb") as stream:
            return mf.hash_stream(stream, name, with_md5=remote.backend.needs_md5)

    entries = [_read(remote, redactor, f"read {n}", lambda n=n: hash_stored(n)) for n in files]
    manifest = Manifest(
        checkpoint=NAME,
        number=None,
        step=None,
        timestamp=time.time(),
        files=tuple(entries),
        writer={"adopted": True},
        versions={},
        kind=mf.SAVED_MODEL,
        metadata={"exported_with": "adopted"},
    )
    try:  # checked as every reader will check it: a name no manifest may carry fails here
        Manifest.from_json(manifest.to_json(), expected_checkpoint=NAME)
    except ManifestError as exc:
        raise ConfigurationError(
            f"{redactor.url} cannot be adopted: {exc}. Nothing was committed; export the model "
            "again with ckptstore.saved_model.save."
        ) from None
    _read(remote, redactor, "commit the manifest", lambda: remote.commit(manifest))
    log.info("Adopted the SavedModel TensorFlow wrote to %s (%d files)", redactor.url, len(files))
    return manifest


def _is_tensorflows(name: str) -> bool:
    """Whether a stored name can be part of the SavedModel (not a ckptstore file of its own)."""
    base = name.rsplit("/", 1)[-1]
    return (
        mf.is_safe_relative_path(name)
        and not base.endswith(mf.MANIFEST_SUFFIX)
        and not base.endswith(publisher.PENDING_SUFFIX)
        and TEMP_MARKER not in base  # half a write another process was making
    )


# --- versions --------------------------------------------------------------------------

_versions_lock = threading.Lock()
#: base directory -> the highest version any Exporter of this process handed out, so two
#: Exporters on one base in one process never pick the same number while uploads queue
_handed_out: dict[str, int] = {}


class Exporter:
    """Versioned exports in TF Serving's layout: ``<base>/1/``, ``<base>/2/``, ...

    Each :meth:`save` exports into the next integer version: one past the
    largest number under the base, counting versions that were never committed
    (so a number is never reused for a different model). After each commit,
    committed versions beyond ``max_to_keep`` are retired oldest first
    (manifest, then ``saved_model.pb``, then the rest), and what an interrupted
    ckptstore upload left in an older version is removed. Directories ckptstore
    did not write are left alone.

    A server watching the base (TF Serving) never finds a version whose
    variables are missing: ``saved_model.pb`` goes up only after every other
    file is stored and verified.

    Example::

        exporter = ckptstore.saved_model.Exporter("s3://bucket/serving/ranker", max_to_keep=3)
        for epoch in range(epochs):
            train_one_epoch()
            exporter.save(model)               # returns after the local export
        served = ckptstore.saved_model.load("s3://bucket/serving/ranker")   # the newest

    One Exporter (one process) should write a base at a time, as one manager
    writes a run: retiring assumes no one else is uploading there.
    """

    def __init__(
        self,
        base_url: str | os.PathLike,
        max_to_keep: int | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        staging_dir: str | os.PathLike | None = None,
    ):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ConfigurationError(
                f"max_to_keep={max_to_keep!r} for {Redactor(os.fspath(base_url)).url}: give a "
                "positive integer (the number of committed versions to keep), or None to keep all."
            )
        self._base, self._redactor = targets.open_dir(base_url, storage_options)
        #: the base URL as given, credentials removed
        self.base_url = self._redactor.url
        self.max_to_keep = max_to_keep
        self.staging_dir = staging_dir
        self._key = f"{self._base.backend.protocol}://{self._base.root}"
        self._largest_listed: int | None = None
        #: committed versions, read once (the publisher's thread keeps it)
        self._committed: dict[int, Manifest] = {}
        self._account = publisher.Account(self.base_url)

    def __repr__(self) -> str:
        return f"Exporter({self.base_url!r}, max_to_keep={self.max_to_keep!r})"

    def status(self) -> Status:
        """Where this exporter's uploads stand; ``str()`` of it is one line for a log.

        Versions saved and not committed yet (``"version 3"``, the one uploading
        first), bytes left, the recent rate, the last version this exporter
        committed and when, and the last error (an upload, or retiring old
        versions), credentials removed. The last error stays after later
        commits, with its time. No request goes to the remote.

        Example::

            exporter.save(model)
            print(exporter.status())
            # ckptstore s3://b/serving/ranker: 1 pending (version 3 uploading, 48.1 MB
            #     left at 21.0 MB/s); last commit version 2 5.2 min ago; no errors  (one line)
        """
        return self._account.status()

    def save(self, obj: Any, signatures: Any = None, options: Any = None) -> PublishHandle:
        """Export ``obj`` as the next version; returns its handle (``handle.url`` names it).

        Arguments as for :func:`save`. The first save lists the base once to
        find the largest version; later ones count on from there.
        """
        version = self._next_version()
        remote, redactor = _version_of(self._base, self._redactor, version)
        return _export_and_submit(
            obj,
            remote,
            redactor,
            signatures,
            options,
            self.staging_dir,
            number=version,
            after_commit=lambda _manifest: self._tidy(version),
            account=self._account,
            label=f"version {version}",
        )

    def _next_version(self) -> int:
        if self._largest_listed is None:
            names = _read(self._base, self._redactor, "list", self._base.list_names)
            self._largest_listed = max(_versions(names), default=0)
        with _versions_lock:
            version = max(self._largest_listed, _handed_out.get(self._key, 0)) + 1
            _handed_out[self._key] = version
        return version

    def _tidy(self, committed_now: int) -> None:
        """After a commit (in the publisher's thread): clean interrupted versions, then retire."""
        call = artifact.caller(self._base, self._redactor, RetryPolicy())
        names = call("list", self._base.list_names)
        for version in sorted(_versions(names)):
            if version in self._committed:
                continue
            sub, _ = _version_of(self._base, self._redactor, version)
            found = publisher.read_committed(sub, NAME, call)
            if found is not None:
                self._committed[version] = found
            elif version < committed_now and publisher.read_pending(sub, NAME) is not None:
                # ckptstore's marker lists what a dead or failed upload left: remove exactly
                # that. (Newer versions may still be on their way up; a version without
                # the marker is TensorFlow's or someone else's and is never touched.)
                publisher.clean_interrupted(sub, NAME, call, keep=None)
                self._remove_if_empty(version)
        if self.max_to_keep is None:
            return
        for version in sorted(self._committed)[: -self.max_to_keep]:
            sub, _ = _version_of(self._base, self._redactor, version)
            artifact.retire(sub, self._committed.pop(version), call=call)
            self._remove_if_empty(version)
            log.info(
                "Retired version %d of %s (max_to_keep=%d)",
                version,
                self.base_url,
                self.max_to_keep,
            )

    def _remove_if_empty(self, version: int) -> None:
        # An empty numeric directory would look like a broken version to TF Serving.
        with contextlib.suppress(Exception):
            self._base.backend.remove_empty_dir(self._base.path(str(version)))


def _versions(names: Any) -> list[int]:
    return [int(n) for n in names if _VERSION.fullmatch(n)]


def _version_of(base: Remote, redactor: Redactor, version: int) -> tuple[Remote, Redactor]:
    """The remote of ``<base>/<version>`` (same filesystem) and a redactor that names it."""
    url = f"{redactor.url.rstrip('/')}/{version}"
    named = copy.copy(redactor)  # the same secrets to mask, the version's URL to show
    named.url = url
    return Remote(base.backend, base.path(str(version)), url), named


# --- remote reads in the caller's thread ---------------------------------------------------


def _once(what: str, operation: Callable[[], T]) -> T:
    """A ``call`` without retries, for use inside :func:`_read` (which retries the whole)."""
    return operation()


def _read(remote: Remote, redactor: Redactor, what: str, operation: Callable[[], T]) -> T:
    """Run one remote operation with retries; a failure says which URL and what to do."""
    with _explained(redactor, what):
        return artifact.caller(remote, redactor, RetryPolicy())(what, operation)


@contextlib.contextmanager
def _explained(
    redactor: Redactor, what: str, outcome: str = "Nothing was changed there"
) -> Iterator[None]:
    """A client's own exception (no credentials, no such bucket, ...) as one naming the URL."""
    try:
        yield
    except CkptStoreError:
        raise
    except Exception as exc:
        raise RemoteUnavailableError(
            f"{redactor.url}: could not {what} ({redactor.describe(exc)}). {outcome}; check "
            "the URL, the network and the credentials, then try again."
        ) from None
