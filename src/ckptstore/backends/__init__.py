"""How a URL becomes a filesystem, and what each storage family adds to fsspec.

Backends are fsspec filesystems, not wrappers around them. A backend class only
says what fsspec does not: which checksum the service keeps for an object and
how to read it, how to write a small object atomically there, which errors are
worth retrying. Any fsspec protocol without an entry here still works through
:class:`~ckptstore.backends.base.Backend`, which verifies by reading back.

Like fsspec's own registry, entries are string paths imported only when used,
each with the extra that provides its client, so a missing dependency says how
to fix it instead of failing with a bare ImportError.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import split_protocol

from ckptstore.backends.base import Backend
from ckptstore.errors import ConfigurationError, MissingExtraError
from ckptstore.redaction import redact_url


@dataclasses.dataclass(frozen=True)
class BackendEntry:
    backend: str  # "module:Class" of the ckptstore Backend
    client: str | None = None  # module that must import for the protocol to work
    extra: str | None = None  # pip extra that installs the client


_GENERIC = "ckptstore.backends.base:Backend"
_LOCAL = "ckptstore.backends.local:LocalBackend"

REGISTRY: dict[str, BackendEntry] = {
    "file": BackendEntry(_LOCAL),
    "local": BackendEntry(_LOCAL),
    "memory": BackendEntry(_GENERIC),
    "s3": BackendEntry("ckptstore.backends.s3:S3Backend", "s3fs", "s3"),
    "s3a": BackendEntry("ckptstore.backends.s3:S3Backend", "s3fs", "s3"),
    "gs": BackendEntry("ckptstore.backends.gcs:GCSBackend", "gcsfs", "gcs"),
    "gcs": BackendEntry("ckptstore.backends.gcs:GCSBackend", "gcsfs", "gcs"),
    # pydrive2's filesystem, not the "gdrive" of fsspec's registry (see backends/gdrive.py)
    "gdrive": BackendEntry("ckptstore.backends.gdrive:DriveBackend", "pydrive2.fs", "gdrive"),
}


def _known_protocols() -> set[str]:
    return {p.lower() for p in (*REGISTRY, *fsspec.available_protocols()) if len(p) > 1}


def check_for_url_typos(directory: str) -> None:
    """Refuse a path that is a URL with a typo, before it silently means "local disk".

    ``"s3:/bucket/x"`` and ``"gs//bucket/x"`` are valid relative paths, so without this
    TensorFlow's write would land in ``./s3:/bucket/x`` and nothing would ever be
    uploaded. ``"S3://bucket/x"`` would reach the client with a protocol it does not
    know. Each gets an error that shows the URL the user probably meant.

    >>> check_for_url_typos("s3:/bucket/run")
    Traceback (most recent call last):
    ...
    ckptstore.errors.ConfigurationError: 's3:/bucket/run' looks like a mistyped URL: ...
    """
    shown = redact_url(directory)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)(:?)(/*)(.*)$", directory)
    if match is None:
        return
    protocol, colon, slashes, rest = match.groups()
    known = _known_protocols()
    if protocol.lower() not in known:
        return
    if colon and len(slashes) >= 2:  # "s3://b/x"; "file:///tmp/x" has a third
        if protocol != protocol.lower():  # "S3://bucket/x"
            meant = f"{protocol.lower()}:{slashes}{rest}"
            raise ConfigurationError(
                f"{shown!r}: protocols are lower case; did you mean {redact_url(meant)!r}?"
            )
        return  # a well-formed URL
    if colon or len(slashes) >= 2:  # "s3:/b/x", "s3:b/x", "gs//b/x"
        if protocol.lower() in ("file", "local"):
            meant = f"file:///{rest.lstrip('/')}"
        else:
            meant = f"{protocol.lower()}://{rest.lstrip('/')}"
        raise ConfigurationError(
            f"{shown!r} looks like a mistyped URL: did you mean {redact_url(meant)!r}? As "
            "written it is a local path, and checkpoints would be written under "
            f"{os.path.abspath(directory)!r} and never uploaded. For a local directory of "
            f"that name, write it as './{directory}'."
        )


def is_remote_url(directory: str) -> bool:
    """True when ``directory`` names a protocol (``s3://``, ``file://``, ...)."""
    protocol, _ = split_protocol(directory)
    return protocol is not None and len(protocol) > 1  # "C:\\..." is a Windows drive


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Backend, str]:
    """Return the backend for ``url`` and the path of its root inside the filesystem.

    Example::

        >>> backend, root = resolve("memory://runs/seven")
        >>> root
        '/runs/seven'

    Raises:
        ConfigurationError: unknown protocol or malformed URL.
        MissingExtraError: the protocol's client library is not installed.
    """
    shown = redact_url(url)
    protocol, _ = split_protocol(url)
    if protocol is None:
        protocol = "file"
    protocol = protocol.lower()
    entry = REGISTRY.get(protocol)
    if entry is None:
        if protocol not in fsspec.available_protocols():
            known = ", ".join(sorted(p + "://" for p in REGISTRY))
            raise ConfigurationError(
                f"Unknown protocol {protocol + '://'!r} in {shown}. ckptstore supports {known}, "
                "a local path, and any protocol fsspec knows "
                "(fsspec.available_protocols())."
            )
        entry = BackendEntry(_GENERIC)
    if entry.client is not None:
        try:
            importlib.import_module(entry.client)
        except ImportError as exc:
            raise MissingExtraError(
                f"{shown} needs the {entry.client} package, which is not installed "
                f"({exc.msg}). Install it with: pip install 'ckptstore[{entry.extra}]'"
            ) from None
    module_name, class_name = entry.backend.split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class.connect(url, protocol, dict(storage_options or {}))
