"""Differential suite: ``ckptstore.CheckpointManager`` against ``tf.train.CheckpointManager``.

With a plain local directory ckptstore promises to be indistinguishable from
TensorFlow's class. Every test here runs one sequence of operations against
both classes, each in its own fresh directory, and after every step compares
everything a user can observe:

* what the operation returned or raised (paths relative to each directory,
  exception type and message),
* ``checkpoints``, ``latest_checkpoint``, ``directory``, ``checkpoint_interval``
  and ``checkpoint``,
* every file in the directory, the ``checkpoint`` state file byte for byte, and
  what ``tf.train.latest_checkpoint`` makes of it,
* every tensor stored in every checkpoint on disk, the live variables and the
  ``save_counter``,
* what the user's callbacks (``init_fn``, write callbacks) saw,
* every log record TensorFlow's logger (``tf.get_logger()``) and ckptstore's
  received during the operation, at every level: logger, level and words.

The state file holds wall-clock timestamps, so ``time.time`` is replaced by a
fake clock that only moves when a test moves it; TensorFlow and ckptstore both
read it through the ``time`` module and therefore see the same instants.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import pathlib
import re
import shutil
import time
from typing import Any, Callable

import numpy as np
import pytest
import tensorflow as tf

import ckptstore

TF = tf.train.CheckpointManager
CS = ckptstore.CheckpointManager
HOUR = 3600.0


# --- the harness ------------------------------------------------------------------------


class FakeClock:
    """``time.time`` for both managers: stands still until a test advances it."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def values_for(k: int) -> np.ndarray:
    """The model's values after training step ``k``: distinct for every step."""
    return np.array([k, k + 0.25, -k, 10.0 * k], dtype=np.float32)


class Each:
    """An argument that differs per world, e.g. ``Each(lambda w: w.step)``."""

    def __init__(self, pick: Callable[[World], Any]):
        self.pick = pick


STEP = Each(lambda w: w.step)
INIT_FN = Each(lambda w: w.init_fn)


def _resolve(kwargs: dict[str, Any], world: World) -> dict[str, Any]:
    return {k: v.pick(world) if isinstance(v, Each) else v for k, v in kwargs.items()}


@dataclasses.dataclass(eq=False)
class World:
    """One side of the comparison: a manager class, its directory, its own model."""

    label: str
    cls: type
    directory: Any  # exactly what the constructor is given (str, Path, relative, ...)
    manager: Any = None
    events: list = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.new_model()

    def new_model(self) -> None:
        """Fresh variables and checkpoint object, as a restarted process would have."""
        self.v = tf.Variable(np.zeros(4, np.float32), name="v")
        self.step = tf.Variable(0, dtype=tf.int64, name="step")
        self.checkpoint = tf.train.Checkpoint(v=self.v, step=self.step)

    @property
    def dir(self) -> str:
        return os.fspath(self.directory)

    def rel(self, path: Any) -> Any:
        """``path`` with this world's directory replaced by ``<dir>``."""
        if not isinstance(path, str):
            return path
        if path == self.dir:
            return "<dir>"
        base = self.dir.rstrip(os.sep) + os.sep
        return "<dir>/" + path[len(base) :] if path.startswith(base) else path

    def normalize(self, value: Any) -> Any:
        if isinstance(value, str):
            return ("str", self.rel(value))
        if isinstance(value, np.ndarray):
            return ("ndarray", value.dtype.str, value.tolist())
        if isinstance(value, np.generic):
            return (type(value).__name__, value.item())
        if isinstance(value, (list, tuple)):
            return type(value)(self.normalize(v) for v in value)
        return value

    def scrub(self, message: str) -> str:
        """An exception message without this world's directory or object addresses."""
        if os.path.isabs(self.dir):
            message = message.replace(self.dir, "<dir>")
        return re.sub(r"0x[0-9a-fA-F]+", "0x?", message)

    # Callbacks the user hands to the managers; they log what they saw.
    def init_fn(self) -> str:
        self.events.append(("init_fn", self.v.numpy().tolist()))
        return "initialized"

    def write_callback(self, save_path: str) -> None:
        latest = self.manager.latest_checkpoint if self.manager is not None else None
        self.events.append(("write_callback", self.rel(save_path), self.rel(latest)))

    def write_callback_no_args(self) -> None:
        self.events.append("write_callback_no_args")


def _outcome(op: Callable[[World], Any], world: World) -> tuple:
    try:
        result = op(world)
    except Exception as exc:
        return ("raised", type(exc), world.scrub(str(exc)))
    return ("returned", world.normalize(result))


LOGGERS = ("tensorflow", "ckptstore")  # TensorFlow's logger (tf.get_logger()) and ckptstore's


class LogRecords(logging.Handler):
    """Every record of TensorFlow's and ckptstore's loggers while it is attached to the root."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in LOGGERS:
            self.records.append(record)


def _logged(op: Callable[[World], Any], world: World) -> tuple[tuple, tuple]:
    """``op``'s outcome and what it logged: (logger, level, message), paths made relative."""
    handler = LogRecords()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        outcome = _outcome(op, world)
    finally:
        root.removeHandler(handler)
    logs = tuple((r.name, r.levelname, world.scrub(r.getMessage())) for r in handler.records)
    return outcome, logs


@pytest.fixture(autouse=True)
def log_everything(caplog):
    """Both loggers at DEBUG, so an INFO line one class emits and the other does not shows."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)


def _files(directory: str) -> list[str] | None:
    if not os.path.isdir(directory):
        return None
    return sorted(
        os.path.relpath(os.path.join(root, name), directory)
        for root, _, names in os.walk(directory)
        for name in names
    )


def _stored_tensors(world: World, files: list[str] | None) -> dict[str, dict[str, Any]]:
    """Every tensor of every checkpoint on disk, preserved ones included."""
    stored = {}
    for name in files or []:
        if name.endswith(".index"):
            prefix = os.path.join(world.dir, name[: -len(".index")])
            reader = tf.train.load_checkpoint(prefix)
            stored[name] = {
                key: world.normalize(reader.get_tensor(key))
                for key in sorted(reader.get_variable_to_shape_map())
            }
    return stored


def observe(world: World) -> dict[str, Any]:
    """Everything a user can see of one world, relative to its directory."""
    m = world.manager
    view: dict[str, Any] = {"has_manager": m is not None}
    if m is not None:
        view["directory"] = (type(m.directory).__name__, world.rel(m.directory))
        view["checkpoint is the one given"] = m.checkpoint is world.checkpoint
        view["checkpoints"] = [world.rel(p) for p in m.checkpoints]
        view["latest_checkpoint"] = world.rel(m.latest_checkpoint)
        view["checkpoint_interval"] = m.checkpoint_interval
    files = _files(world.dir)
    view["files"] = files
    state_file = pathlib.Path(world.dir, "checkpoint")
    view["state file"] = state_file.read_bytes() if files and "checkpoint" in files else None
    view["tf.train.latest_checkpoint"] = world.rel(tf.train.latest_checkpoint(world.dir))
    view["stored tensors"] = _stored_tensors(world, files)
    view["save_counter"] = int(world.checkpoint.save_counter.numpy())
    view["v"] = world.v.numpy().tolist()
    view["step"] = int(world.step.numpy())
    view["events"] = list(world.events)
    return view


class Twin:
    """TensorFlow's manager and ckptstore's, driven in lockstep and compared after each step."""

    def __init__(self, clock: FakeClock, tf_dir: Any, cs_dir: Any, tick: float = 60.0):
        self.tf = World("tf", TF, tf_dir)
        self.cs = World("cs", CS, cs_dir)
        self.worlds = (self.tf, self.cs)
        self.clock = clock
        self.tick = tick
        self.k = 0  # training steps so far; the model holds values_for(k)
        self.history: list[str] = []
        self.logs: tuple = ()  # what the last step logged (the same in both worlds)

    def step(
        self,
        what: str,
        op: Callable[[World], Any],
        *,
        advance: float | None = None,
        check_state: bool = True,
    ) -> tuple:
        """Advance the clock, apply ``op`` to both worlds at the same instant, compare.

        Returns ckptstore's (normalised) outcome, equal to TensorFlow's.
        """
        self.clock.advance(self.tick if advance is None else advance)
        self.history.append(what)
        (tf_outcome, tf_logs), (cs_outcome, cs_logs) = (_logged(op, w) for w in self.worlds)
        assert cs_outcome == tf_outcome, f"{what!r} differs; steps: {self.history}"
        assert cs_logs == tf_logs, f"{what!r} logged differently; steps: {self.history}"
        self.logs = cs_logs
        if check_state:
            self.assert_same_state()
        return cs_outcome

    def assert_same_state(self) -> None:
        tf_view, cs_view = observe(self.tf), observe(self.cs)
        for key, expected in tf_view.items():
            assert cs_view[key] == expected, f"{key!r} differs; steps: {self.history}"

    # The operations, each applied to both worlds.

    def open(self, max_to_keep: Any, *, cls: type | None = None, fresh: bool = False, **kwargs):
        """Construct a manager in each world (``cls`` overrides both classes)."""

        def op(w: World) -> None:
            if fresh:
                w.new_model()
            w.manager = None
            manager_class = cls or w.cls
            w.manager = manager_class(w.checkpoint, w.directory, max_to_keep, **_resolve(kwargs, w))

        return self.step(f"open({max_to_keep!r}, {kwargs})", op)

    def train(self) -> None:
        """One training step: new values for the model, step counter + 1."""
        self.k += 1
        values = values_for(self.k)

        def op(w: World) -> None:
            w.v.assign(values)
            w.step.assign_add(1)

        self.step("train", op, advance=0.0, check_state=False)

    def save(self, *, advance: float | None = None, check_state: bool = True, **kwargs) -> tuple:
        return self.step(
            f"save({kwargs})",
            lambda w: w.manager.save(**_resolve(kwargs, w)),
            advance=advance,
            check_state=check_state,
        )

    def sync(self) -> tuple:
        return self.step("sync()", lambda w: w.manager.sync(), advance=0.0)

    def restore_or_initialize(self) -> tuple:
        return self.step("restore_or_initialize()", lambda w: w.manager.restore_or_initialize())

    def restore_latest(self) -> tuple:
        """Scramble the model, restore ``latest_checkpoint``, return the restored values."""

        def op(w: World) -> np.ndarray:
            w.v.assign(np.full(4, -99.0, np.float32))
            w.checkpoint.restore(w.manager.latest_checkpoint).assert_existing_objects_matched()
            return w.v.numpy()

        return self.step("restore(latest_checkpoint)", op, advance=0.0)

    def train_and_save(self, n: int, **kwargs) -> list[tuple]:
        results = []
        for _ in range(n):
            self.train()
            results.append(self.save(**kwargs))
        return results


def returned(outcome: tuple) -> Any:
    """The normalised return value of a step that must not have raised."""
    assert outcome[0] == "returned", outcome
    return outcome[1]


def path_of(outcome: tuple) -> str:
    """The ``<dir>``-relative path a step returned."""
    kind, path = returned(outcome)
    assert kind == "str"
    return path


def preserved(world: World) -> list[str]:
    """Checkpoints on disk that the manager no longer manages (kept by the hours rule)."""
    on_disk = {n[: -len(".index")] for n in _files(world.dir) or [] if n.endswith(".index")}
    managed = {os.path.relpath(p, world.dir) for p in world.manager.checkpoints}
    return sorted(on_disk - managed, key=lambda n: int(n.rsplit("-", 1)[1]))


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock(1_767_225_600.0)  # 2026-01-01T00:00:00Z
    monkeypatch.setattr(time, "time", fake)
    return fake


@pytest.fixture
def twin(tmp_path, clock) -> Twin:
    return Twin(clock, str(tmp_path / "tf"), str(tmp_path / "cs"))


# --- construction -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_to_keep", "kwargs", "message"),
    [
        (0, {}, "Expected a positive integer or `None` for `max_to_keep`, got 0."),
        (-1, {}, "Expected a positive integer or `None` for `max_to_keep`, got -1."),
        (
            3,
            {"checkpoint_interval": 5},
            "`step_counter` should be passed if `checkpoint_interval` is not None.",
        ),
    ],
)
def test_invalid_arguments_raise_what_tensorflow_raises(twin, max_to_keep, kwargs, message):
    outcome = twin.open(max_to_keep, **kwargs)
    assert outcome == ("raised", ValueError, message)
    assert twin.cs.manager is None
    assert _files(twin.cs.dir) is None  # nothing created


@pytest.mark.parametrize("method", ["__init__", "save", "restore_or_initialize", "sync"])
def test_signatures_match(method):
    tf_params = list(inspect.signature(getattr(TF, method)).parameters.values())
    cs_params = list(inspect.signature(getattr(CS, method)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in cs_params[: len(tf_params)]] == [
        (p.name, p.kind, p.default) for p in tf_params
    ]
    # Anything ckptstore adds is keyword-only, so TensorFlow's positional calls still work.
    assert all(p.kind is p.KEYWORD_ONLY for p in cs_params[len(tf_params) :])


def test_every_constructor_argument_positionally(twin):
    def op(w: World) -> None:
        w.manager = w.cls(w.checkpoint, w.directory, 2, 1.0, "pos", w.step, 2, w.init_fn, 0)

    twin.step("open with all nine arguments positionally", op)
    assert twin.cs.manager.checkpoint_interval == 2
    assert returned(twin.restore_or_initialize()) is None
    assert twin.cs.events == [("init_fn", [0.0, 0.0, 0.0, 0.0])]
    for _ in range(6):
        twin.train()
        twin.save()


def test_members_of_a_fresh_manager(twin):
    twin.open(3)
    assert twin.cs.manager.checkpoints == []
    assert twin.cs.manager.latest_checkpoint is None
    assert twin.cs.manager.directory == twin.cs.dir
    assert twin.cs.manager.checkpoint is twin.cs.checkpoint
    assert twin.cs.manager.checkpoint_interval is None


# --- saving and retention -----------------------------------------------------------------


@pytest.mark.parametrize("max_to_keep", [None, 1, 3])
def test_save_and_retention(twin, max_to_keep):
    twin.open(max_to_keep)
    paths = [path_of(o) for o in twin.train_and_save(6)]
    assert paths == [f"<dir>/ckpt-{i}" for i in range(1, 7)]
    kept = 6 if max_to_keep is None else max_to_keep
    assert [twin.cs.rel(p) for p in twin.cs.manager.checkpoints] == paths[-kept:]
    assert twin.cs.rel(twin.cs.manager.latest_checkpoint) == "<dir>/ckpt-6"
    assert returned(twin.restore_latest()) == ("ndarray", "<f4", values_for(6).tolist())


@pytest.mark.parametrize(
    ("minutes_between_saves", "hours"),
    [
        (25, 1.0),
        (30, 1.0),  # lands exactly on the "at least n hours since the last one" boundary
        (7, 0.25),
    ],
)
def test_preserved_every_n_hours_stay_on_disk_but_leave_checkpoints(
    twin, minutes_between_saves, hours
):
    twin.tick = minutes_between_saves * 60.0
    twin.open(2, keep_checkpoint_every_n_hours=hours)
    twin.train_and_save(15)
    kept = preserved(twin.cs)
    assert len(kept) >= 3, kept  # the rule really did preserve some
    assert len(twin.cs.manager.checkpoints) == 2
    for name in kept:  # preserved checkpoints are complete
        assert os.path.exists(os.path.join(twin.cs.dir, name + ".index"))

    # A restarted process keeps the preserved ones and goes on applying the rule.
    twin.open(2, keep_checkpoint_every_n_hours=hours, fresh=True)
    twin.restore_or_initialize()
    twin.train_and_save(6)
    assert set(kept) <= set(preserved(twin.cs))


def test_keep_every_n_hours_without_max_to_keep_keeps_everything(twin):
    twin.tick = HOUR
    twin.open(None, keep_checkpoint_every_n_hours=0.5)
    twin.train_and_save(4)
    assert len(twin.cs.manager.checkpoints) == 4
    assert preserved(twin.cs) == []


def test_clock_behind_the_last_preserved_timestamp(twin):
    twin.tick = HOUR
    twin.open(1, keep_checkpoint_every_n_hours=1.0)
    twin.train_and_save(4)
    # The machine's clock jumps back a day before the manager is re-created.
    twin.step(
        "reopen with the clock a day behind",
        lambda w: setattr(w, "manager", w.cls(w.checkpoint, w.directory, 1, 1.0)),
        advance=-24 * HOUR,
    )
    # TensorFlow's warning, through TensorFlow's logger (compared with TensorFlow's by step()).
    [(logger, level, message)] = twin.logs
    assert (logger, level) == ("tensorflow", "WARNING")
    assert re.fullmatch(
        r"time\.time\(\) returned a value \d+\.\d{6} seconds behind the last preserved "
        r"checkpoint timestamp\.",
        message,
    )
    twin.train_and_save(3)


@pytest.mark.parametrize("name", ["model.weights", "sub/dir/model", "c?kpt*"])
def test_custom_checkpoint_name(twin, name):
    twin.open(2, checkpoint_name=name)
    paths = [path_of(o) for o in twin.train_and_save(4)]
    assert paths == [f"<dir>/{name}-{i}" for i in range(1, 5)]
    assert returned(twin.restore_latest()) == ("ndarray", "<f4", values_for(4).tolist())


def test_explicit_checkpoint_numbers(twin):
    twin.open(None)
    number_var = tf.Variable(12, dtype=tf.int64)
    numbers = [
        7,  # int
        np.int64(9),  # numpy integer
        number_var,  # tf.Variable: used, not incremented
        tf.constant(20, dtype=tf.int32),  # tensor
        tf.constant(21, dtype=tf.int64) + 1,  # a computed tensor
        None,  # falls back to save_counter, which counted every save
    ]
    paths = []
    for number in numbers:
        twin.train()
        paths.append(path_of(twin.save(checkpoint_number=number)))
    assert paths == [f"<dir>/ckpt-{n}" for n in (7, 9, 12, 20, 22, 6)]
    assert int(number_var.numpy()) == 12
    assert int(twin.cs.checkpoint.save_counter.numpy()) == 6


def test_invalid_checkpoint_number_fails_the_same_way(twin):
    twin.open(2)
    twin.train_and_save(1)
    twin.train()
    outcome = twin.save(checkpoint_number=2.5)
    assert outcome == ("raised", AttributeError, "'float' object has no attribute 'numpy'")
    # save_counter was incremented before the failure, in both.
    assert int(twin.cs.checkpoint.save_counter.numpy()) == 2
    twin.train_and_save(2)


def test_resaving_an_existing_number_moves_it_to_the_end_of_the_queue(twin):
    twin.open(3)
    twin.train_and_save(3)
    twin.train()
    twin.save(checkpoint_number=1)  # overwrite ckpt-1: now the newest
    assert [twin.cs.rel(p) for p in twin.cs.manager.checkpoints] == [
        "<dir>/ckpt-2",
        "<dir>/ckpt-3",
        "<dir>/ckpt-1",
    ]
    twin.train()
    twin.save(checkpoint_number=5)  # sweeps ckpt-2, the oldest, not ckpt-1
    assert [twin.cs.rel(p) for p in twin.cs.manager.checkpoints] == [
        "<dir>/ckpt-3",
        "<dir>/ckpt-1",
        "<dir>/ckpt-5",
    ]
    assert returned(twin.restore_latest()) == ("ndarray", "<f4", values_for(5).tolist())
    # The overwritten ckpt-1 holds the newer values.
    stored = _stored_tensors(twin.cs, _files(twin.cs.dir))["ckpt-1.index"]
    assert stored["v/.ATTRIBUTES/VARIABLE_VALUE"] == ("ndarray", "<f4", values_for(4).tolist())


# --- step_counter and checkpoint_interval ---------------------------------------------------


@pytest.mark.parametrize("last_checkpoint_step", [None, 0, 4])
def test_checkpoint_interval(twin, last_checkpoint_step):
    twin.open(
        3,
        step_counter=STEP,
        checkpoint_interval=3,
        last_checkpoint_step=last_checkpoint_step,
    )
    results = [twin.save()]  # at step 0
    for check_interval in [True, True, True, False, True, True, True, True, False, True, True]:
        twin.train()
        results.append(twin.save(check_interval=check_interval))
        results.append(twin.save(check_interval=check_interval))  # same step: never twice
    saved = [returned(r) for r in results if returned(r) is not None]
    skipped = [r for r in results if returned(r) is None]
    assert saved and skipped
    assert len(saved) < 12


@pytest.mark.parametrize("step_counter", [STEP, 100], ids=["tf.Variable", "int"])
def test_step_counter_without_checkpoint_interval_is_not_consulted(twin, step_counter):
    # TensorFlow stores and reads step_counter only when checkpoint_interval is set;
    # without it, any value is accepted and ignored, and every save() saves.
    twin.open(2, step_counter=step_counter)
    paths = [path_of(o) for o in twin.train_and_save(3)]
    assert paths == ["<dir>/ckpt-1", "<dir>/ckpt-2", "<dir>/ckpt-3"]
    assert twin.cs.manager.checkpoint_interval is None


def test_restore_or_initialize_resets_the_interval_clock(twin):
    twin.open(None, step_counter=STEP, checkpoint_interval=2)
    for _ in range(5):
        twin.train()
        twin.save()
    twin.open(None, fresh=True, step_counter=STEP, checkpoint_interval=2)
    assert path_of(twin.restore_or_initialize()) == "<dir>/ckpt-3"
    assert returned(twin.save()) is None  # the restored step was already saved
    twin.train()
    twin.save()
    twin.train()
    twin.save()


# --- restore_or_initialize -------------------------------------------------------------


def test_restore_or_initialize_without_checkpoints_calls_init_fn(twin):
    twin.open(3, init_fn=INIT_FN)
    assert returned(twin.restore_or_initialize()) is None
    assert twin.cs.events == [("init_fn", [0.0, 0.0, 0.0, 0.0])]
    assert twin.logs == (
        ("tensorflow", "INFO", "Customized initialization is done through the passed `init_fn`."),
    )
    assert returned(twin.restore_or_initialize()) is None  # called again, as TensorFlow does
    assert len(twin.cs.events) == 2


def test_restore_or_initialize_without_checkpoints_or_init_fn(twin):
    twin.open(3)
    assert returned(twin.restore_or_initialize()) is None
    twin.train_and_save(1)


def test_restore_or_initialize_restores_the_latest_checkpoint(twin):
    twin.open(2, init_fn=INIT_FN)
    twin.train_and_save(3)
    twin.open(2, fresh=True, init_fn=INIT_FN)
    assert path_of(twin.restore_or_initialize()) == "<dir>/ckpt-3"
    assert twin.cs.events == []  # init_fn not called
    assert twin.cs.v.numpy().tolist() == values_for(3).tolist()
    assert int(twin.cs.checkpoint.save_counter.numpy()) == 3
    assert path_of(twin.save()) == "<dir>/ckpt-4"  # numbering continues


# --- options --------------------------------------------------------------------------------


def test_user_write_callbacks_and_options_are_left_alone(twin):
    twin.open(2)
    user = {}
    for w in twin.worlds:
        callbacks = [w.write_callback, w.write_callback_no_args]
        options = tf.train.CheckpointOptions(experimental_write_callbacks=callbacks)
        user[w.label] = (options, callbacks)

    for _ in range(3):  # the same options object, reused across saves
        twin.train()
        twin.step("save(options=user's)", lambda w: w.manager.save(options=user[w.label][0]))

    # Both saw the same paths, before the manager recorded them (user callbacks run first).
    assert twin.cs.events == [
        ("write_callback", "<dir>/ckpt-1", None),
        "write_callback_no_args",
        ("write_callback", "<dir>/ckpt-2", "<dir>/ckpt-1"),
        "write_callback_no_args",
        ("write_callback", "<dir>/ckpt-3", "<dir>/ckpt-2"),
        "write_callback_no_args",
    ]
    # Neither touches the user's options or list. (TensorFlow 2.21 appends its own
    # callback to a copy: CheckpointOptions.__copy__ copies the callback list.)
    for w in twin.worlds:
        options, callbacks = user[w.label]
        assert options.experimental_write_callbacks is callbacks, w.label
        assert callbacks == [w.write_callback, w.write_callback_no_args], w.label


def test_options_without_callbacks(twin):
    twin.open(2)
    for _ in range(3):
        twin.train()
        twin.save(options=tf.train.CheckpointOptions(experimental_io_device="/job:localhost"))


def test_async_saves_then_sync(twin):
    twin.open(2)
    options = Each(
        lambda w: tf.train.CheckpointOptions(
            enable_async=True, experimental_write_callbacks=[w.write_callback_no_args]
        )
    )
    for _ in range(3):
        twin.train()
        twin.save(options=options, check_state=False)
        twin.sync()
    # Several async saves in flight before one sync. The clock stands still meanwhile:
    # each write callback runs on TensorFlow's async thread whenever the write ends.
    for _ in range(3):
        twin.train()
        twin.save(options=options, check_state=False, advance=0.0)
    twin.sync()
    assert [twin.cs.rel(p) for p in twin.cs.manager.checkpoints] == [
        "<dir>/ckpt-5",
        "<dir>/ckpt-6",
    ]
    assert twin.cs.events == ["write_callback_no_args"] * 6
    assert returned(twin.restore_latest()) == ("ndarray", "<f4", values_for(6).tolist())


# --- how the directory is given ---------------------------------------------------------


@pytest.mark.parametrize(
    "style", ["pathlib", "relative str", "relative pathlib", "nested", "trailing slash"]
)
def test_directory_forms(tmp_path, clock, monkeypatch, style):
    if style.startswith("relative"):
        monkeypatch.chdir(tmp_path)
        tf_dir, cs_dir = "tf", "cs"
    elif style == "trailing slash":
        tf_dir, cs_dir = str(tmp_path / "tf") + os.sep, str(tmp_path / "cs") + os.sep
    elif style == "nested":
        tf_dir, cs_dir = str(tmp_path / "tf" / "a" / "b"), str(tmp_path / "cs" / "a" / "b")
    else:
        tf_dir, cs_dir = tmp_path / "tf", tmp_path / "cs"
    if style.endswith("pathlib"):
        tf_dir, cs_dir = pathlib.Path(tf_dir), pathlib.Path(cs_dir)
    twin = Twin(clock, tf_dir, cs_dir)
    twin.open(2)
    assert isinstance(twin.cs.manager.directory, str)
    paths = [path_of(o) for o in twin.train_and_save(3)]
    assert paths == ["<dir>/ckpt-1", "<dir>/ckpt-2", "<dir>/ckpt-3"]
    twin.open(2, fresh=True)
    assert path_of(twin.restore_or_initialize()) == "<dir>/ckpt-3"
    twin.train_and_save(2)


# --- reopening a directory the other class wrote ---------------------------------------------


def tensorflow_writes(directory: str, clock: FakeClock, saves: int, tick: float, **kwargs):
    """A TensorFlow run of ``saves`` training steps, as the directory's previous owner."""
    v = tf.Variable(np.zeros(4, np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    manager = TF(tf.train.Checkpoint(v=v, step=step), directory, **kwargs)
    for k in range(1, saves + 1):
        clock.advance(tick)
        v.assign(values_for(k))
        step.assign_add(1)
        manager.save()
    return [os.path.relpath(p, directory) for p in manager.checkpoints]


@pytest.mark.parametrize(
    ("written_with", "reopened_with"),
    [
        ({"max_to_keep": 3}, {"max_to_keep": 3}),
        ({"max_to_keep": 5}, {"max_to_keep": 2}),
        ({"max_to_keep": None}, {"max_to_keep": 3}),
        ({"max_to_keep": 2}, {"max_to_keep": None}),
        (
            {"max_to_keep": 2, "keep_checkpoint_every_n_hours": 1.0},
            {"max_to_keep": 2, "keep_checkpoint_every_n_hours": 1.0},
        ),
        (
            {"max_to_keep": 2, "keep_checkpoint_every_n_hours": 1.0},
            {"max_to_keep": 1},
        ),
        ({"max_to_keep": 3, "checkpoint_name": "w"}, {"max_to_keep": 2, "checkpoint_name": "w"}),
    ],
)
def test_ckptstore_continues_a_directory_tensorflow_wrote(
    tmp_path, clock, written_with, reopened_with
):
    source = str(tmp_path / "written-by-tf")
    tick = 25 * 60.0
    managed = tensorflow_writes(source, clock, 7, tick, **written_with)
    shutil.copytree(source, tmp_path / "tf")
    shutil.copytree(source, tmp_path / "cs")

    twin = Twin(clock, str(tmp_path / "tf"), str(tmp_path / "cs"), tick=tick)
    twin.k = 7
    reopened = dict(reopened_with)
    twin.open(reopened.pop("max_to_keep"), **reopened)
    # ckptstore sees what TensorFlow left behind, exactly as TensorFlow does.
    assert [os.path.relpath(p, twin.cs.dir) for p in twin.cs.manager.checkpoints] == managed
    name = written_with.get("checkpoint_name", "ckpt")
    assert twin.cs.rel(twin.cs.manager.latest_checkpoint) == f"<dir>/{name}-7"
    assert path_of(twin.restore_or_initialize()) == f"<dir>/{name}-7"
    assert twin.cs.v.numpy().tolist() == values_for(7).tolist()
    twin.train_and_save(5)
    assert path_of(twin.save()) == f"<dir>/{name}-13"


def test_tensorflow_reads_and_continues_a_directory_ckptstore_wrote(tmp_path, clock):
    twin = Twin(clock, str(tmp_path / "tf"), str(tmp_path / "cs"), tick=25 * 60.0)
    twin.open(2, keep_checkpoint_every_n_hours=1.0, checkpoint_name="model")
    twin.train_and_save(8)
    twin.save(checkpoint_number=3)  # an overwrite, to make the queue order matter
    assert preserved(twin.cs)  # something preserved, to make the timestamps matter

    # Both directories are now handed to TensorFlow's own manager, in a new process.
    twin.open(2, cls=TF, fresh=True, keep_checkpoint_every_n_hours=1.0, checkpoint_name="model")
    assert type(twin.cs.manager) is TF
    expected = os.path.join(twin.cs.dir, "model-3")
    assert tf.train.latest_checkpoint(twin.cs.dir) == expected
    assert twin.cs.manager.latest_checkpoint == expected
    assert path_of(twin.restore_or_initialize()) == "<dir>/model-3"
    assert twin.cs.v.numpy().tolist() == values_for(8).tolist()  # TensorFlow restored it
    state = tf.train.get_checkpoint_state(twin.cs.dir)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "model-8",
        "model-3",
    ]
    twin.train_and_save(4)  # and TensorFlow's retention carries on identically


def test_a_failing_user_callback_fails_the_save_the_same_way(twin):
    twin.open(2)
    twin.train_and_save(1)

    def failing(save_path):
        raise RuntimeError("user callback failed for " + os.path.basename(save_path))

    twin.train()
    outcome = twin.save(options=tf.train.CheckpointOptions(experimental_write_callbacks=[failing]))
    assert outcome == ("raised", RuntimeError, "user callback failed for ckpt-2")
    twin.train_and_save(2)


def test_save_options_of_the_wrong_kind_fail_the_same_way(twin):
    twin.open(2)
    twin.train()
    outcome = twin.save(options=tf.saved_model.SaveOptions())
    assert outcome == (
        "raised",
        AttributeError,
        "'SaveOptions' object has no attribute 'experimental_write_callbacks'",
    )
    twin.train_and_save(1)


def test_restore_or_initialize_when_the_latest_files_were_deleted(twin):
    twin.open(3)
    twin.train_and_save(2)
    twin.step(
        "delete the latest checkpoint's files",
        lambda w: [os.remove(os.path.join(w.dir, n)) for n in os.listdir(w.dir) if "ckpt-2" in n],
    )
    twin.open(3, fresh=True)
    outcome = twin.restore_or_initialize()
    assert outcome[0] == "raised"
    assert outcome[1] is tf.errors.NotFoundError
    assert "<dir>/ckpt-2" in outcome[2]


def test_continue_from_unmanaged(twin):
    # TensorFlow's testContinueFromUnmanaged: the user's own Checkpoint.save() output is in the
    # directory; the manager restores from it and never deletes it.
    twin.step(
        "Checkpoint.save() twice, by hand",
        lambda w: [w.checkpoint.save(os.path.join(w.dir, "unusual_prefix")) for _ in range(2)],
    )
    twin.open(2, fresh=True)
    assert twin.cs.rel(twin.cs.manager.latest_checkpoint) == "<dir>/unusual_prefix-2"
    assert twin.cs.manager.checkpoints == []
    twin.restore_latest()
    assert int(twin.cs.checkpoint.save_counter.numpy()) == 2
    twin.train_and_save(3)
    assert [twin.cs.rel(p) for p in twin.cs.manager.checkpoints] == ["<dir>/ckpt-4", "<dir>/ckpt-5"]
    for name in ("unusual_prefix-1", "unusual_prefix-2"):
        assert os.path.exists(os.path.join(twin.cs.dir, name + ".index"))


def test_unreadable_state_file_is_ignored_with_tensorflows_warnings(twin):
    twin.open(2)
    twin.train_and_save(2)
    twin.step(
        "garble the state file",
        lambda w: pathlib.Path(w.dir, "checkpoint").write_text("not { a proto"),
    )
    twin.open(2, fresh=True)
    assert [(logger, level) for logger, level, _ in twin.logs] == [("tensorflow", "WARNING")] * 2
    assert twin.logs[1][2] == "<dir>/checkpoint: Checkpoint ignored"
    twin.train_and_save(2)


# --- graph mode (tf.compat.v1 sessions) -------------------------------------------------------


def graph_mode_run(cls: type, directory: str, clock: FakeClock) -> list:
    """A tf.compat.v1 graph-and-session training run, as TensorFlow's own graph-mode tests do."""
    seen: list = []

    def rel(path: Any) -> Any:
        return os.path.relpath(path, directory) if isinstance(path, str) else path

    def note(what: str, op: Callable[[], Any]) -> None:
        handler = LogRecords()
        logging.getLogger().addHandler(handler)
        try:
            result = op()
        except Exception as exc:
            result = ("raised", type(exc), str(exc).replace(directory, "<dir>"))
        finally:
            logging.getLogger().removeHandler(handler)
        logs = [
            (r.name, r.levelname, r.getMessage().replace(directory, "<dir>"))
            for r in handler.records
        ]
        seen.append((what, result, logs))

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        v = tf.Variable(np.zeros(4, np.float32), name="v")
        step = tf.Variable(0, dtype=tf.int64, name="step")
        checkpoint = tf.train.Checkpoint(v=v, step=step)
        session.run(tf.compat.v1.global_variables_initializer())
        manager = cls(checkpoint, directory, 2, step_counter=step, checkpoint_interval=2)
        for k in range(1, 7):
            clock.advance(60.0)
            session.run([v.assign(values_for(k)), step.assign_add(1)])
            note(f"save at step {k}", lambda: rel(manager.save()))
            note("checkpoints", lambda: [rel(p) for p in manager.checkpoints])
            note("latest_checkpoint", lambda: rel(manager.latest_checkpoint))
        note("save, check_interval=False", lambda: rel(manager.save(check_interval=False)))
        note("save_counter", lambda: int(session.run(checkpoint.save_counter)))
        clock.advance(60.0)
        # A new manager in the same session (the variables stay): restore, then number by tensor.
        manager = cls(checkpoint, directory, 2, step_counter=step, checkpoint_interval=2)
        session.run(v.assign(np.full(4, -99.0, np.float32)))
        note("restore_or_initialize", lambda: rel(manager.restore_or_initialize()))
        note("v after restore", lambda: session.run(v).tolist())
        clock.advance(60.0)
        note("save at a tensor's number", lambda: rel(manager.save(checkpoint_number=step + 10)))
        note("checkpoints", lambda: [rel(p) for p in manager.checkpoints])
    seen.append(("files", _files(directory), []))
    state_file = pathlib.Path(directory, "checkpoint")
    seen.append(("state file", state_file.read_bytes() if state_file.exists() else None, []))
    return seen


def test_tf_compat_v1_graph_and_session_like_tensorflow(tmp_path, clock):
    start = clock.now
    expected = graph_mode_run(TF, str(tmp_path / "tf"), clock)
    clock.now = start
    actual = graph_mode_run(CS, str(tmp_path / "cs"), clock)
    for want, got in zip(expected, actual):
        assert got == want
    assert len(actual) == len(expected)
    saved = [result for what, result, _ in actual if what.startswith("save at step")]
    assert saved == ["ckpt-1", None, "ckpt-2", None, "ckpt-3", None]  # the interval, in a session


def test_a_ckptstore_manager_is_a_tensorflow_manager(tmp_path):
    """TensorFlow's own code branches on isinstance (PreemptionCheckpointHandler does)."""
    import tensorflow as tf

    import ckptstore

    ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
    local = ckptstore.CheckpointManager(ckpt, str(tmp_path / "local"), max_to_keep=1)
    remote = ckptstore.CheckpointManager(
        ckpt, f"file://{tmp_path}/remote", max_to_keep=1, staging_dir=str(tmp_path / "s")
    )
    for manager in (local, remote):
        assert isinstance(manager, tf.train.CheckpointManager)
    remote.close()
