"""Per-epoch SavedModel exports during ``fit()``, on S3, and loading the newest one.

The workflow of a notebook that calls ``tf.saved_model.save(model, f"{drive}/epoch_{n}")``
at the end of every epoch, with TF Serving's layout and the remote as a URL::

    exporter = ckptstore.saved_model.Exporter("s3://bucket/run-1/exports", max_to_keep=3)

    class ExportEveryEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            exporter.save(self.model)              # <bucket>/run-1/exports/<n>/

    model.fit(x, y, epochs=5, callbacks=[ExportEveryEpoch()])
    served = ckptstore.saved_model.load("s3://bucket/run-1/exports")   # the newest committed
    served.serve(x)

Each export is written locally by Keras (``model.export``, the way Keras 3
exports for serving), uploaded in the background with ``saved_model.pb`` last,
checked against its manifest and committed; versions beyond ``max_to_keep`` are
retired. ``load`` of the base picks the newest committed version and verifies
every file before TensorFlow reads it. This example checks that the model it
loads is the last epoch's.

Run it as is (a local S3 server stands in for the cloud), or against your bucket::

    python examples/saved_model_exports.py
    python examples/saved_model_exports.py --remote s3://bucket/prefix \\
        --storage-options '{"profile": "me"}'

It exits with status 1 if a check fails.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import playground

EPOCHS = 5
KEEP = 3


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype("float32")
    y = (x @ rng.standard_normal((8, 1))).astype("float32")
    return x, y


def main() -> int:
    args = playground.arguments(__doc__.splitlines()[0]).parse_args()
    import keras
    import numpy as np

    import ckptstore.saved_model

    keras.utils.set_random_seed(0)
    x, y = data()
    with playground.remote_base(args) as (base, options):
        exports = f"{base}/exports"
        print(f"exporting every epoch to {exports}/<version>/")

        # The user's code: an Exporter and a callback that calls it after each epoch.
        exporter = ckptstore.saved_model.Exporter(
            exports, max_to_keep=KEEP, storage_options=options
        )

        class ExportEveryEpoch(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.handles = []
                self.outputs = []  # for the check below: what each epoch's model computes

            def on_epoch_end(self, epoch, logs=None):
                self.handles.append(exporter.save(self.model))  # returns after the local export
                self.outputs.append(self.model(x[:4]).numpy())

        callback = ExportEveryEpoch()
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
        )
        model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
        model.fit(x, y, epochs=EPOCHS, batch_size=32, callbacks=[callback], verbose=0)
        for handle in callback.handles:
            handle.wait()  # verified and committed, or ckptstore.UploadError
            print(f"committed {handle.url}")

        # Any machine: the newest committed version, every file verified before it is loaded.
        served = ckptstore.saved_model.load(exports, storage_options=options)
        got = served.serve(x[:4]).numpy()
        newest = callback.handles[-1].url
        if not np.allclose(got, callback.outputs[-1], rtol=1e-5, atol=1e-6):
            print(f"FAILED: the model loaded from {exports} is not the last epoch's ({newest})")
            return 1
        if np.allclose(got, callback.outputs[-2], rtol=1e-5, atol=1e-6):
            print("FAILED: the last two epochs compute the same outputs; the check proves nothing")
            return 1
        print(f"loaded {exports}: serve() matches epoch {EPOCHS}'s model ({newest})")

        # Versions beyond max_to_keep were retired (manifest first): they no longer load.
        retired = f"{exports}/{EPOCHS - KEEP}"
        try:
            ckptstore.saved_model.load(retired, storage_options=options)
        except ckptstore.RestoreError:
            print(f"retired: {retired} no longer loads (RestoreError: nothing committed there)")
        else:
            print(f"FAILED: {retired} still loads although max_to_keep={KEEP}")
            return 1

    print(
        f"example OK: {EPOCHS} epochs exported as versions 1..{EPOCHS} (newest {KEEP} kept), "
        f"load() of the base served version {EPOCHS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
