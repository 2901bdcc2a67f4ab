"""Where a SavedModel or a Keras file goes: the URL a user gave, as a remote and a name.

``ckptstore.saved_model`` and ``ckptstore.keras`` take a URL (``s3://b/run/model.keras``),
a ``file://`` URL or a plain path (a mounted Drive folder included) and turn it
into the :class:`~ckptstore.remote.Remote` the artifact lives under, plus its
name there, and a local directory to write it into before the upload.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Mapping
from typing import Any

from ckptstore import backends, staging
from ckptstore.errors import ConfigurationError
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote


def _absolute(url: str | os.PathLike) -> str:
    text = os.fspath(url)
    backends.check_for_url_typos(text)
    return text if backends.is_remote_url(text) else os.path.abspath(text)


def open_dir(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None
) -> tuple[Remote, Redactor]:
    """The remote whose root is the directory ``url`` (an export directory, a base).

    Example::

        remote, redactor = open_dir("s3://bucket/exports/1", {"anon": False})
    """
    text = os.fspath(url)
    redactor = Redactor(text, storage_options)
    backend, root = backends.resolve(_absolute(text), storage_options)
    return Remote(backend, root, redactor.url), redactor


def open_file(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None
) -> tuple[Remote, Redactor, str]:
    """The remote of the directory holding the file ``url``, and the file's name in it.

    Example::

        remote, redactor, name = open_file("s3://bucket/run/best.keras", None)
        # remote.root == "bucket/run", name == "best.keras"
    """
    text = os.fspath(url)
    redactor = Redactor(text, storage_options)
    absolute = _absolute(text).rstrip("/")
    head, name = posixpath.split(absolute) if "://" in absolute else os.path.split(absolute)
    if not name or name in (".", ".."):
        raise ConfigurationError(f"{redactor.url} names no file; give one, e.g. .../model.keras")
    backend, root = backends.resolve(head, storage_options)
    return Remote(backend, root, redactor.url), redactor, name


def local_dir_for(shown_url: str, staging_dir: str | os.PathLike | None) -> str:
    """A fresh local directory to write one artifact into before its upload.

    Under ``staging_dir`` when given, else beside the default staging base
    (``$CKPTSTORE_STAGING_DIR`` or ``~/.cache/ckptstore/staging``). It is removed
    once the artifact is committed.
    """
    if staging_dir is not None:
        base = os.fspath(staging_dir)
    else:
        base = os.path.dirname(staging.default_staging_dir(shown_url))
    staging.prepare_staging_dir(base)
    slug = os.path.basename(staging.default_staging_dir(shown_url))
    return tempfile.mkdtemp(prefix=f"{slug}-", dir=base)
