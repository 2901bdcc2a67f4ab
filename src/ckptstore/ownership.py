"""One writer, many readers: the run's writer lease on the remote.

A run (one remote directory) has at most one writer. Only the writer deletes,
retires, rewrites TensorFlow's state file, adopts, or collects orphans; every
other process that opens the URL reads. The writer is recorded on the remote in
:data:`LEASE_NAME`, a small JSON object::

    {"writer": "3f2a...", "host": "trainer-0", "pid": 4711, "since": ..., "last_seen": ...,
     "lease_seconds": 60, "sequence": 42, "released": false, ...}

* **Taking the run.** A process may write when the lease is absent, released,
  expired (``last_seen`` older than the holder's ``lease_seconds``), or held by
  a process of *this* machine that no longer runs (provably gone: same boot and
  PID namespace, and that PID is dead or is another process). Otherwise it is a
  reader, and asking it to write raises :class:`OwnershipError` naming the
  holder, unless ``takeover=True`` forces the hand-over.
* **Keeping it.** The writer renews ``last_seen`` from a heartbeat thread every
  ``lease_seconds / 4``, and again right before each upload, commit, state-file
  write and deletion. Every write of the lease is conditional on the
  version the writer last wrote (:meth:`Backend.write_if`: S3 ``If-Match``,
  GCS ``ifGenerationMatch``, a local ``flock``, Drive's etag), so a writer that
  was paused, partitioned or replaced finds out at its next renewal, and from
  then on commits and deletes nothing (:class:`OwnershipLost`).
* **Letting go.** ``close()`` marks the lease released (again conditionally);
  the next process takes it at once.

* **Leftovers.** Before the first byte of a checkpoint goes up, and before a
  retired one loses its manifest, its name goes into the lease's ``in_flight``
  list. After a crash the next writer deletes the data of exactly those names
  that have no manifest: nothing else on the remote is provably ckptstore's.

What remains, and why: a writer that passes its pre-commit renewal and is then
frozen for longer than a whole lease between that request and the very next one
(the commit) could still land one manifest after a takeover. And a fenced
writer still in the middle of sending a data file can finish sending it; if the
new writer uploads a file of the same name, verification on restore catches the
mix (it is never loaded) and the previous checkpoint is restored. Expiry
compares the wall clocks of two machines (NTP keeps them within milliseconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid

from ckptstore.backends.base import PreconditionFailed
from ckptstore.errors import OwnershipError, OwnershipLost
from ckptstore.redaction import Redactor
from ckptstore.remote import Remote

log = logging.getLogger("ckptstore")

LEASE_NAME = "ckptstore.lease.json"
LEASE_FORMAT = "ckptstore.lease"
DEFAULT_LEASE_SECONDS = 60.0
_MAX_LEASE_BYTES = 64 * 1024
#: writer ids of the leases held by this process right now. A lease record naming this
#: process with an id not in here belongs to a manager that is gone (closed while the
#: remote was unreachable, or garbage-collected): provably not a live writer.
_HELD_HERE: set[str] = set()


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_id() -> str | None:
    """Who "this machine" is, narrowly enough that a PID here means one process.

    Boot id and PID namespace: two containers on one host (even with one host
    name) differ, and a rebooted machine differs from itself before the boot.
    ``None`` where it cannot be told (not Linux); then liveness is never judged
    by PID, only by the lease's expiry.
    """
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    if not boot or not pidns:
        return None
    return f"{boot}/{pidns}"


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (guards against PID reuse)."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


@dataclasses.dataclass(frozen=True)
class Holder:
    """One lease record as stored on the remote."""

    writer: str
    host: str
    pid: int
    since: float
    last_seen: float
    lease_seconds: float
    sequence: int = 0
    released: bool = False
    machine: str | None = None
    process_start: str | None = None
    library: str = ""
    #: checkpoints whose files this writer is uploading (not yet committed) or retiring
    #: (manifest gone, data not yet): after a crash, exactly the leftovers the next
    #: writer may delete. Nothing else is provably ckptstore's.
    in_flight: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        doc = {"format": LEASE_FORMAT, "format_version": 1, **dataclasses.asdict(self)}
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Holder | None:
        """Parse a lease; ``None`` for anything that is not one (never trusted blindly)."""
        if len(data) > _MAX_LEASE_BYTES:
            return None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != LEASE_FORMAT:
                return None
            return cls(
                writer=str(doc["writer"]),
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                since=float(doc["since"]),
                last_seen=float(doc["last_seen"]),
                lease_seconds=float(doc["lease_seconds"]),
                sequence=int(doc.get("sequence", 0)),
                released=bool(doc.get("released", False)),
                machine=doc.get("machine") if isinstance(doc.get("machine"), str) else None,
                process_start=(
                    doc.get("process_start") if isinstance(doc.get("process_start"), str) else None
                ),
                library=str(doc.get("library", "")),
                in_flight=tuple(
                    n for n in doc.get("in_flight") or () if isinstance(n, str) and _plain(n)
                ),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        """``host trainer-0, pid 4711 (writing since 14:02:11 UTC, last seen 12 s ago)``."""
        now = time.time() if now is None else now
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return (
            f"host {self.host}, pid {self.pid} (writing since {since}, "
            f"last seen {max(0.0, now - self.last_seen):.0f} s ago)"
        )


def _plain(name: str) -> bool:
    """A checkpoint name, not a path: the lease is untrusted input like a manifest."""
    return 0 < len(name) < 256 and "/" not in name and "\\" not in name and name not in (".", "..")


class Liveness:
    """What a lease record says about its holder, seen from this process."""

    FREE = "free"  # no lease, or released
    GONE = "gone"  # same machine, and the process is provably not running
    EXPIRED = "expired"  # not renewed within its lease_seconds
    ALIVE = "alive"


def judge(holder: Holder | None, now: float | None = None) -> str:
    """Classify ``holder`` (see :class:`Liveness`); pure apart from reading /proc."""
    if holder is None or holder.released:
        return Liveness.FREE
    here = machine_id()
    if here is not None and holder.machine == here:
        if holder.pid == os.getpid() and holder.writer not in _HELD_HERE:
            return Liveness.GONE
        running = process_start(holder.pid)
        if running is None or (holder.process_start and running != holder.process_start):
            return Liveness.GONE
    now = time.time() if now is None else now
    if now - holder.last_seen > holder.lease_seconds:
        return Liveness.EXPIRED
    return Liveness.ALIVE


class Lease:
    """This process's claim on a run: read it, take it, keep it, give it back.

    Example::

        lease = Lease(remote, lease_seconds=60, redactor=Redactor(url))
        holder = lease.read()            # who writes, if anyone (no write)
        lease.acquire()                  # raises OwnershipError if someone alive does
        lease.renew()                    # before each commit or delete
        lease.release()                  # at close()
    """

    def __init__(
        self,
        remote: Remote,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        redactor: Redactor,
        library_version: str = "",
    ):
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be positive")
        self.remote = remote
        self.path = remote.path(LEASE_NAME)
        self.lease_seconds = float(lease_seconds)
        self._redactor = redactor
        self._library = library_version
        self.writer_id = uuid.uuid4().hex
        self._lock = threading.RLock()
        self._token: str | None = None
        self._record: Holder | None = None
        self._renewed_at = 0.0  # time.monotonic() of the last successful write
        self.lost: OwnershipLost | None = None
        #: the record this process took the run over from (its ``in_flight`` are leftovers)
        self.previous: Holder | None = None
        self._in_flight: set[str] = set()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # --- reading --------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._record is not None and self.lost is None

    def read(self) -> tuple[Holder | None, str | None]:
        """The stored lease and its version token (``(None, None)`` when there is none)."""
        got = self.remote.backend.read_versioned(self.path)
        if got is None:
            return None, None
        data, token = got
        holder = Holder.from_json(data)
        if holder is None:
            log.warning(
                "%s/%s is not a ckptstore lease; treating the run as unowned",
                self.remote.url,
                LEASE_NAME,
            )
        return holder, token

    # --- taking -----------------------------------------------------------------

    def _record_for(self, previous: Holder | None, *, released: bool = False) -> Holder:
        now = time.time()
        mine = previous is not None and previous.writer == self.writer_id
        return Holder(
            writer=self.writer_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=previous.since if mine else now,
            last_seen=now,
            lease_seconds=self.lease_seconds,
            sequence=(previous.sequence + 1) if previous is not None else 1,
            released=released,
            machine=machine_id(),
            process_start=process_start(os.getpid()),
            library=self._library,
            in_flight=tuple(sorted(self._in_flight)),
        )

    def acquire(self, *, force: bool = False) -> Holder | None:
        """Become the run's writer; return the holder taken over from (``None`` if free).

        Raises:
            OwnershipError: another live process writes the run (and ``force`` is false),
                or it won the race to take it at the same moment.
        """
        with self._lock:
            for _ in range(3):
                holder, token = self.read()
                state = judge(holder)
                if holder is not None and holder.writer == self.writer_id and self.lost is None:
                    # Ours already: an earlier attempt landed and only its answer was lost.
                    self._record, self._token = holder, token
                    self._renewed_at = time.monotonic()
                    _HELD_HERE.add(self.writer_id)
                    self._start_heartbeat()
                    return self.previous
                if state == Liveness.ALIVE and not force:
                    raise self._held_by(holder)
                record = self._record_for(holder)
                try:
                    self._token = self.remote.backend.write_if(self.path, record.to_json(), token)
                except PreconditionFailed:
                    continue  # someone wrote it between our read and write: look again
                self._record, self._renewed_at, self.lost = record, time.monotonic(), None
                self.previous = holder
                _HELD_HERE.add(self.writer_id)
                if holder is not None and state != Liveness.FREE:
                    log.warning(
                        "ckptstore: took over %s from %s: %s",
                        self.remote.url,
                        holder.describe(),
                        {
                            Liveness.GONE: "that process no longer runs on this machine",
                            Liveness.EXPIRED: f"its lease expired ({holder.lease_seconds:.0f} s)",
                            Liveness.ALIVE: "takeover=True forced it; that writer is fenced "
                            "and commits nothing more",
                        }[state],
                    )
                self._start_heartbeat()
                return holder if state != Liveness.FREE else None
            holder, _ = self.read()
            raise self._held_by(holder)

    def _held_by(self, holder: Holder | None) -> OwnershipError:
        who = holder.describe() if holder is not None else "another process"
        lease = holder.lease_seconds if holder is not None else self.lease_seconds
        return OwnershipError(
            f"{self.remote.url} is being written by {who}. This manager only reads it: "
            f"one run has one writer. If that process is gone, its lease expires {lease:.0f} s "
            "after it was last seen and the next save() takes over; to take over now, create "
            "the manager with takeover=True (the other writer is then fenced: it commits "
            "nothing more and its sync() raises OwnershipError). To evaluate alongside "
            "training, use read_only=True or ckptstore.checkpoints_iterator().",
            holder=holder,
        )

    # --- keeping --------------------------------------------------------------------

    def renew(self) -> None:
        """Write ``last_seen`` now if the lease is still ours, else raise :class:`OwnershipLost`."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self._record is None:
                raise OwnershipError(f"This manager does not write {self.remote.url}.")
            record = self._record_for(self._record)
            try:
                self._token = self.remote.backend.write_if(self.path, record.to_json(), self._token)
            except PreconditionFailed:
                holder, token = self.read()
                if holder is not None and holder.writer == self.writer_id and not holder.released:
                    # Still ours: a renewal landed but its answer was lost, so our token is
                    # stale. Take the stored version and write again.
                    self._record, self._token = holder, token
                    self.renew()
                    return
                self.lost = self._lost_to(holder)
                _HELD_HERE.discard(self.writer_id)
                self._stop.set()
                raise self.lost from None
            self._record, self._renewed_at = record, time.monotonic()

    def _lost_to(self, holder: Holder | None) -> OwnershipLost:
        if holder is None or holder.released:
            who = "the lease was removed or released by another process"
        else:
            who = f"{holder.describe()} took it over"
        return OwnershipLost(
            f"This process no longer writes {self.remote.url}: {who}. Nothing more was "
            "committed or deleted by this manager; its checkpoints not yet committed stay "
            "in its staging directory. Open a new manager (it reads, or takes over with "
            "takeover=True) if this process should write again.",
            holder=holder,
        )

    def renewed_ago(self) -> float:
        """Seconds since this process last wrote the lease successfully."""
        return time.monotonic() - self._renewed_at

    def mark_in_flight(self, checkpoint: str) -> None:
        """Record on the remote, before the first byte changes, that ``checkpoint``'s files will.

        Also proves the lease is still ours (it is a renewal).
        """
        with self._lock:
            self._in_flight.add(checkpoint)
            try:
                self.renew()
            except BaseException:
                self._in_flight.discard(checkpoint)
                raise

    def mark_done(self, checkpoint: str) -> None:
        """``checkpoint`` is committed (or fully retired); the next renewal stops listing it."""
        with self._lock:
            self._in_flight.discard(checkpoint)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="ckptstore-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        interval = self.lease_seconds / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
            except OwnershipLost as exc:
                log.error("ckptstore: %s", exc)
                return
            except Exception as exc:  # the network; the next beat (or commit) tries again
                log.info(
                    "ckptstore: could not renew the writer lease on %s: %s",
                    self.remote.url,
                    self._redactor.describe(exc),
                )

    # --- letting go -------------------------------------------------------------------

    def release(self) -> None:
        """Mark the lease released so the next process takes the run at once."""
        _HELD_HERE.discard(self.writer_id)
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5.0)
        with self._lock:
            if self._record is None or self.lost is not None:
                self._record = None
                return
            record = self._record_for(self._record, released=True)
            try:
                self.remote.backend.write_if(self.path, record.to_json(), self._token)
            except PreconditionFailed:
                pass  # someone else holds it now: nothing of ours to release
            except Exception as exc:
                log.warning(
                    "ckptstore: could not release the writer lease on %s (%s); the next "
                    "writer takes over when it expires in %.0f s",
                    self.remote.url,
                    self._redactor.describe(exc),
                    self.lease_seconds,
                )
            finally:
                self._record = None
