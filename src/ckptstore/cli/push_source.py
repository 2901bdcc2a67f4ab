"""What ``ckptstore push`` finds in DIR, and whether TensorFlow reads it.

DIR is what plain TensorFlow wrote: a checkpoint directory, a SavedModel, or TF
Serving's base of numbered SavedModels. This module tells which
(:func:`source_kind`), lists DIR's checkpoints, complete or not
(:func:`find_checkpoints`, timed by DIR's own ``checkpoint`` state file,
:func:`read_dir_state`), and reads every checkpoint back with TensorFlow's
reader before anything is sent (:func:`read_checkpoint`,
:func:`check_saved_model`). It reads DIR only: nothing here touches the remote.

TensorFlow is passed in (``tf``) or imported inside a function: importing this
module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from ckptstore import manifest as mf
from ckptstore import publisher
from ckptstore.cli import common

#: a checkpoint's data shard: ``<prefix>.data-00000-of-00002``
_SHARD = re.compile(r"(?P<prefix>.+)\.data-(?P<k>[0-9]+)-of-(?P<n>[0-9]+)")
#: TF Serving's version directories: non-negative integers
_VERSION = re.compile(r"[0-9]+")
_GRAPH_FILES = ("saved_model.pb", "saved_model.pbtxt")
#: the step, where a checkpoint keeps one as a scalar integer (Estimator, or Checkpoint(step=))
_STEP_KEYS = (
    "global_step",
    "step/.ATTRIBUTES/VARIABLE_VALUE",
    "global_step/.ATTRIBUTES/VARIABLE_VALUE",
)

# What DIR is (``kind`` in --json).
CHECKPOINT = "checkpoint"
SAVED_MODEL = "saved_model"
SAVED_MODEL_VERSIONS = "saved_model_versions"


@dataclasses.dataclass
class LocalCheckpoint:
    """One checkpoint prefix found in DIR."""

    name: str
    files: list[str]
    #: why it is not a complete checkpoint (``None``: complete)
    incomplete: str | None
    #: listed in DIR's ``checkpoint`` state file
    listed: bool
    timestamp: float
    number: int | None
    step: int | None = None


# --- what DIR is --------------------------------------------------------------------------


def _found_text(path: str) -> str:
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return "nothing readable"
    if not entries:
        return "nothing: it is empty"
    shown = [e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in entries[:10]]
    more = f", and {len(entries) - 10} more" if len(entries) > 10 else ""
    return ", ".join(shown) + more


def _not_pushable(source: str, why: str) -> common.CommandError:
    return common.CommandError(
        f"{source} is not a TensorFlow checkpoint directory or a SavedModel: {why}. Nothing "
        "was pushed. Give the directory tf.train.CheckpointManager or tf.train.Checkpoint.save "
        "wrote (it holds <prefix>.index and <prefix>.data-* files), or a directory "
        "tf.saved_model.save wrote (it holds saved_model.pb), or TF Serving's base of numbered "
        "versions (DIR/1/saved_model.pb, ...)."
    )


def _is_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in _GRAPH_FILES)


def versions(path: str) -> dict[int, str]:
    """TF Serving's numbered version directories under ``path`` that hold a SavedModel."""
    found = {}
    for entry in os.listdir(path):
        sub = os.path.join(path, entry)
        if _VERSION.fullmatch(entry) and os.path.isdir(sub) and _is_saved_model(sub):
            found[int(entry)] = sub
    return found


def source_kind(source: str) -> str:
    """``checkpoint``, ``saved_model`` or ``saved_model_versions``; or why DIR is neither."""
    if not os.path.exists(source):
        raise _not_pushable(source, "no such directory")
    if not os.path.isdir(source):
        raise _not_pushable(source, "it is a file, not a directory")
    if _is_saved_model(source):
        return SAVED_MODEL
    try:
        entries = os.listdir(source)
    except OSError as exc:
        raise _not_pushable(source, f"it cannot be read ({exc.strerror or exc})") from None
    if any(e.endswith(".index") or _SHARD.fullmatch(e) for e in entries):
        return CHECKPOINT
    if versions(source):
        return SAVED_MODEL_VERSIONS
    state = " (its checkpoint state file names checkpoints whose files are not there)"
    return_why = (
        "it holds no <prefix>.index file (TensorFlow's checkpoints), no saved_model.pb and no "
        "numbered SavedModel versions"
        + (state if "checkpoint" in entries else "")
        + f" (found: {_found_text(source)})"
    )
    raise _not_pushable(source, return_why)


def export_files(path: str) -> list[str]:
    """The export's files, relative; ckptstore's own (a manifest, a marker) are not part of it."""
    return [
        f
        for f in mf.tree_files(path)
        if not f.endswith(mf.MANIFEST_SUFFIX) and not f.endswith(publisher.PENDING_SUFFIX)
    ]


# --- its checkpoints ----------------------------------------------------------------------


def _number_of(name: str) -> int | None:
    """The checkpoint number TensorFlow appends: ``ckpt-7`` -> 7, ``model.ckpt-1000`` -> 1000."""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if "-" in name and tail.isdigit() else None


def read_dir_state(source: str) -> tuple[dict[str, float], float | None]:
    """``{name: timestamp}`` (oldest first) and ``last_preserved_timestamp`` of DIR's state file.

    A missing or unreadable state file gives ``({}, None)``: then every complete
    checkpoint is pushed, timed by its index file.
    """
    from ckptstore import staging

    path = os.path.join(source, "checkpoint")
    if not os.path.isfile(path):
        return {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        state = staging.parse_state_text(f.read())
    if state is None:
        return {}, None
    names = [os.path.basename(p) for p in state.all_model_checkpoint_paths]
    if not names and state.model_checkpoint_path:
        names = [os.path.basename(state.model_checkpoint_path)]
    stamps = list(state.all_model_checkpoint_timestamps)
    listed = {n: (stamps[i] if i < len(stamps) else None) for i, n in enumerate(names)}
    return listed, state.last_preserved_timestamp or None  # type: ignore[return-value]


def find_checkpoints(source: str, listed: dict[str, float | None]) -> list[LocalCheckpoint]:
    """Every checkpoint prefix in ``source`` (complete or not), oldest first."""
    files = sorted(f for f in os.listdir(source) if os.path.isfile(os.path.join(source, f)))
    prefixes = {f[: -len(".index")] for f in files if f.endswith(".index")}
    shards: dict[str, list[tuple[int, int]]] = {}
    for f in files:
        m = _SHARD.fullmatch(f)
        if m is not None:
            shards.setdefault(m["prefix"], []).append((int(m["k"]), int(m["n"])))
            prefixes.add(m["prefix"])
    prefixes |= {n for n in listed if os.path.isfile(os.path.join(source, n + ".index"))}
    found = []
    for name in prefixes | set(listed):
        own = mf.checkpoint_files(source, name) if name in prefixes else []
        got = shards.get(name, [])
        totals = {n for _, n in got}
        why = None
        if name + ".index" not in own:
            why = f"it has no {name}.index file" if own else "none of its files are in DIR"
        elif not got:
            why = f"it has no {name}.data-* file"
        elif len(totals) != 1:
            why = "its data files disagree on how many shards there are"
        else:
            (total,) = totals
            missing = sorted(set(range(total)) - {k for k, _ in got})
            if missing:
                names = ", ".join(f"{name}.data-{k:05d}-of-{total:05d}" for k in missing[:3])
                why = f"data shard{'s' if len(missing) > 1 else ''} {names} missing"
        stamp = listed.get(name)
        if stamp is None:
            index = os.path.join(source, name + ".index")
            stamp = os.path.getmtime(index) if os.path.isfile(index) else 0.0
        found.append(
            LocalCheckpoint(
                name=name,
                files=own,
                incomplete=why,
                listed=name in listed,
                timestamp=float(stamp),
                number=_number_of(name),
            )
        )
    return sorted(found, key=lambda c: (c.timestamp, c.number or 0, c.name))


# --- reading it with TensorFlow -----------------------------------------------------------


def read_checkpoint(tf: Any, prefix: str) -> tuple[str | None, int | None]:
    """Read every tensor of the checkpoint at ``prefix``: ``(problem or None, step or None)``.

    TensorFlow's reader checks each tensor's CRC32C (kept in the index) as it
    reads it, so a truncated or altered data file fails here, not after it was
    committed as verified. Tensors are read one at a time: memory holds the
    largest, not the checkpoint.
    """
    step = None
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        for key in sorted(shapes):
            value = reader.get_tensor(key)
            if key in _STEP_KEYS and step is None and not shapes[key] and dtypes[key].is_integer:
                step = int(value)
    except Exception as exc:  # DataLossError, NotFoundError, OutOfRangeError, ...
        text = str(exc).strip().splitlines()
        return f"TensorFlow cannot read it ({type(exc).__name__}: {text[0] if text else ''})", None
    return None, step


def check_saved_model(tf: Any, path: str) -> str | None:
    """Why the SavedModel at ``path`` cannot be loaded, or ``None``: its graph parses and
    its variables (a checkpoint) read back."""
    if not tf.saved_model.contains_saved_model(path):
        return "it holds no saved_model.pb"
    from google.protobuf import text_format
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        pb = os.path.join(path, "saved_model.pb")
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                proto.ParseFromString(f.read())
        else:
            with open(os.path.join(path, "saved_model.pbtxt"), encoding="utf-8") as f:
                text_format.Parse(f.read(), proto)
    except Exception as exc:
        return f"its saved_model.pb does not parse ({type(exc).__name__}: {exc})"
    if not proto.meta_graphs:
        return "its saved_model.pb holds no MetaGraph"
    variables = os.path.join(path, "variables", "variables")
    if os.path.isfile(variables + ".index"):
        problem, _ = read_checkpoint(tf, variables)
        if problem is not None:
            return f"its variables cannot be read: {problem}"
    return None
