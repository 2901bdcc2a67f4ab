"""Two local workers train under MultiWorkerMirroredStrategy; only the chief writes the remote.

Each worker is a process of its own (``multi_worker_child.py``) with a ``TF_CONFIG`` naming a
two-worker cluster on 127.0.0.1, as TensorFlow runs one per machine. Each one reaches S3 through
a recording link of its own (a FaultProxy in front of the same moto server), so what each sent
is known: the non-chief's link must carry no write at all. Both are SIGKILLed mid-run, then
restarted on fresh staging directories (new machines), and both must restore the same committed
checkpoint: the newest one on the remote, with the weights the chief had when it saved it. Then,
with the chief's uploads refused, both are killed again while the chief holds saves it never
committed, and restarted with the chief on its old staging directory: both must still restore
the newest *committed* checkpoint, the only one the non-chief can see.

Also: a worker whose ``TF_CONFIG`` is malformed fails with TensorFlow's own error and leaves the
remote as it was; and ``ParameterServerStrategy``, whose parameter servers write their part of a
checkpoint themselves, is refused with a URL (a plain shared path still works as TensorFlow's).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from conftest import RemoteSpec, open_manager, s3_remote
from test_readers import Link, snapshot
from training import TrainState

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multi_worker_child.py")
STARTUP = 90.0  # seconds for both workers to import TensorFlow and form the cluster (2 cores)
LEASE = "ckptstore.lease.json"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def child_env(config: str | None) -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    env.pop("TF_CONFIG", None)
    if config is not None:
        env["TF_CONFIG"] = config
    return env


def run_alone(child: dict[str, Any], config: str | None) -> subprocess.CompletedProcess:
    """One ``multi_worker_child.py`` with ``TF_CONFIG`` ``config`` (None: unset), run to its end
    without a partner (it must not wait for one), its output captured."""
    return subprocess.run(
        [sys.executable, CHILD, json.dumps(child)],
        env=child_env(config),
        capture_output=True,
        text=True,
        timeout=STARTUP,
    )


class Worker:
    """One worker process; its ``KEY k=v ...`` lines are parsed as they come."""

    def __init__(self, config: dict[str, Any], tf_config_text: str, log_path: str):
        self.log_path = log_path
        self._stderr = open(log_path, "w")  # noqa: SIM115  (closed in wait)
        self.proc = subprocess.Popen(
            [sys.executable, CHILD, json.dumps(config)],
            env=child_env(tf_config_text),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def records(self, key: str) -> list[dict[str, str]]:
        out = []
        for line in list(self.lines):
            head, _, rest = line.partition(" ")
            if head == key:
                out.append(dict(field.split("=", 1) for field in rest.split(" ")))
        return out

    def output(self) -> str:
        with open(self.log_path) as f:
            err = f.read()
        return "\n".join(self.lines[-40:]) + "\n--- stderr:\n" + err[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(5)
            self._stderr.close()


def start_pair(
    links: list[Link], spec: RemoteSpec, s3_server: Any, stagings: list[Any], **config: Any
) -> list[Worker]:
    """Both workers of a new cluster (fresh ports), each on its own link and staging directory."""
    ports = free_ports(2)
    workers = []
    for index in range(2):
        child = {
            "url": spec.url,
            "options": s3_server.storage_options(links[index].proxy.endpoint_url),
            "staging": str(stagings[index]),
            **config,
        }
        log = f"{stagings[index]}-{time.monotonic_ns()}.stderr"
        workers.append(Worker(child, tf_config(ports, index), log))
    return workers


def kill_when(condition, what: str, workers: list[Worker]) -> None:
    """SIGKILL both workers once ``condition()`` holds (both, whatever happens)."""
    try:
        wait_until(condition, what, workers, STARTUP)
    finally:
        for w in workers:
            w.kill()
        for w in workers:
            w.wait(30)


def committed_by_chief(chief: Worker) -> set[str]:
    """What the chief's manager reported committed at its last save."""
    saves = chief.records("SAVED")
    return set(saves[-1]["committed"].split(",")) - {"-"} if saves else set()


def wait_until(condition, what: str, workers: list[Worker], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for w in workers:
            assert w.proc.poll() is None, f"a worker ended while waiting until {what}:\n" + (
                w.output()
            )
        assert time.monotonic() < deadline, f"timed out waiting until {what}:\n" + "\n".join(
            w.output() for w in workers
        )
        time.sleep(0.05)


def writes(link: Link) -> list[str]:
    return [r.what for r in link.seen if r.op != "read"]


def committed_numbers(spec: RemoteSpec) -> list[int]:
    return sorted(int(name.rsplit("-", 1)[1]) for name in spec.manifests())


def check_saves(chief: Worker, worker: Worker) -> list[dict[str, str]]:
    """Every save ran on both, in lockstep; the non-chief's copy was written, then removed."""
    chief_saves, worker_saves = chief.records("SAVED"), worker.records("SAVED")
    # Killed, one of them may have printed one save more than the other.
    both = min(len(chief_saves), len(worker_saves))
    assert both >= 1 and abs(len(chief_saves) - len(worker_saves)) <= 1
    for key in ("step", "digest"):
        assert [s[key] for s in worker_saves[:both]] == [s[key] for s in chief_saves[:both]]
    temp = os.path.join(worker.records("ROLE")[0]["staging"], "workertemp_1")
    for save in worker_saves:
        # TensorFlow wrote a whole checkpoint there (its write callback saw the .index)...
        assert save["path"] == os.path.join(temp, f"ckpt-{save['step']}"), save
        assert save["wrote"] == "1", save
        # ... and it was gone, with its workertemp directory, when save() returned.
        assert save["left"] == "0", save
    for save in chief_saves:
        assert save["path"] == os.path.join(
            chief.records("ROLE")[0]["staging"], "ckpt-" + save["step"]
        )
        assert save["wrote"] == "1", save
    return chief_saves


def test_only_the_chief_writes_and_after_a_kill_both_workers_restore_the_same_commit(
    s3_server, tmp_path
):
    links = [Link("s3", s3_server), Link("s3", s3_server)]
    for link in links:
        link.proxy.start()
    spec = s3_remote(s3_server)  # the test's own client, straight to the server
    training = {"until": 10**6, "save_every": 2, "pace": 0.03}
    try:
        # --- run 1: train, save every 2 steps; both SIGKILLed once two commits are in ------
        stagings1 = [tmp_path / "run1-machine-0", tmp_path / "run1-machine-1"]
        chief, worker = run1 = start_pair(links, spec, s3_server, stagings1, **training)
        kill_when(
            lambda: len(committed_by_chief(chief)) >= 2 and len(worker.records("SAVED")) >= 3,
            "the chief committed two checkpoints",
            run1,
        )

        # Who is who is TensorFlow's: task 0 is the chief (should_checkpoint).
        assert chief.records("ROLE")[0]["chief"] == "1", chief.output()
        worker_role = worker.records("ROLE")[0]
        assert worker_role["chief"] == "0" and worker_role["writer"] == "0", worker.output()
        # The non-chief's private staging is on the disk it was pointed at.
        assert worker_role["staging"].startswith(str(stagings1[1]) + os.sep), worker_role
        digest_at = {int(s["step"]): s["digest"] for s in check_saves(chief, worker)}

        # Only the chief's link carried writes; the worker's read the remote, nothing else.
        assert links[1].seen, "the worker's requests did not go through its link"
        assert writes(links[1]) == [], writes(links[1])
        chief_writes = {r.name for r in links[0].seen if r.op == "write"}
        assert LEASE in chief_writes and any(n.endswith(".manifest.json") for n in chief_writes)

        # The remote holds the chief's committed checkpoints, and the chief's lease.
        numbers = committed_numbers(spec)
        assert numbers and set(numbers) <= set(digest_at), (numbers, sorted(digest_at))
        for n in numbers:
            manifest = json.loads(spec.read(f"ckpt-{n}.manifest.json"))
            assert manifest["writer"]["pid"] == chief.proc.pid, manifest["writer"]
        assert json.loads(spec.read(LEASE))["pid"] == chief.proc.pid
        newest = numbers[-1]

        # --- run 2: both restart on fresh staging directories (new machines) --------------
        # Both restore the newest commit, with the weights the chief saved there, bit for
        # bit. Then the chief's uploads are refused at the link: its next saves stay staged,
        # never committed, when both are killed again.
        for link in links:
            link.seen.clear()
        stagings2 = [tmp_path / "run2-machine-0", tmp_path / "run2-machine-1"]
        chief2, worker2 = run2 = start_pair(links, spec, s3_server, stagings2, **training)
        wait_until(lambda: all(w.records("RESTORED") for w in run2), "both restored", run2, STARTUP)
        check_restored(run2, newest, digest_at[newest])
        wait_until(
            lambda: any(int(c.split("-")[1]) > newest for c in committed_by_chief(chief2)),
            "the restarted chief committed a checkpoint",
            run2,
            STARTUP,
        )
        links[0].hooks.append(lambda r: r.op == "write" and (r.name or "").startswith("ckpt-"))
        refused_from = int(chief2.records("SAVED")[-1]["step"])
        kill_when(
            lambda: int(chief2.records("SAVED")[-1]["step"]) >= refused_from + 4,
            "the chief saved twice more, uploads refused",
            run2,
        )
        # The non-chief downloaded the checkpoint through its link, and wrote nothing there.
        assert any(
            r.op == "read" and (r.name or "").startswith(f"ckpt-{newest}.data")
            for r in links[1].seen
        ), links[1].seen
        assert writes(links[1]) == [], writes(links[1])
        digest_at = {int(s["step"]): s["digest"] for s in check_saves(chief2, worker2)}
        numbers = committed_numbers(spec)
        newest = numbers[-1]
        assert newest in digest_at, (numbers, sorted(digest_at))
        # The chief's staging holds checkpoints newer than the newest commit: saved, never
        # committed (the precondition of run 3).
        staged = [
            int(name[len("ckpt-") : -len(".index")])
            for name in os.listdir(stagings2[0])
            if name.startswith("ckpt-") and name.endswith(".index")
        ]
        assert max(staged) > newest, (staged, newest)
        # The killed non-chief left its private directory behind, with its restore download.
        left_behind = worker2.records("ROLE")[0]["staging"]
        assert os.path.basename(left_behind).startswith(".ckptstore-worker1-"), left_behind
        assert any(n.endswith(".index") for n in os.listdir(left_behind)), left_behind

        # --- run 3: both restart on the machines they ran on (their staging kept). Both ---
        # must restore the newest COMMITTED checkpoint: the non-chief cannot see what the
        # chief staged, so the chief must not resume it either.
        for link in links:
            link.seen.clear()
        links[0].hooks.clear()
        run3 = start_pair(links, spec, s3_server, stagings2, until=newest + 2, save_every=2, pace=0)
        chief3, worker3 = run3
        for w in run3:
            assert w.wait(STARTUP) == 0, w.output()
        check_restored(run3, newest, digest_at[newest])
        assert writes(links[1]) == [], writes(links[1])
        # The chief took the run over from its killed predecessor and committed its next
        # save, in lockstep with the non-chief.
        check_saves(chief3, worker3)
        assert newest + 2 in committed_numbers(spec)
        manifest = json.loads(spec.read(f"ckpt-{newest + 2}.manifest.json"))
        assert manifest["writer"]["pid"] == chief3.proc.pid
        assert [w.records("DONE")[0]["step"] for w in run3] == [str(newest + 2)] * 2
        # The non-chief's private staging (its restore, its workertemp) went with it, and its
        # killed predecessor's was removed when it started.
        assert not os.path.exists(worker3.records("ROLE")[0]["staging"])
        assert not os.path.exists(left_behind)
        assert not [n for n in os.listdir(stagings2[1]) if n.startswith(".ckptstore")]
    finally:
        for link in links:
            link.proxy.stop()


def check_restored(workers: list[Worker], step: int, digest: str) -> None:
    """Both restored checkpoint ``step``, with the weights the chief had when it saved it."""
    for w in workers:
        restored = w.records("RESTORED")[0]
        assert restored["from"] == f"ckpt-{step}", (restored, step, w.output())
        assert int(restored["step"]) == step, restored
        assert restored["digest"] == digest, (restored, digest)


@pytest.mark.parametrize(
    "config, error",
    [
        # One task index too many: the classic copy-paste slip.
        (
            {
                "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                "task": {"type": "worker", "index": 2},
            },
            "ValueError: The `task_id` 2 exceeds the maximum id of worker.",
        ),
        # Not JSON at all (a shell quoting slip).
        ("{'cluster': {'worker': ['127.0.0.1:1']}}", "json.decoder.JSONDecodeError"),
    ],
    ids=["task-index-out-of-range", "not-json"],
)
def test_a_worker_with_a_malformed_tf_config_fails_with_tensorflows_error_and_writes_nothing(
    s3_server, tmp_path, config, error
):
    link = Link("s3", s3_server)
    link.proxy.start()
    try:
        spec = link.remote()
        # A run with a committed checkpoint, written straight to the server (not via the link).
        state = TrainState()
        with open_manager(state, link.direct(spec), tmp_path / "earlier") as m:
            state.train_one()
            m.save()
        before = snapshot(link.direct(spec))
        assert any(name.endswith(".manifest.json") for name in before["sizes"]), before
        child = {
            "url": spec.url,
            "options": spec.storage_options,
            "staging": str(tmp_path / "machine"),
            "until": 4,
            "save_every": 2,
            "pace": 0.0,
        }
        text = config if isinstance(config, str) else json.dumps(config)
        proc = run_alone(child, text)
        assert proc.returncode != 0, proc.stdout
        assert error in proc.stderr, proc.stderr[-3000:]
        assert "ROLE" not in proc.stdout, proc.stdout
        # Nothing reached the remote, and nothing was staged.
        assert link.seen == [], link.seen
        assert snapshot(link.direct(spec)) == before
        assert not os.path.exists(tmp_path / "machine")
    finally:
        link.proxy.stop()


def test_parameter_server_strategy_is_refused_with_a_url_and_works_on_a_plain_path(
    s3_server, tmp_path
):
    """The coordinator is TensorFlow's checkpointer, but the parameter servers write the data.

    TensorFlow saves each variable from the task that holds it (its SaveV2 runs on that task's
    CPU), so a staging directory on the coordinator's disk would not receive the parameter
    servers' part on a real cluster. A manager on a URL says so before touching anything; on a
    plain path (a shared file system) it is TensorFlow's manager and saves and restores.
    """
    link = Link("s3", s3_server)
    link.proxy.start()
    try:
        spec = link.remote()
        child = {
            "mode": "ps",
            "url": spec.url,
            "options": spec.storage_options,
            "staging": str(tmp_path / "staging"),
            "shared": str(tmp_path / "shared"),
        }
        proc = run_alone(child, None)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        # The variable lives on the parameter server; the coordinator is TensorFlow's chief.
        assert "PLACED device=/job:ps/replica:0/task:0/device:CPU:0 should_checkpoint=True" in lines
        refused = [line for line in lines if line.startswith("REFUSED ")]
        assert refused, proc.stdout
        message = refused[0]
        assert (
            spec.url in message and "cannot checkpoint a ParameterServerStrategy run" in message
        ), message
        assert "plain path on a file system every task" in message, message
        assert "MultiWorkerMirroredStrategy" in message, message
        # Refused before anything was read, written or staged.
        assert link.seen == [], link.seen
        assert not os.path.exists(tmp_path / "staging")
        local = [line for line in lines if line.startswith("LOCAL ")]
        assert local == [f"LOCAL path={tmp_path / 'shared' / 'ckpt-1'} restored=True"], lines
    finally:
        link.proxy.stop()
