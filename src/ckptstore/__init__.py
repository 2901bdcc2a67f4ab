"""ckptstore: TensorFlow checkpoints that survive the machine.

``ckptstore.CheckpointManager`` is a drop-in ``tf.train.CheckpointManager`` whose
``directory`` may be any fsspec URL. Saves are written to local staging,
uploaded in the background, verified, and committed with a manifest; restores
on a fresh machine download and verify before TensorFlow reads a byte.

``import ckptstore`` does not import TensorFlow: the names that need it
(``CheckpointManager``, ``checkpoints_iterator``, ``UploadStatus``,
``WhenBehind``) are imported on first use (PEP 562), so the ``ckptstore``
command's ``ls``, ``verify`` and ``gc`` answer without paying for TensorFlow.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

from ckptstore.errors import (  # none of these imports TensorFlow
    CkptStoreError,
    ConfigurationError,
    ManifestError,
    MissingExtraError,
    OwnershipError,
    OwnershipLost,
    RemoteUnavailableError,
    RestoreError,
    StagingFullError,
    UploadError,
    VerificationError,
)
from ckptstore.progress import progress_bar
from ckptstore.retry import RetryPolicy
from ckptstore.status import Status

#: public names imported on first use, and the module each comes from (they import TensorFlow)
_LAZY = {
    "CheckpointManager": "ckptstore.manager",
    "checkpoints_iterator": "ckptstore.iterator",
    "UploadStatus": "ckptstore.uploader",
    "WhenBehind": "ckptstore.uploader",
}
#: what ``import ckptstore`` imported eagerly before the lazy names: touching any other
#: attribute imports these first, so ``ckptstore.<submodule>`` resolves as it always did
_EAGER_BEFORE = ("ckptstore.iterator", "ckptstore.manager", "ckptstore.uploader")


def __getattr__(name: str) -> Any:
    if name.startswith("_"):  # private or dunder probes (copy, pickle, inspect): no TensorFlow
        raise AttributeError(f"module 'ckptstore' has no attribute {name!r}")
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    # ``from ckptstore import backends`` asks here before importing the submodule itself:
    # a submodule is imported alone (TensorFlow only if it needs it).
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    for module in _EAGER_BEFORE:
        importlib.import_module(module)
    try:
        return globals()[name]  # a submodule those imported (ckptstore.staging, ...)
    except KeyError:
        raise AttributeError(f"module 'ckptstore' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointManager",
    "CkptStoreError",
    "ConfigurationError",
    "ManifestError",
    "MissingExtraError",
    "OwnershipError",
    "OwnershipLost",
    "RemoteUnavailableError",
    "RestoreError",
    "RetryPolicy",
    "StagingFullError",
    "Status",
    "UploadError",
    "UploadStatus",
    "VerificationError",
    "WhenBehind",
    "__version__",
    "checkpoints_iterator",
    "progress_bar",
]
