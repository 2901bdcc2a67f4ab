"""Best-only ``.keras`` checkpoints during ``fit()``, on S3, and loading the best model back.

The workflow of a notebook that keeps the best model of a ``fit()`` on Drive or in a
bucket, with one changed line: the callback is ckptstore's, and its filepath a URL::

    checkpoint = ckptstore.keras.ModelCheckpoint(
        "s3://bucket/run-1/best.keras", monitor="val_loss", save_best_only=True
    )
    model.fit(x, y, validation_data=(vx, vy), epochs=8, callbacks=[checkpoint])
    best = ckptstore.keras.load_model("s3://bucket/run-1/best.keras")

Each better model is written locally by Keras, then uploaded in the background,
checked against its manifest and committed; ``fit()`` returns once every save is
committed (or raises ``ckptstore.UploadError``). The best ``val_loss`` is kept
with the committed file, so a restarted ``fit()`` (a new runtime, a new callback)
replaces ``best.keras`` only with a better model: this example restarts with an
untrained model and checks the best one is still there.

Run it as is (a local S3 server stands in for the cloud), or against your bucket::

    python examples/keras_best_checkpoints.py
    python examples/keras_best_checkpoints.py --remote s3://bucket/prefix \\
        --storage-options '{"profile": "me"}'

It exits with status 1 if a check fails.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import playground

EPOCHS = 8


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype("float32")
    y = (x @ rng.standard_normal((16, 1)) + 0.1 * rng.standard_normal((512, 1))).astype("float32")
    return (x[:384], y[:384]), (x[384:], y[384:])


def build_model():
    import keras

    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def main() -> int:
    args = playground.arguments(__doc__.splitlines()[0]).parse_args()
    import keras

    import ckptstore.keras

    keras.utils.set_random_seed(0)
    (x, y), (vx, vy) = data()
    with playground.remote_base(args) as (base, options):
        url = f"{base}/best.keras"
        print(f"best-only checkpoints to {url}")

        # The training run: the one line that differs from Keras is the callback.
        model = build_model()
        checkpoint = ckptstore.keras.ModelCheckpoint(
            url, monitor="val_loss", save_best_only=True, storage_options=options
        )
        history = model.fit(
            x, y, validation_data=(vx, vy), epochs=EPOCHS, callbacks=[checkpoint], verbose=0
        )
        losses = history.history["val_loss"]
        best = min(losses)
        best_epoch = losses.index(best) + 1
        print("val_loss per epoch: " + ", ".join(f"{v:.4f}" for v in losses))
        saved = [e for e, v in enumerate(losses, 1) if v == min(losses[:e])]
        print(f"saved (each better than all before): epochs {saved}; the last one is committed")

        # A fresh process (here: a fresh model) loads the best model, verified first.
        loaded = ckptstore.keras.load_model(url, storage_options=options)
        got = loaded.evaluate(vx, vy, verbose=0)
        print(f"loaded {url}: val_loss {got:.6f} (best was epoch {best_epoch}: {best:.6f})")
        if abs(got - best) > 1e-5 * max(1.0, best):
            print(f"FAILED: the loaded model is not the best one ({got} != {best})")
            return 1

        # Restarted: an untrained model for one epoch, worse than the committed best.
        restarted = build_model()
        again = ckptstore.keras.ModelCheckpoint(
            url, monitor="val_loss", save_best_only=True, storage_options=options
        )
        worse = restarted.fit(
            x, y, validation_data=(vx, vy), epochs=1, callbacks=[again], verbose=0
        ).history["val_loss"][0]
        kept = ckptstore.keras.load_model(url, storage_options=options).evaluate(vx, vy, verbose=0)
        print(f"restarted fit(): val_loss {worse:.4f}; {url} still holds val_loss {kept:.6f}")
        if not worse > best or abs(kept - best) > 1e-5 * max(1.0, best):
            print("FAILED: the restarted fit() replaced the best model with a worse one")
            return 1

    print(
        f"example OK: best.keras is epoch {best_epoch} of {EPOCHS} (val_loss {best:.4f}), "
        "verified on load, and kept by a restarted fit()"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
