"""Placeholder: being written (ModelCheckpoint)."""


class ModelCheckpoint:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("being written")
