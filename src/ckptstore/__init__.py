"""ckptstore: TensorFlow checkpoints that survive the machine.

``ckptstore.CheckpointManager`` is a drop-in ``tf.train.CheckpointManager`` whose
``directory`` may be any fsspec URL. Saves are written to local staging,
uploaded in the background, verified, and committed with a manifest; restores
on a fresh machine download and verify before TensorFlow reads a byte.
"""

__version__ = "0.1.0"

from ckptstore.errors import (
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
from ckptstore.iterator import checkpoints_iterator
from ckptstore.manager import CheckpointManager
from ckptstore.retry import RetryPolicy
from ckptstore.uploader import UploadStatus, WhenBehind

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
    "UploadError",
    "UploadStatus",
    "VerificationError",
    "WhenBehind",
    "__version__",
    "checkpoints_iterator",
]
