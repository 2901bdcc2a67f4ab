"""Keras model files at a URL: ``save_model``, ``load_model``, ``load_weights``.

Mirrors ``keras.saving`` (Keras 3, the one TensorFlow 2.21 ships), with the file
at a URL (``s3://``, ``gs://``, ``gdrive://``, ``file://``, any fsspec protocol)
or a local path, a mounted Drive folder included::

    import ckptstore.keras

    handle = ckptstore.keras.save_model(model, "s3://bucket/run-1/model.keras")
    ...                                  # training goes on while the file uploads
    handle.wait()                        # verified and committed, or UploadError

    model = ckptstore.keras.load_model("s3://bucket/run-1/model.keras")

A ``.keras`` or ``.weights.h5`` file is one object at exactly the URL given, with
``<name>.manifest.json`` beside it (its size and CRC32C), so Keras and any other
tool find it where the user said. ``save_model`` writes the file locally with
Keras and returns once that write is done; the upload, the check of the stored
copy against the manifest and the commit run in the background
(:mod:`ckptstore.publisher`). ``load_model`` downloads the committed file,
checks every byte against its manifest and only then hands the local copy to
Keras: a file that is not committed, or that changed after its commit, is never
loaded.

Saving again under the same name (``best.keras``) never leaves a moment in which
neither the old nor the new copy is committed and intact: the new one is
committed under a side name first (``best.keras.ckptstore-next``), then copied
over the old one (see :mod:`ckptstore.publisher`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from ckptstore import manifest as mf
from ckptstore import publisher, targets
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

log = logging.getLogger("ckptstore")

#: what Keras's ``save_weights`` writes (one HDF5 file; sharded ``.weights.json`` is not one object)
WEIGHTS_SUFFIX = ".weights.h5"
#: what Keras's ``save_model`` writes: the native zip, and legacy HDF5
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
#: a download that failed its check because a new save replaced the file meanwhile
#: (an evaluator loading ``best.keras`` while training overwrites it) is tried again
#: with the new manifest, this many times in all
_LOAD_ATTEMPTS = 3

Target = tuple[Remote, Redactor, str]


def is_weights_file(filepath: str) -> bool:
    return filepath.endswith(WEIGHTS_SUFFIX)


def _suggest(shown: str, suffix: str) -> str:
    """``shown`` with its last extension replaced by ``suffix`` (for an error's "e.g.")."""
    head, sep, name = shown.rpartition("/")
    for known in (WEIGHTS_SUFFIX, *MODEL_SUFFIXES):
        if name.endswith(known):
            name = name[: -len(known)]
            break
    else:
        name = posixpath.splitext(name)[0]
    return f"{head}{sep}{name or 'model'}{suffix}"


def check_filepath(filepath: str, shown: str, *, weights_only: bool | None, caller: str) -> bool:
    """Apply Keras's extension rule to ``filepath``; return whether it names a weights file.

    ``weights_only=None`` (``save_model``) lets the extension decide; ``True`` or
    ``False`` (``ModelCheckpoint``'s ``save_weights_only``) requires the matching one.

    Raises:
        ConfigurationError: naming the URL (credentials removed) and the name to use.
    """
    weights = is_weights_file(filepath)
    model = not weights and filepath.endswith(MODEL_SUFFIXES)
    if weights_only is True and not weights:
        raise ConfigurationError(
            f"{caller}: {shown} does not end in `.weights.h5`, which Keras requires with "
            f"save_weights_only=True. Use e.g. {_suggest(shown, WEIGHTS_SUFFIX)}, or "
            "save_weights_only=False to save the whole model as a `.keras` file."
        )
    if weights_only is False and not model:
        if weights:
            raise ConfigurationError(
                f"{caller}: {shown} names a weights file (`.weights.h5`) but "
                "save_weights_only=False would write the whole model into it. Pass "
                f"save_weights_only=True, or use e.g. {_suggest(shown, '.keras')}."
            )
        raise ConfigurationError(
            f"{caller}: {shown} does not end in `.keras`, the Keras model format (or `.h5`, "
            f"the legacy one). Use e.g. {_suggest(shown, '.keras')}, or pass "
            "save_weights_only=True with a `.weights.h5` name."
        )
    if weights_only is None and not (weights or model):
        raise ConfigurationError(
            f"{caller}: {shown} has no Keras file extension. Keras writes a model to a "
            "`.keras` file (`.h5` for the legacy format) and weights to a `.weights.h5` "
            f"file; use e.g. {_suggest(shown, '.keras')}. (For a TensorFlow SavedModel "
            "directory, use ckptstore.saved_model.save.)"
        )
    return weights


def _iterations(model: Any) -> int | None:
    try:
        return int(model.optimizer.iterations.numpy())
    except Exception:  # no optimizer, or not built yet: the manifest just has no step
        return None


def publish_model_file(
    model: Any,
    filepath: str,
    *,
    weights_only: bool,
    storage_options: Mapping[str, Any] | None = None,
    staging_dir: str | os.PathLike | None = None,
    metadata: dict[str, Any] | None = None,
    number: int | None = None,
    supersedable: bool = False,
    target: Target | None = None,
    keras_kwargs: dict[str, Any] | None = None,
    account: publisher.Account | None = None,
) -> PublishHandle:
    """Write ``model`` with Keras into a fresh local directory and queue its upload.

    The one place where a Keras file is written for the remote: ``save_model``
    and ``ModelCheckpoint`` both come here. Returns once Keras's local write is
    done; the handle tells when the file is verified and committed.
    ``weights_only`` picks ``model.save_weights`` over ``keras.saving.save_model``.
    ``target`` is ``(remote, redactor, name)`` when the caller already opened it.
    ``account`` is the caller's ``status()`` account (``ModelCheckpoint``'s).

    Example::

        handle = publish_model_file(model, "s3://b/run/best.keras", weights_only=False)
        handle.wait()
    """
    import keras

    remote, redactor, name = target or targets.open_file(filepath, storage_options)
    local_dir = targets.local_dir_for(redactor.url, staging_dir)
    local = os.path.join(local_dir, name)
    try:
        if weights_only:
            model.save_weights(local, overwrite=True)
        else:
            keras.saving.save_model(model, local, overwrite=True, **(keras_kwargs or {}))
        if not os.path.isfile(local):
            raise ConfigurationError(
                f"Keras did not write one file for {redactor.url} (found "
                f"{sorted(os.listdir(local_dir))}); ckptstore stores a Keras file as one object"
            )
    except BaseException as exc:
        shutil.rmtree(local_dir, ignore_errors=True)
        add_note(exc, f"ckptstore: while writing {redactor.url} locally; nothing was uploaded.")
        raise
    job = PublishJob(
        remote,
        redactor,
        name,
        mf.KERAS,
        local_dir,
        [name],
        metadata=dict(metadata or {}),
        step=_iterations(model),
        number=number,
        supersedable=supersedable,
        account=account,
    )
    return publisher.submit(job)


def save_model(
    model: Any,
    filepath: str | os.PathLike,
    overwrite: bool = True,
    zipped: bool | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    staging_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> PublishHandle | None:
    """Save ``model`` to ``filepath``, a URL or a path, as ``keras.saving.save_model`` does.

    Returns once Keras has written the file locally; it uploads in the
    background. The returned handle's ``wait(timeout=None)`` blocks until the
    stored copy is verified and committed, and raises
    :class:`ckptstore.UploadError` if it was not (whatever was committed there
    before is then untouched). Unfinished uploads are drained at interpreter exit.

    Args:
        model: the Keras model.
        filepath: ``.../name.keras`` (the native format), ``.h5``/``.hdf5``
            (Keras's legacy format, with Keras's warning), or
            ``.../name.weights.h5`` for the weights alone (``model.save_weights``).
        overwrite: as in Keras: ``False`` asks before replacing a file stored
            there (and returns ``None`` if you decline).
        zipped: as in Keras, but only ``None``/``True``: a ``.keras`` file is
            stored as one object.
        storage_options: keyword arguments for the fsspec filesystem
            (credentials, endpoint, ...); never logged, shown or written.
        staging_dir: local directory to write into before the upload (default:
            beside ``$CKPTSTORE_STAGING_DIR`` or ``~/.cache/ckptstore/staging``).
            The local copy is removed once committed, kept if the upload failed.
        **kwargs: Keras's other arguments (``include_optimizer`` for ``.h5``).

    Raises:
        ConfigurationError: no Keras extension, ``zipped=False``, or arguments
            a weights file cannot take; nothing is written.

    Example::

        handle = ckptstore.keras.save_model(model, "gs://bucket/exports/model.keras")
        handle.wait()
    """
    text = os.fspath(filepath)
    shown = Redactor(text, storage_options).url
    weights = check_filepath(text, shown, weights_only=None, caller="save_model")
    if zipped is False:
        raise ConfigurationError(
            f"save_model: zipped=False would write {shown} as a directory (Keras's layout for "
            "the Hugging Face Hub); ckptstore stores a Keras file as one object. Drop zipped=, "
            "or use ckptstore.saved_model.save for a directory export."
        )
    if weights and kwargs:
        raise ConfigurationError(
            f"save_model: {shown} is a weights file; {sorted(kwargs)} apply to whole-model "
            "files only (and max_shard_size, which writes several files, is not supported)."
        )
    target = targets.open_file(text, storage_options)
    if not overwrite and _stored(*target):
        from keras.src.utils import io_utils  # Keras's own prompt, as keras.saving uses

        if not io_utils.ask_to_proceed_with_overwrite(shown):
            return None
    return publish_model_file(
        model,
        text,
        weights_only=weights,
        storage_options=storage_options,
        staging_dir=staging_dir,
        target=target,
        keras_kwargs=None if weights else {"zipped": zipped, **kwargs},
    )


def _stored(remote: Remote, redactor: Redactor, name: str) -> bool:
    """Whether a file (committed or not) is stored at the target, for ``overwrite=False``."""
    names = call_retrying(remote, redactor, f"list {remote.url}", remote.list_names)
    return name in names or mf.manifest_name(name) in names


def call_retrying(
    remote: Remote, redactor: Redactor, what: str, operation: Callable[[], Any]
) -> Any:
    return RetryPolicy().call(
        operation, is_transient=remote.backend.is_transient, what=what, scrub=redactor.scrub
    )


# --- loading ---------------------------------------------------------------------------


def _not_committed(remote: Remote, redactor: Redactor, name: str) -> RestoreError:
    """The error for a URL with no committed manifest: why, and what to do."""
    names = call_retrying(remote, redactor, f"list {remote.url}", remote.list_names)
    found = [n for n in names if n == name or n.startswith(name + ".")]
    fix = ""
    if mf.manifest_name(name) in found:
        try:
            remote.read_manifest(name)
            why = "its manifest could not be read"
        except ManifestError as exc:
            why = f"its manifest is not valid ({exc})"
        except FileNotFoundError:
            why = "its manifest disappeared while it was read"
        fix = " Save the model there again."
    else:
        why = why_not_committed(remote, name, found)
        if not found:
            fix = (
                " Check the URL: a save is there only once its upload is committed "
                "(handle.wait() returned, or ModelCheckpoint's fit() ended)."
            )
        elif name in found and publisher.pending_name(name) not in found:
            fix = (
                " ckptstore loads only files it committed and can verify. If you trust this "
                "file, load it with keras.saving.load_model (unverified), or save it once with "
                "ckptstore.keras.save_model so it is committed."
            )
    return RestoreError(f"{redactor.url} is not committed: {why}. Nothing was loaded.{fix}")


def _fetch(remote: Remote, redactor: Redactor, name: str, local_dir: str) -> Manifest:
    """Download the committed file into ``local_dir`` and check it, or raise RestoreError."""
    retry = RetryPolicy()
    for attempt in range(1, _LOAD_ATTEMPTS + 1):
        before = _read_manifest(remote, redactor, name)
        try:
            manifest = fetch_artifact(remote, name, local_dir, retry, redactor)
        except RestoreError:
            # A new save of the same name replaces the stored file right after committing
            # its side copy. A download that started from the old manifest then reads new
            # bytes: that is not tampering, and the new manifest describes them.
            if attempt == _LOAD_ATTEMPTS or _read_manifest(remote, redactor, name) == before:
                raise
            log.info("%s was saved again while it downloaded; loading the new copy", redactor.url)
            continue
        if manifest is None:
            raise _not_committed(remote, redactor, name)
        return manifest
    raise AssertionError("unreachable")


def _read_manifest(remote: Remote, redactor: Redactor, name: str) -> Manifest | None:
    def call(what: str, operation: Callable[[], Any]) -> Any:
        return call_retrying(remote, redactor, f"{what} ({remote.url})", operation)

    return publisher.read_committed(remote, name, call)


@contextlib.contextmanager
def verified_local_copy(
    filepath: str | os.PathLike, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[str, Manifest, str]]:
    """``(local path, manifest, shown URL)`` of the committed file, checked, removed after use.

    Raises:
        RestoreError: not committed, or the stored bytes do not match their manifest.
        RemoteUnavailableError: the remote cannot be read, even after retrying.
    """
    remote, redactor, name = targets.open_file(filepath, storage_options)
    local_dir = targets.local_dir_for(redactor.url, None)
    try:
        try:
            manifest = _fetch(remote, redactor, name, local_dir)
        except CkptStoreError:
            raise
        except Exception as exc:  # the client's own error, after the retries
            raise RemoteUnavailableError(
                f"Cannot read {redactor.url} ({redactor.describe(exc)}). Nothing was loaded; "
                "check the URL, the network and the credentials, then load it again."
            ) from None
        yield os.path.join(local_dir, name), manifest, redactor.url
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def load_model(
    filepath: str | os.PathLike,
    custom_objects: dict[str, Any] | None = None,
    compile: bool = True,
    safe_mode: bool = True,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load a model ckptstore committed at ``filepath``, as ``keras.saving.load_model`` does.

    Downloads the file, checks its size and CRC32C against the committed
    manifest, and only then loads the local copy with Keras (which is removed
    afterwards). ``custom_objects``, ``compile`` and ``safe_mode`` are Keras's.

    Raises:
        RestoreError: nothing committed there (nothing stored, an upload that was
            interrupted, or a file ckptstore did not write), or the stored file
            does not match its manifest (changed after its commit). Nothing is loaded.
        ConfigurationError: ``filepath`` is not a Keras model file (a
            ``.weights.h5`` file goes to :func:`load_weights`).
        RemoteUnavailableError: the remote cannot be read, even after retrying.

    Example::

        model = ckptstore.keras.load_model("s3://bucket/run-1/best.keras")
        model.predict(x)
    """
    import keras

    text = os.fspath(filepath)
    shown = Redactor(text, storage_options).url
    if is_weights_file(text):
        raise ConfigurationError(
            f"load_model: {shown} is a weights file; build the model, then "
            "ckptstore.keras.saving.load_weights(model, url) loads it."
        )
    if not text.endswith(MODEL_SUFFIXES):
        raise ConfigurationError(
            f"load_model: {shown} has no Keras file extension; Keras loads models from "
            f"`.keras` files (`.h5` for the legacy format): e.g. {_suggest(shown, '.keras')}. "
            "(For a TensorFlow SavedModel directory, use ckptstore.saved_model.load.)"
        )
    with verified_local_copy(text, storage_options) as (local, _, shown):
        try:
            return keras.saving.load_model(
                local, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
            )
        except BaseException as exc:
            add_note(exc, f"ckptstore: while loading {shown} (verified against its manifest)")
            raise


def load_weights(
    model: Any,
    filepath: str | os.PathLike,
    skip_mismatch: bool = False,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Load weights ckptstore committed at ``filepath`` into ``model`` (``model.load_weights``).

    ``filepath`` is a ``.weights.h5`` file (what ``ModelCheckpoint(...,
    save_weights_only=True)`` writes) or a ``.keras`` file; it is downloaded and
    checked against its manifest first, as in :func:`load_model`.

    Example::

        model = build_model()
        ckptstore.keras.saving.load_weights(model, "s3://bucket/run-1/best.weights.h5")
    """
    text = os.fspath(filepath)
    shown = Redactor(text, storage_options).url
    if not (is_weights_file(text) or text.endswith(".keras")):
        raise ConfigurationError(
            f"load_weights: {shown} is neither a `.weights.h5` nor a `.keras` file, the two "
            f"Keras loads weights from; use e.g. {_suggest(shown, WEIGHTS_SUFFIX)}."
        )
    with verified_local_copy(text, storage_options) as (local, _, shown):
        try:
            model.load_weights(local, skip_mismatch=skip_mismatch)
        except BaseException as exc:
            add_note(exc, f"ckptstore: while loading {shown} (verified against its manifest)")
            raise
