"""A tiny training state whose every value encodes the step it was saved at.

Restoring and comparing to :meth:`TrainState.expected` proves a checkpoint came
back bit for bit, and from which step.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


class TrainState:
    def __init__(self, shapes: tuple[tuple[int, ...], ...] = ((64, 32), (32,), (7,))):
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        self.weights = [tf.Variable(tf.zeros(s), name=f"w{i}") for i, s in enumerate(shapes)]
        self.checkpoint = tf.train.Checkpoint(step=self.step, weights=self.weights)

    @staticmethod
    def values_for(step: int, shape: tuple[int, ...], index: int) -> np.ndarray:
        rng = np.random.default_rng(step * 1000 + index)
        return rng.standard_normal(shape).astype(np.float32)

    def advance_to(self, step: int) -> None:
        self.step.assign(step)
        for i, w in enumerate(self.weights):
            w.assign(self.values_for(step, tuple(w.shape), i))

    def train_one(self) -> int:
        self.advance_to(int(self.step.numpy()) + 1)
        return int(self.step.numpy())

    def matches_step(self, step: int) -> bool:
        if int(self.step.numpy()) != step:
            return False
        return all(
            np.array_equal(w.numpy(), self.values_for(step, tuple(w.shape), i))
            for i, w in enumerate(self.weights)
        )
