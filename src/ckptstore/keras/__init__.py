"""Keras on the verified path: ``fit()`` callbacks and model files whose target is a URL.

Mirrors Keras 3 (the one TensorFlow 2.21 ships)::

    import ckptstore.keras

    model.fit(
        data,
        epochs=10,
        callbacks=[
            ckptstore.keras.BackupAndRestore("s3://bucket/run-1/backup"),
            ckptstore.keras.ModelCheckpoint("s3://bucket/run-1/model-{epoch:02d}.keras"),
        ],
    )
    model = ckptstore.keras.load_model("s3://bucket/run-1/model-10.keras")
"""

from ckptstore.keras.backup import BackupAndRestore
from ckptstore.keras.checkpoint import ModelCheckpoint
from ckptstore.keras.saving import load_model, load_weights, save_model

__all__ = ["BackupAndRestore", "ModelCheckpoint", "load_model", "load_weights", "save_model"]
