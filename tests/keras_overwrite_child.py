"""Overwrites one Keras file again and again until it is SIGKILLed (test_keras_checkpoint.py).

Run as ``python keras_overwrite_child.py URL OPTIONS FIRST STAGING``: builds the
model, prints ``ready``, waits for a line on stdin (so the parent can start the
next child while this one is still importing TensorFlow), then saves version
FIRST, FIRST + 1, ... to URL with ``ckptstore.keras.save_model`` and waits for
each commit, printing ``committed V`` after each. OPTIONS is a JSON object of
storage_options.

Every value of version V is a function of V (:func:`versioned_model`), so the
parent can tell from a loaded model which version it is and that it is intact.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

#: 1.25 MiB of float32 weights: seconds on the throttled link, so a kill can land mid-upload;
#: and over the 1 MiB a FaultProxy body_filter reads ahead, so it sees the PUT as it starts
INPUTS, UNITS = 320, 1024


def build():
    import keras

    return keras.Sequential(
        [keras.Input((INPUTS,)), keras.layers.Dense(UNITS), keras.layers.Dense(1)]
    )


def values_for(version: int, shapes) -> list[np.ndarray]:
    """The weights of ``version``: random from its seed, and the last bias holds the number."""
    rng = np.random.default_rng(version)
    values = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    values[-1][0] = version
    return values


def versioned_model(model, version: int):
    model.set_weights(values_for(version, [w.shape for w in model.get_weights()]))
    return model


def version_of(model) -> int:
    """The version a loaded model holds; raises AssertionError unless every value is its own."""
    weights = model.get_weights()
    version = int(weights[-1][0])
    expected = values_for(version, [w.shape for w in weights])
    assert all(np.array_equal(w, e) for w, e in zip(weights, expected)), "mixed or damaged"
    return version


def main() -> None:
    url, options, first, staging = sys.argv[1:5]
    import ckptstore.keras

    model = build()
    print("ready", flush=True)
    sys.stdin.readline()  # "go"
    version = int(first)
    while True:
        versioned_model(model, version)
        handle = ckptstore.keras.save_model(
            model, url, storage_options=json.loads(options), staging_dir=staging
        )
        handle.wait()
        print(f"committed {version}", flush=True)
        version += 1


if __name__ == "__main__":
    main()
